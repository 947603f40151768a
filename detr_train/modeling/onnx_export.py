"""Export a Deformable DETR to ONNX with a dynamic batch and image size, verified by ONNX Runtime.

The graph takes `pixel_values` (batch, 3, height, width, float32) and `pixel_mask` (batch,
height, width, int64: 1 on image pixels, 0 on padding), exactly what the image processor
returns, and gives `logits` (batch, queries, classes) and `pred_boxes` (batch, queries, 4,
normalised cx, cy, w, h). Its metadata holds the class names and the image processor's
settings, so that a predictor needs nothing else.

The model is traced (TorchScript exporter) through `onnx_graph.ExportableDetector`, which
takes every per-level size from tensors, with the PyTorch deformable attention. Before
anything is written, ONNX Runtime on CPU runs the graph on images of two sizes other than
the traced one, alone and as one padded batch, and its outputs must equal PyTorch's within
`TOLERANCE`: a mismatch is an error, and no file is left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from dataclasses import dataclass

import torch

from detr_train.errors import DetrTrainError, ExportError
from detr_train.modeling.onnx_graph import ExportableDetector, TensorShapedDeformableAttention, UnsupportedForExport

log = logging.getLogger(__name__)

OPSET = 20  # the newest the TorchScript exporter writes; ONNX Runtime runs it since 1.17
TOLERANCE = 1e-4
INPUTS = ("pixel_values", "pixel_mask")
OUTPUTS = ("logits", "pred_boxes")
# Metadata keys of the graph (values are JSON text).
META_CLASS_NAMES = "detr_train.class_names"
META_PROCESSOR = "detr_train.image_processor"
META_SOURCE = "detr_train.source"
ONNX_HINT = 'pip install "detr-train[onnx]"'
_ATTENTION_CLASS = "DeformableDetrMultiscaleDeformableAttention"


class OnnxUnavailableError(DetrTrainError, ImportError):
    """onnx or onnxruntime is not installed."""


def require_onnx(*packages: str) -> None:
    """One clear error, naming the extra to install, when a package is missing."""
    import importlib.util

    missing = [name for name in packages or ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise OnnxUnavailableError(f"ONNX export and inference need {' and '.join(missing)}, which is not installed",
                                   hint=ONNX_HINT)


@dataclass(frozen=True)
class Parity:
    """How far ONNX Runtime's outputs are from PyTorch's, over the verification inputs."""

    logits: float
    pred_boxes: float
    traced_size: tuple[int, int]
    checked_sizes: tuple[tuple[int, int], ...]

    @property
    def worst(self) -> float:
        return max(self.logits, self.pred_boxes)

    def describe(self) -> str:
        sizes = ", ".join(f"{h}x{w}" for h, w in self.checked_sizes)
        return (f"max |ONNX Runtime - PyTorch|: logits {self.logits:.2e}, pred_boxes {self.pred_boxes:.2e} at "
                f"{sizes} (alone and as one padded batch; traced at {self.traced_size[0]}x{self.traced_size[1]})")


@contextlib.contextmanager
def tensor_shaped_attention(model: torch.nn.Module):
    """Every deformable attention of `model` on the PyTorch path with sizes from tensors (a
    fused kernel installed for training included); the original modules come back after."""
    swapped = [(module, module.attn) for module in model.modules() if type(module).__name__ == _ATTENTION_CLASS]
    try:
        for module, _ in swapped:
            module.attn = TensorShapedDeformableAttention()
        yield
    finally:
        for module, original in swapped:
            module.attn = original


def verification_sizes(shortest_edge: int, longest_edge: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two image sizes the processor could produce, a landscape and a portrait one, both unlike
    the square the graph is traced at."""
    long = min(longest_edge, shortest_edge + shortest_edge // 3)
    return (shortest_edge, long), (long - 8, shortest_edge)


def export_onnx(model: torch.nn.Module, class_names: list[str], processor, *, source: str = "",
                opset: int = OPSET) -> tuple[bytes, Parity]:
    """The verified ONNX graph of `model` (serialised, metadata included) and its parity."""
    require_onnx()
    model = model.float().cpu().eval()
    shortest, longest = _processor_edges(processor)
    traced = (shortest, shortest)
    try:
        wrapper = ExportableDetector(model).eval()
    except UnsupportedForExport as exc:
        raise ExportError(f"this model cannot be exported to ONNX: {exc}") from exc
    with tensor_shaped_attention(model):
        graph = _trace(wrapper, traced, opset)
    graph = _with_metadata(graph, class_names, processor, source)
    parity = verify(graph, model, verification_sizes(shortest, longest), traced)
    log.info("ONNX Runtime agrees with PyTorch: %s", parity.describe())
    return graph, parity


def _processor_edges(processor) -> tuple[int, int]:
    size = processor.size
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    if not shortest:
        raise ExportError(f"the image processor's size {size} has no shortest_edge: cannot choose export sizes")
    return int(shortest), int(longest or shortest)


def _example(batch_sizes: list[tuple[int, int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of random images of these sizes, as the image processor lays one out."""
    generator = torch.Generator().manual_seed(seed)
    height, width = max(h for h, _ in batch_sizes), max(w for _, w in batch_sizes)
    pixel_values = torch.zeros(len(batch_sizes), 3, height, width)
    pixel_mask = torch.zeros(len(batch_sizes), height, width, dtype=torch.int64)
    for index, (h, w) in enumerate(batch_sizes):
        pixel_values[index, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        pixel_mask[index, :h, :w] = 1
    return pixel_values, pixel_mask


def _trace(wrapper: ExportableDetector, size: tuple[int, int], opset: int) -> bytes:
    buffer = io.BytesIO()
    dynamic = {"pixel_values": {0: "batch", 2: "height", 3: "width"}, "pixel_mask": {0: "batch", 1: "height", 2: "width"},
               "logits": {0: "batch"}, "pred_boxes": {0: "batch"}}
    with warnings.catch_warnings():
        # The tracer warns where transformers turns a size into a Python bool (a length
        # check) or int; the verification below is what tells whether the graph is right.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(wrapper, _example([size], seed=0), buffer, dynamo=False, opset_version=opset,
                              input_names=list(INPUTS), output_names=list(OUTPUTS), dynamic_axes=dynamic)
        except Exception as exc:  # the exporter raises many kinds; each means the same to the user
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    return buffer.getvalue()


def _with_metadata(graph: bytes, class_names: list[str], processor, source: str) -> bytes:
    import onnx

    proto = onnx.load_from_string(graph)
    entries = {META_CLASS_NAMES: json.dumps(list(class_names)), META_PROCESSOR: json.dumps(processor.to_dict()),
               META_SOURCE: source}
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "detr-train"
    return proto.SerializeToString()


def verify(graph: bytes, model: torch.nn.Module, sizes: tuple[tuple[int, int], ...],
           traced: tuple[int, int]) -> Parity:
    """ONNX Runtime (CPU) against the PyTorch model (transformers' own forward) on each size alone and on all of them as
    one padded batch; an ExportError when any output differs by more than TOLERANCE."""
    import onnxruntime

    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    worst = {name: 0.0 for name in OUTPUTS}
    batches = [[size] for size in sizes] + [list(sizes)]
    for seed, batch in enumerate(batches, start=1):
        pixel_values, pixel_mask = _example(batch, seed)
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        expected = [outputs.logits.numpy(), outputs.pred_boxes.numpy()]
        got = session.run(list(OUTPUTS), {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()})
        for name, want, have in zip(OUTPUTS, expected, got):
            if want.shape != have.shape:
                raise ExportError(f"the ONNX graph's {name} has shape {have.shape} for a batch of {batch}, "
                                  f"PyTorch's {want.shape}")
            worst[name] = max(worst[name], float(abs(want - have).max()))
    parity = Parity(worst["logits"], worst["pred_boxes"], traced, tuple(sizes))
    if not parity.worst <= TOLERANCE:  # also catches NaN
        raise ExportError(f"the ONNX graph disagrees with PyTorch beyond {TOLERANCE:g}: {parity.describe()}; "
                          f"nothing was written")
    return parity
