"""`detr-train-eval` and `detr-train-predict` on a run trained here: train, score, predict, look."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _tool(module: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """The command in a process of its own, as a user runs it."""
    return subprocess.run([sys.executable, "-m", f"detr_train.{module}", *map(str, args)], cwd=cwd or REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def _in_process(module: str, *args) -> tuple[int, str]:
    """The command's `main` in this process (no interpreter start-up): its exit status and stderr."""
    import contextlib
    import importlib
    import io
    import logging

    stderr = io.StringIO()
    handler = logging.StreamHandler(stderr)
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stderr(stderr):
            importlib.import_module(f"detr_train.{module}").main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        logging.getLogger().removeHandler(handler)
    return code, stderr.getvalue()


def _logged(trained_run, report: dict) -> dict:
    """What training logged for the weights the report scored: the EMA's are the record's
    `map`, ..., the raw weights' `raw_map`, ... when the EMA was scored first."""
    record = next(r for r in trained_run.records if r["epoch"] == report["epoch"])
    prefix = "raw_" if report["weights"] == "model" and "raw_map" in record else ""
    return {key.removeprefix(prefix): value for key, value in record.items() if key.startswith(prefix)}


def test_eval_of_a_run_dir_scores_best_pt_exactly_as_training_logged_it(trained_run, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    run_dir = trained_run.run_dir
    output = tmp_path / "scores"
    result = _tool("cli.evaluate", run_dir, "--output", output)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((output / "metrics.json").read_text())
    logged = _logged(trained_run, report)
    for key in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100"):
        assert report["metrics"][key] == pytest.approx(logged[key], abs=1e-6), key
    assert report["metrics"]["map_per_class"] == pytest.approx(logged["map_per_class"], abs=1e-6)
    state = trained_run.trainer.state
    assert report["model"].endswith("best.pt") and (report["epoch"], report["weights"]) == (state.best_epoch,
                                                                                           state.best_weights)
    assert logged["map"] == pytest.approx(state.best_metric, abs=1e-12)
    # The results file is what pycocotools itself scores to that mAP.
    gt = COCO(report["annotations"])
    scored = COCOeval(gt, gt.loadRes(str(output / "detections.json")), iouType="bbox")
    scored.params.imgIds = sorted({d["image_id"] for d in json.loads((output / "detections.json").read_text())})
    scored.evaluate(), scored.accumulate(), scored.summarize()
    assert scored.stats[0] == pytest.approx(report["metrics"]["map"], abs=1e-6)
    for plot in ("per_class_ap.png", "pr_curves.png"):
        assert Image.open(output / plot).size[0] > 100


def test_eval_of_the_export_matches_eval_of_best_pt(trained_run, tmp_path):
    run_dir, overrides = trained_run.run_dir, trained_run.overrides
    assert _in_process("cli.evaluate", run_dir, "--output", tmp_path / "ckpt")[0] == 0
    # An exported folder has no run config: the data keys come from the command line.
    data_keys = [o for o in overrides if o.startswith(("data.", "training.batch_size"))]
    code, stderr = _in_process("cli.evaluate", run_dir / "hf_model", *data_keys, "--output", tmp_path / "hf")
    assert code == 0, stderr[-3000:]
    from_checkpoint = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())["metrics"]
    from_export = json.loads((tmp_path / "hf" / "metrics.json").read_text())["metrics"]
    assert from_export["map"] == pytest.approx(from_checkpoint["map"], abs=1e-6)
    assert from_export["map_50"] == pytest.approx(from_checkpoint["map_50"], abs=1e-6)


def _image_folder(synthetic_root, target, count: int = 6):
    target.mkdir()
    for path in sorted((synthetic_root / "val").glob("*.png"))[:count]:
        shutil.copy(path, target / path.name)
    return target


