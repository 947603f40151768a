"""Level 2: the pipeline can memorise a handful of images (the seed design's overfit check)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_tiny_model_overfits_ten_synthetic_images(synthetic_root, tmp_path):
    result = run_cli([
        "training=overfit", f"data.root={synthetic_root}", f"output_root={tmp_path}",
        "data.generate.num_train=48", "data.generate.num_val=16", "data.generate.image_size=96",
        "data.generate.min_object_size=16", "data.generate.max_object_size=40",
        "data.image_size=96", "data.eval_size=96", "data.num_workers=0", "training.progress=false",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "default").iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    maps = [r["map"] for r in records if "map" in r]
    assert len(records) == 80 and len(maps) == 4
    # The configured budget: 80 epochs x 5 steps = 400 steps on 10 images.
    assert records[-1]["global_step"] == 400
    assert maps[-1] >= 0.5, maps
    assert records[-1]["train_loss"] < records[0]["train_loss"] / 2
