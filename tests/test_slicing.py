"""Sliced inference: the tile grid, objects across tile borders found once, the cross-view merge,
and one tile equal to the image giving exactly the unsliced detections of a real model."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from detr_train.cli.predict import InferenceCollator
from detr_train.evaluation import slicing
from detr_train.evaluation.evaluator import predict
from detr_train.evaluation.slicing import SlicedCollator, SliceSettings, Tile, merge_views, tile_grid
from detr_train.modeling.build import build_image_processor
from detr_train.modeling.precision import resolve_precision
from tests.conftest import SMALL_SYNTHETIC, compose_config, make_trainer
from tests.test_eval_predict import _in_process

CPU = torch.device("cpu")
FP32 = resolve_precision(False, "bfloat16", CPU)
RATIO = 1.667


# --- the grid ----------------------------------------------------------------------------------


def test_grid_of_a_bdd100k_frame():
    # step 512 - round(0.2 x 512) = 410; the last column and row end at the image's edges.
    tiles = tile_grid(720, 1280, 512, 0.2)
    assert [(t.top, t.left) for t in tiles] == [(0, 0), (0, 410), (0, 768), (208, 0), (208, 410), (208, 768)]
    assert {(t.height, t.width) for t in tiles} == {(512, 512)}


def test_grid_edge_cases():
    assert tile_grid(300, 200, 512, 0.2) == [Tile(0, 0, 300, 200)]  # smaller than a tile: the image
    assert tile_grid(512, 512, 512, 0.5) == [Tile(0, 0, 512, 512)]
    assert [t.left for t in tile_grid(100, 1024, 512, 0.0)] == [0, 512]  # no overlap: side by side
    assert tile_grid(600, 100, 512, 0.2) == [Tile(0, 0, 512, 100), Tile(88, 0, 512, 100)]


@pytest.mark.parametrize("height,width,size,overlap", [(720, 1280, 512, 0.2), (333, 517, 64, 0.25), (97, 1000, 96, 0.0),
                                                      (1080, 1920, 640, 0.5)])
def test_grid_covers_the_image_with_at_least_the_overlap_asked(height, width, size, overlap):
    tiles = tile_grid(height, width, size, overlap)
    covered = np.zeros((height, width), dtype=int)
    for tile in tiles:
        assert 0 <= tile.top and tile.top + tile.height <= height and 0 <= tile.left and tile.left + tile.width <= width
        covered[tile.top:tile.top + tile.height, tile.left:tile.left + tile.width] += 1
    assert covered.min() >= 1
    lefts, tops = sorted({t.left for t in tiles}), sorted({t.top for t in tiles})
    for starts in (lefts, tops):
        assert all(b - a <= size - round(overlap * size) for a, b in zip(starts, starts[1:]))


# --- objects across tile borders, with a detector that sees exactly what is drawn --------------


class BlobDetector(torch.nn.Module):
    """Finds the white rectangles in each input (ignoring padding) and returns them as
    confident class-0 boxes, as fractions of the padded canvas; its other queries score ~0."""

    queries = 20

    def forward(self, pixel_values, pixel_mask):
        batch, _, height, width = pixel_values.shape
        logits = torch.full((batch, self.queries, 1), -20.0)
        boxes = torch.full((batch, self.queries, 4), 0.01)
        for i in range(batch):
            white = ((pixel_values[i, 0] > 1.0) & (pixel_mask[i] > 0)).numpy()
            blobs, _ = ndimage.label(white)
            for q, (rows, cols) in enumerate(ndimage.find_objects(blobs)):
                logits[i, q, 0] = 20.0
                boxes[i, q] = torch.tensor([(cols.start + cols.stop) / 2 / width, (rows.start + rows.stop) / 2 / height,
                                            (cols.stop - cols.start) / width, (rows.stop - rows.start) / height])
        return types.SimpleNamespace(logits=logits, pred_boxes=boxes)


# 300 x 200, slice 128, overlap 0.25: tile columns start at 0, 96, 172 and rows at 0, 72, so inner
# edges run at x = 96, 128, 172, 224 and y = 72, 128. xywh, disjoint.
OBJECTS = [
    [118, 20, 16, 12],   # across x=128: whole only in the middle column
    [200, 60, 20, 20],   # across x=224, x=172 and y=72: whole only in the top-right tile
    [40, 120, 14, 14],   # across y=128: whole only in the bottom row
    [10, 180, 10, 10],   # by the image's own bottom edge (not an inner edge)
    [58, 140, 138, 35],  # wider than any overlap band: whole only in the whole image
]


def _scene() -> Image.Image:
    pixels = np.zeros((200, 300, 3), dtype=np.uint8)
    for x, y, w, h in OBJECTS:
        pixels[y:y + h, x:x + w] = 255
    return Image.fromarray(pixels)


def _sliced_detections(settings: SliceSettings, chunk_size: int = 4) -> list[dict]:
    processor = build_image_processor(200, RATIO)  # the whole image goes through at its own size
    collate = SlicedCollator(InferenceCollator(processor), processor, settings, chunk_size)
    batch = collate([{"index": 0, "image": _scene()}])
    found = predict(BlobDetector(), [batch], processor, FP32, CPU, int, slicing=settings)
    return [d for d in found if d["score"] > 0.5]


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_objects_across_tile_borders_are_found_once(chunk_size):
    found = sorted(d["bbox"] for d in _sliced_detections(SliceSettings(128, 0.25), chunk_size))
    assert len(found) == len(OBJECTS)
    for box, expected in zip(found, sorted(OBJECTS)):
        assert box == pytest.approx(expected, abs=1e-4)


def test_without_dropping_cut_tile_boxes_objects_would_be_found_in_pieces(monkeypatch):
    monkeypatch.setattr(slicing, "INNER_EDGE_MARGIN", -1e9)  # no tile box counts as cut
    assert len(_sliced_detections(SliceSettings(128, 0.25))) > len(OBJECTS)


# --- the merge -------------------------------------------------------------------------------


def _view(*detections) -> dict:
    return {"scores": torch.tensor([d[0] for d in detections]), "labels": torch.tensor([d[1] for d in detections]),
            "boxes": torch.tensor([d[2] for d in detections], dtype=torch.float32).reshape(-1, 4)}


def test_the_merge_joins_views_not_detections_of_one_view():
    whole = _view((0.9, 0, [0, 0, 10, 10]), (0.8, 0, [3, 0, 13, 10]),  # two cars side by side (IoU 0.54): both stay
                  (0.3, 1, [50, 50, 60, 60]))
    tile = _view((0.95, 0, [-1, 0, 9, 10]),  # the first car again (IoU 0.82, 0.43 with the second), scored higher
                 (0.7, 1, [50, 50, 60, 60.5]),  # the whole image's class-1 box (IoU 0.95), now the higher
                 (0.6, 0, [50, 50, 60, 60]))  # same place, another class: a detection of its own
    merged = merge_views([whole, tile], iou_threshold=0.5)
    assert merged["scores"].tolist() == pytest.approx([0.95, 0.8, 0.7, 0.6])
    assert merged["labels"].tolist() == [0, 0, 1, 0]
    assert merged["boxes"].tolist() == [[-1, 0, 9, 10], [3, 0, 13, 10], [50, 50, 60, 60.5], [50, 50, 60, 60]]
    assert len(merge_views([whole, tile], iou_threshold=0.9)["scores"]) == 5  # the cars' 0.82 is below it now


def test_the_merge_keeps_the_top_k_by_score():
    views = [_view(*[(s / 100, 0, [s * 20, 0, s * 20 + 10, 10]) for s in range(1, 60, 2)]),
             _view(*[(s / 100, 0, [s * 20, 0, s * 20 + 10, 10]) for s in range(2, 60, 2)])]
    merged = merge_views(views, iou_threshold=0.5, top_k=7)
    assert merged["scores"].tolist() == pytest.approx([s / 100 for s in range(59, 52, -1)])


# --- a real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    from detr_train.modeling.build import build_model

    torch.manual_seed(0)
    return build_model(compose_config().model, ["circle", "square", "triangle"]).eval()


def test_one_tile_equal_to_the_image_gives_exactly_the_unsliced_detections(tiny_model, synthetic_root):
    processor = build_image_processor(96, RATIO)  # the synthetic images are 96 x 96: no resize either way
    images = [Image.open(p).convert("RGB") for p in sorted((synthetic_root / "val").glob("*.png"))[:2]]
    samples = [{"index": i, "image": image} for i, image in enumerate(images)]
    plain = predict(tiny_model, [InferenceCollator(processor)(samples)], processor, FP32, CPU, int)
    settings = SliceSettings(96, 0.2)
    batch = SlicedCollator(InferenceCollator(processor), processor, settings, chunk_size=2)(samples)
    assert [t for chunk in batch["tile_chunks"] for t in chunk["tiles"]] == [Tile(0, 0, 96, 96)] * 2
    sliced = predict(tiny_model, [batch], processor, FP32, CPU, int, slicing=settings)

    def ordered(detections):
        return sorted(detections, key=lambda d: (d["image_id"], -d["score"], d["category_id"], d["bbox"]))

    assert len(plain) == 2 * 60  # 20 queries x 3 classes per image
    assert ordered(sliced) == ordered(plain)


# --- a run that trains on tiles and evaluates sliced, and detr-train-eval on it -------------------


@pytest.fixture(scope="module")
def tiled_run(synthetic_root, tmp_path_factory):
    from detr_train.checkpointing.plan import Plan

    run_dir = tmp_path_factory.mktemp("tiled") / "run"
    overrides = SMALL_SYNTHETIC + [
        f"data.root={synthetic_root}", "data/augment=tiles", "data.augment.tile.size=64", "training.eval_slice=64",
        "training.epochs=1", "training.batch_size=4", "training.subset_size=8", "training.val_subset_size=2",
        "training.log_every=0", "training.progress=false", "training.plots=false"]
    trainer = make_trainer(Plan(compose_config(overrides), run_dir))
    trainer.fit()
    return run_dir, json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0]), trainer


def _evaluated(run_dir, output, *options) -> tuple[dict, list[dict]]:
    code, stderr = _in_process("cli.evaluate", run_dir, "--output", output, *options)
    assert code == 0, stderr[-3000:]
    return json.loads((output / "metrics.json").read_text()), json.loads((output / "detections.json").read_text())


def _ordered(detections):
    return sorted(detections, key=lambda d: (d["image_id"], -d["score"], d["category_id"], d["bbox"]))


@pytest.mark.slow
def test_a_tiled_run_evaluates_sliced_and_detr_train_eval_scores_it_the_same(tiled_run, tmp_path):
    run_dir, record, trainer = tiled_run
    assert record["image_size"] == 64  # the tile side, not data.image_size (96)
    report, detections = _evaluated(run_dir, tmp_path / "as_trained")  # the run's own training.eval_slice
    assert report["slicing"] == {"size": 64, "overlap": 0.2, "iou_threshold": 0.5}
    assert report["metrics"]["map"] == pytest.approx(record["map"], abs=1e-9)
    # The final weights are best.pt's (one epoch): training's sliced evaluation finds what the command does.
    in_training = trainer.evaluate().scores.detections
    assert len(detections) == 2 * 100 and _ordered(detections) == _ordered(in_training)  # 60 per view, 100 merged
    # A tile as large as the (96 x 96) images repeats the whole image: the unsliced detections exactly.
    whole, whole_detections = _evaluated(run_dir, tmp_path / "whole", "--slice", "0")
    one_tile, one_tile_detections = _evaluated(run_dir, tmp_path / "one_tile", "--slice", "96")
    assert whole["slicing"] is None and one_tile["slicing"]["size"] == 96
    assert _ordered(one_tile_detections) == _ordered(whole_detections) != _ordered(detections)


@pytest.mark.slow
@pytest.mark.parametrize("option,expected", [
    (("--slice", "8"), "--slice 8: must be at least 32"),
    (("--slice-overlap", "1"), "--slice-overlap 1.0: must be in [0, 1)"),
    (("--slice-iou", "0"), "--slice-iou 0.0: must be in (0, 1]"),
])
def test_bad_slice_options_get_one_line(tiled_run, tmp_path, option, expected):
    for module, inputs in (("cli.evaluate", ()), ("cli.predict", (tmp_path,))):
        code, stderr = _in_process(module, tiled_run[0], *inputs, *option, "--output", tmp_path / "out")
        errors = [line for line in stderr.splitlines() if line.startswith("detr-train-")]
        assert code == 2 and len(errors) == 1 and expected in errors[0], stderr[-2000:]
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override,key", [("training.eval_slice=16", "training.eval_slice"),
                                          ("training.eval_slice_overlap=1.0", "training.eval_slice_overlap"),
                                          ("training.eval_slice_iou=0", "training.eval_slice_iou")])
def test_bad_slice_settings_name_their_key(override, key):
    from detr_train.config.checks import check_config
    from detr_train.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        check_config(compose_config(["data.root=/some/where", "training.eval_slice=512", override]))
    assert str(raised.value).startswith(f"{key} must be")
