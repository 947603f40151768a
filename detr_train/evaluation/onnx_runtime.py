"""A detector exported by `detr-train-export --format onnx`, run by ONNX Runtime.

`load_onnx` reads the graph and its metadata (class names, the image processor's settings)
and returns an `OnnxInferenceModel`. Its `detector` is called like the PyTorch model
(`detector(pixel_values=..., pixel_mask=...)` -> `.logits`, `.pred_boxes`), so that
`evaluation.evaluator.predict` turns its outputs into detections with the very same
post-processing as for a checkpoint. Nothing here imports transformers' model code: the
image processor (resize, normalise, pad; sigmoid, top-k, boxes back to pixels) is the only
part of transformers used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from detr_train.errors import DetrTrainError
from detr_train.modeling.onnx_export import INPUTS, META_CLASS_NAMES, META_PROCESSOR, OUTPUTS, require_onnx

log = logging.getLogger(__name__)

ONNX_SUFFIX = ".onnx"


class OnnxModelError(DetrTrainError, ValueError):
    """The file is not an ONNX model detr-train exported."""


class OnnxDetector:
    """An ONNX Runtime session called like DeformableDetrForObjectDetection at inference."""

    def __init__(self, session):
        self.session = session

    def eval(self) -> OnnxDetector:  # what evaluation.evaluator.predict calls on a model
        return self

    def __call__(self, *, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> SimpleNamespace:
        feed = {"pixel_values": pixel_values.detach().float().cpu().numpy(),
                "pixel_mask": pixel_mask.detach().to(torch.int64).cpu().numpy()}
        logits, pred_boxes = self.session.run(list(OUTPUTS), feed)
        return SimpleNamespace(logits=torch.from_numpy(logits).to(pixel_values.device),
                               pred_boxes=torch.from_numpy(pred_boxes).to(pixel_values.device))


@dataclass
class OnnxInferenceModel:
    detector: OnnxDetector
    class_names: list[str]
    processor: object  # the DeformableDetrImageProcessor the graph's metadata describes
    source: Path


def is_onnx_file(path: Path) -> bool:
    return Path(path).suffix.lower() == ONNX_SUFFIX


def providers_for(device: torch.device) -> list[str]:
    """ONNX Runtime's execution providers: CUDA first on a CUDA device when this build has it."""
    import onnxruntime

    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_onnx(path: Path, device: torch.device = torch.device("cpu")) -> OnnxInferenceModel:
    require_onnx("onnxruntime")
    import onnxruntime
    from transformers import DeformableDetrImageProcessor

    path = Path(path).expanduser()
    if not path.is_file():
        raise OnnxModelError(f"model not found: {path} does not exist")
    try:
        session = onnxruntime.InferenceSession(str(path), providers=providers_for(device))
    except Exception as exc:  # ONNX Runtime raises its own exception types for unreadable graphs
        raise OnnxModelError(f"{path}: ONNX Runtime cannot load it ({str(exc).strip().splitlines()[0]})") from exc
    inputs = tuple(item.name for item in session.get_inputs())
    outputs = tuple(item.name for item in session.get_outputs())
    metadata = session.get_modelmeta().custom_metadata_map
    if inputs != INPUTS or outputs != OUTPUTS or META_CLASS_NAMES not in metadata or META_PROCESSOR not in metadata:
        raise OnnxModelError(f"{path}: not a detector exported by detr-train-export (inputs {list(inputs)}, outputs "
                             f"{list(outputs)}, metadata {sorted(metadata)})")
    class_names = json.loads(metadata[META_CLASS_NAMES])
    processor = DeformableDetrImageProcessor.from_dict(json.loads(metadata[META_PROCESSOR]))
    log.info("Loaded %s with ONNX Runtime (%s, %d classes)", path, session.get_providers()[0], len(class_names))
    return OnnxInferenceModel(OnnxDetector(session), class_names, processor, path)