def test_predict_draws_every_image_and_skips_an_unreadable_one(trained_run, synthetic_root, tmp_path):
    run_dir = trained_run.run_dir
    images = _image_folder(synthetic_root, tmp_path / "images")
    (images / "broken.jpg").write_bytes(b"not an image")
    output = tmp_path / "seen"
    result = _tool("cli.predict", run_dir, images, "--output", output, "--threshold", "0.0", "--workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped" in result.stderr and "broken.jpg" in result.stderr
    assert "1 unreadable image(s) skipped" in result.stderr
    detections = json.loads((output / "detections.json").read_text())
    drawn = sorted(p.name for p in (output / "images").iterdir())
    assert drawn == sorted(p.name for p in images.glob("*.png"))
    assert {d["file_name"] for d in detections} == {str(p) for p in images.glob("*.png")}
    for name in drawn:  # threshold 0: every image has boxes, so every drawing differs from its input
        before = np.asarray(Image.open(images / name).convert("RGB"))
        after = np.asarray(Image.open(output / "images" / name).convert("RGB"))
        assert before.shape == after.shape and (before != after).any()


def test_predict_matches_the_transformers_pipeline_on_the_export(trained_run, synthetic_root, tmp_path):
    from transformers import pipeline

    run_dir = trained_run.run_dir
    images = _image_folder(synthetic_root, tmp_path / "images", count=3)
    output = tmp_path / "ours"
    code, stderr = _in_process("cli.predict", run_dir / "hf_model", images, "--output", output, "--threshold", "0.05",
                               "--batch-size", "1", "--workers", "0", "--no-draw")
    assert code == 0, stderr[-3000:]
    ours = json.loads((output / "detections.json").read_text())
    detector = pipeline("object-detection", model=str(run_dir / "hf_model"), device="cpu")
    for path in sorted(images.glob("*.png")):
        theirs = sorted(detector(str(path), threshold=0.05), key=lambda d: -d["score"])
        mine = sorted((d for d in ours if d["file_name"] == str(path)), key=lambda d: -d["score"])
        assert len(mine) == len(theirs) > 0
        for a, b in zip(mine, theirs):
            assert a["category_name"] == b["label"]
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
            x, y, w, h = a["bbox"]
            box = b["box"]  # the pipeline rounds to whole pixels
            assert [x, y, x + w, y + h] == pytest.approx([box["xmin"], box["ymin"], box["xmax"], box["ymax"]],
                                                         abs=1.0)


def test_bad_input_gets_one_line_and_nothing_is_overwritten(trained_run, synthetic_root, tmp_path):
    run_dir = trained_run.run_dir
    images = _image_folder(synthetic_root, tmp_path / "images", count=2)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("earlier results")
    empty = tmp_path / "empty"
    empty.mkdir()
    other_classes = tmp_path / "other.json"
    annotations = json.loads((synthetic_root / "annotations" / "val.json").read_text())
    annotations["categories"].append({"id": 99, "name": "hexagon"})
    other_classes.write_text(json.dumps(annotations))
    cases = [
        ("already exists", ("cli.predict", run_dir, images, "--output", taken)),
        ("no images", ("cli.predict", run_dir, empty, "--output", tmp_path / "p1")),
        ("not found", ("cli.predict", run_dir, tmp_path / "nowhere", "--output", tmp_path / "p2")),
        ("not a run directory", ("cli.evaluate", empty, "--output", tmp_path / "e1")),
        ("predicts 3 classes", ("cli.evaluate", run_dir, f"data.val_ann={other_classes}", "--output", tmp_path / "e2")),
        ("has no key 'training.no_such_key'", ("cli.evaluate", run_dir, "training.no_such_key=1", "--output",
                                               tmp_path / "e3")),
        ("already exists", ("cli.evaluate", run_dir, "--output", taken)),
    ]
    for expected, (module, *args) in cases:
        code, stderr = _in_process(module, *args)
        assert code == 2, (expected, stderr[-2000:])
        errors = [line for line in stderr.splitlines() if line.startswith("detr-train-")]
        assert len(errors) == 1 and expected in errors[0], (expected, stderr[-2000:])
        program = {"cli.predict": "detr-train-predict", "cli.evaluate": "detr-train-eval"}[module]
        assert errors[0].startswith(f"{program}: error:")
        assert "Traceback" not in stderr
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert not any((tmp_path / name).exists() for name in ("p1", "p2", "e1", "e2", "e3"))


def test_the_commands_are_console_scripts_beside_detr_train():
    from importlib.metadata import entry_points

    scripts = {entry.name: entry.value for entry in entry_points(group="console_scripts")}
    assert scripts["detr-train-eval"] == "detr_train.cli.evaluate:main"
    assert scripts["detr-train-predict"] == "detr_train.cli.predict:main"


def test_a_first_release_checkpoint_loads_for_inference_with_its_own_weights(synthetic_root):
    """Checkpoints from before the model config was recorded rebuild from their run config."""
    import torch

    from detr_train.checkpointing import format as ckpt
    from detr_train.evaluation.inference import load_for_inference

    last = REPO_ROOT / "tests" / "data" / "legacy_format1_run" / "checkpoints" / "last.pt"
    loaded = load_for_inference(last, [f"data.root={synthetic_root}"], torch.device("cpu"))
    saved = ckpt.load_checkpoint(last)[ckpt.STATE_MODEL]
    state = loaded.model.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in loaded.model.model.backbone.modules())
    assert loaded.class_names == ["circle", "square", "triangle"] and loaded.weights == "model"
    assert str(loaded.cfg.data.root) == str(synthetic_root)
