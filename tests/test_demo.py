"""The default demo, as a new user runs it: `detr-train` with no arguments, then
`detr-train-predict <run> data/synthetic/val` at the default threshold."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torchvision.ops import box_iou

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`detr-train` with nothing but an output folder: the default data, model and schedule."""
    work = tmp_path_factory.mktemp("demo")
    result = subprocess.run([sys.executable, "-m", "detr_train", f"output_root={work / 'outputs'}",
                             f"data.root={work / 'synthetic'}", "training.progress=false"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (work / "outputs" / "default").iterdir()
    return run_dir, work / "synthetic"


def _xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def test_the_demo_finds_a_correct_box_on_most_validation_images(demo_run, tmp_path):
    run_dir, data_root = demo_run
    output = tmp_path / "predicted"
    result = subprocess.run([sys.executable, "-m", "detr_train.cli.predict", str(run_dir), str(data_root / "val"),
                             "--output", str(output), "--workers", "0", "--no-draw"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    detections = json.loads((output / "detections.json").read_text())
    truth = json.loads((data_root / "annotations" / "val.json").read_text())
    names = {category["id"]: category["name"] for category in truth["categories"]}
    files = {image["id"]: str(data_root / "val" / image["file_name"]) for image in truth["images"]}
    found = 0
    for image_id, file_name in files.items():
        boxes = [a for a in truth["annotations"] if a["image_id"] == image_id]
        predicted = [d for d in detections if d["file_name"] == file_name]
        # A correct box: the right class, IoU >= 0.5 with a ground-truth box of that class.
        found += any(
            names[a["category_id"]] == d["category_name"]
            and box_iou(torch.tensor([_xyxy(d["bbox"])]), torch.tensor([_xyxy(a["bbox"])])).item() >= 0.5
            for d in predicted for a in boxes
        )
    assert found > len(files) / 2, f"a correct box on {found} of {len(files)} validation images"
