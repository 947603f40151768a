"""detr-train-export --format onnx|hf, and detr-train-predict on the exported graph."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT, compose_config
from tests.test_eval_predict import _image_folder, _in_process

CLASSES = ["circle", "square", "triangle"]


def _random_model(overrides: list[str]):
    from detr_train.modeling.build import build_model

    torch.manual_seed(0)
    return build_model(compose_config(overrides).model, CLASSES).eval()


def _padded_batch(sizes: list[tuple[int, int]], seed: int):
    generator = torch.Generator().manual_seed(seed)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixel_values = torch.randn(len(sizes), 3, height, width, generator=generator)
    pixel_mask = torch.zeros(len(sizes), height, width, dtype=torch.int64)
    for index, (h, w) in enumerate(sizes):
        pixel_mask[index, :h, :w] = 1
    return pixel_values, pixel_mask


def _export_and_compare(model, eval_size: int, other_batch: list[tuple[int, int]]):
    """Export; then ONNX Runtime on a batch the export's own check did not see, against PyTorch."""
    import onnx
    import onnxruntime

    from detr_train.modeling.build import build_image_processor
    from detr_train.modeling.onnx_export import META_CLASS_NAMES, META_PROCESSOR, export_onnx

    processor = build_image_processor(eval_size, 1.333)
    graph, parity = export_onnx(model, CLASSES, processor)
    assert parity.worst <= 1e-4
    assert parity.traced_size not in parity.checked_sizes and len(set(parity.checked_sizes)) == 2

    proto = onnx.load_from_string(graph)
    assert [i.name for i in proto.graph.input] == ["pixel_values", "pixel_mask"]
    assert [o.name for o in proto.graph.output] == ["logits", "pred_boxes"]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    assert dims == [["batch", 3, "height", "width"], ["batch", "height", "width"]]
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert json.loads(metadata[META_CLASS_NAMES]) == CLASSES
    assert json.loads(metadata[META_PROCESSOR]) == json.loads(json.dumps(processor.to_dict()))

    pixel_values, pixel_mask = _padded_batch(other_batch, seed=7)
    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    logits, boxes = session.run(None, {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()})
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    np.testing.assert_allclose(logits, expected.logits.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(boxes, expected.pred_boxes.numpy(), rtol=0, atol=1e-4)


def test_the_tiny_default_model_exports_with_a_dynamic_batch_and_image_size():
    # The demo's variant: box refinement with two-stage proposals. Traced at 64x64; checked on
    # three images of other sizes in one padded batch.
    _export_and_compare(_random_model([]), 64, [(72, 100), (100, 56), (40, 88)])


@pytest.mark.slow
def test_a_resnet50_shaped_timm_model_exports_and_matches():
    # The reference architecture (timm ResNet-50, 4 feature levels, plain decoder), random init
    # and shortened to one encoder layer, two decoder layers and 20 queries.
    model = _random_model(["model=deformable_detr", "model.backbone.type=timm", "model.backbone.name=resnet50",
                           "model.encoder_layers=1", "model.decoder_layers=2", "model.num_queries=20"])
    _export_and_compare(model, 64, [(96, 64), (64, 120)])


def test_a_graph_with_sizes_baked_in_is_an_error_not_a_warning(monkeypatch):
    # What a plain trace does: each level's size a constant of the traced image. ONNX Runtime
    # then disagrees at other sizes, and the export must refuse.
    from detr_train.errors import ExportError
    from detr_train.modeling import onnx_graph
    from detr_train.modeling.build import build_image_processor
    from detr_train.modeling.onnx_export import export_onnx

    monkeypatch.setattr(onnx_graph, "_level_shape", lambda source: torch.tensor([int(source.shape[-2]),
                                                                                  int(source.shape[-1])]))
    with pytest.raises(ExportError, match="disagrees with PyTorch beyond 0.0001"):
        export_onnx(_random_model([]), CLASSES, build_image_processor(64, 1.333))


def test_without_onnx_installed_one_line_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnx", "onnxruntime") else real_find_spec(name, *a))
    from PIL import Image

    (tmp_path / "model.onnx").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    for module, args, missing in [("cli.export", [tmp_path, "--output", tmp_path / "new.onnx"], "onnx and onnxruntime"),
                                  ("cli.predict", [tmp_path / "model.onnx", tmp_path / "image.png", "--output",
                                                   tmp_path / "p"], "onnxruntime")]:
        code, stderr = _in_process(module, *args)
        lines = [line for line in stderr.splitlines() if line.startswith("detr-train-")]
        assert code == 2 and len(lines) == 1 and f"need {missing}, which is not installed" in lines[0], stderr
        assert 'hint: pip install "detr-train[onnx]"' in stderr
    assert not (tmp_path / "new.onnx").exists() and not (tmp_path / "p").exists()


@pytest.mark.slow
def test_predict_from_the_onnx_file_equals_predict_from_the_run(trained_run, synthetic_root, tmp_path):
    run_dir = trained_run.run_dir
    exported = tmp_path / "model.onnx"
    code, stderr = _in_process("cli.export", run_dir, "--output", exported)
    assert code == 0, stderr[-3000:]
    assert exported.is_file()

    images = _image_folder(synthetic_root, tmp_path / "images", count=4)
    common = ["--threshold", "0.0", "--batch-size", "3", "--workers", "0", "--no-draw"]
    code, stderr = _in_process("cli.predict", run_dir, images, "--output", tmp_path / "torch", *common)
    assert code == 0, stderr[-3000:]
    # A fresh process, to see what predicting from ONNX imports: no model code of transformers'
    # (its image processor brings transformers' shared modeling_utils, but no model).
    script = ("import sys; from detr_train.cli.predict import main\n"
              "try: main(sys.argv[1:])\nexcept SystemExit as e: assert not e.code, e.code\n"
              "print(sorted(m for m in sys.modules if m.startswith('transformers.models.') and '.modeling_' in m\n"
              "             and not m.endswith('.modeling_auto')))")
    result = subprocess.run([sys.executable, "-c", script, str(exported), str(images), "--output",
                             str(tmp_path / "onnx"), *common], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"

    from_run = json.loads((tmp_path / "torch" / "detections.json").read_text())
    from_onnx = json.loads((tmp_path / "onnx" / "detections.json").read_text())
    assert len(from_onnx) == len(from_run) > 0
    key = lambda d: (d["file_name"], d["category_id"], -d["score"])  # noqa: E731
    for ours, theirs in zip(sorted(from_onnx, key=key), sorted(from_run, key=key)):
        assert (ours["file_name"], ours["category_name"]) == (theirs["file_name"], theirs["category_name"])
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-4)
        assert ours["bbox"] == pytest.approx(theirs["bbox"], abs=1e-2)


@pytest.mark.slow
def test_hf_export_and_existing_outputs(trained_run, tmp_path):
    from safetensors.torch import load_file

    run_dir = trained_run.run_dir
    code, stderr = _in_process("cli.export", run_dir, "--format", "hf", "--output", tmp_path / "hf")
    assert code == 0, stderr[-3000:]
    # The same weights and processor as the run's own export (best.pt's scored weights).
    ours, theirs = load_file(tmp_path / "hf" / "model.safetensors"), load_file(run_dir / "hf_model" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert ((tmp_path / "hf" / "preprocessor_config.json").read_text()
            == (run_dir / "hf_model" / "preprocessor_config.json").read_text())

    taken_file, taken_dir = tmp_path / "taken.onnx", tmp_path / "hf"
    taken_file.write_text("earlier")
    before = sorted(p.name for p in taken_dir.iterdir())
    for args in ([run_dir, "--output", taken_file], [run_dir, "--format", "hf", "--output", taken_dir]):
        code, stderr = _in_process("cli.export", *args)
        lines = [line for line in stderr.splitlines() if line.startswith("detr-train-export: error:")]
        assert code == 2 and len(lines) == 1 and "already exists" in lines[0], stderr[-2000:]
    assert taken_file.read_text() == "earlier"
    assert sorted(p.name for p in taken_dir.iterdir()) == before
    shutil.rmtree(taken_dir)
