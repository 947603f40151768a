"""BDD100K support: label conversion, the `data=bdd100k` preparation, and a round trip
through our dataset and evaluator (CPU, no network)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from detr_train.cli import bdd2coco
from detr_train.data import bdd100k, bdd100k_frames, bdd100k_layout
from detr_train.data.prepare import prepare_dataset
from detr_train.data.sources import DatasetError

DATA = Path(__file__).parent / "data"
SAMPLE = DATA / "bdd100k_labels_sample.json"
EXPECTED = DATA / "bdd100k_expected_coco.json"
REPO = Path(__file__).resolve().parents[1]


def expected_coco(uncertain: str) -> dict:
    expected = json.loads(EXPECTED.read_text())
    return {
        "info": {"description": bdd100k.DESCRIPTION, "uncertain": uncertain},
        "images": expected["images"],
        "annotations": expected["annotations"][uncertain],
        "categories": expected["categories"],
    }


# --------------------------------------------------------------------------------------
# Conversion of the hand-written sample


@pytest.mark.parametrize("uncertain", ["ignore", "remove", "merge"])
def test_sample_converts_to_the_expected_coco_json(tmp_path, uncertain):
    output = tmp_path / "out.json"
    bdd100k.convert_file(SAMPLE, output, uncertain=uncertain)
    assert json.loads(output.read_text()) == expected_coco(uncertain)


def test_class_ids_are_fixed_in_the_official_order():
    assert bdd100k.CATEGORY_IDS == {
        "pedestrian": 1,
        "rider": 2,
        "car": 3,
        "truck": 4,
        "bus": 5,
        "train": 6,
        "motorcycle": 7,
        "bicycle": 8,
        "traffic light": 9,
        "traffic sign": 10,
    }


def test_corner_boxes_use_the_inclusive_pixel_convention():
    assert bdd100k.corners_to_xywh(10, 20, 10, 20) == [10.0, 20.0, 1.0, 1.0]
    assert bdd100k.corners_to_xywh(0, 0, 1279, 719) == [0.0, 0.0, 1280.0, 720.0]


def test_summary_counts_and_reports_what_was_dropped(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="detr_train.data.bdd100k"):
        stats = bdd100k.convert_file(SAMPLE, tmp_path / "out.json", uncertain="ignore")
    assert (stats.frames, stats.images, stats.annotations) == (7, 7, 21)
    assert (stats.crowd, stats.ignore_regions, stats.without_box) == (2, 4, 2)
    assert [where.rsplit(" ", 1)[-1] for where in stats.inverted_boxes] == ["40", "41"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("2 inverted boxes")
    assert "b1d10d08-5b108225.jpg" in warnings[0]


def test_converted_json_loads_in_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    output = tmp_path / "out.json"
    bdd100k.convert_file(SAMPLE, output)
    coco = COCO(str(output))
    assert coco.getCatIds() == list(range(1, 11))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(bdd100k.CATEGORIES)
    assert len(coco.getImgIds()) == 7
    annotations_per_image = {i: len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()}
    assert annotations_per_image == {1: 11, 2: 5, 3: 0, 4: 0, 5: 2, 6: 2, 7: 1}
    assert len(coco.getAnnIds(iscrowd=False)) == 21 - 5  # 4 ignore regions + 1 crowd


# --------------------------------------------------------------------------------------
# Command line


def test_cli_help_describes_the_options():
    result = subprocess.run(
        [sys.executable, "-m", "detr_train.cli.bdd2coco", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    for option in ("--images-dir", "--uncertain", "{ignore,remove,merge}", "input", "output"):
        assert option in result.stdout


def test_cli_converts(tmp_path):
    output = tmp_path / "nested" / "out.json"
    bdd2coco.main([str(SAMPLE), str(output), "--uncertain", "merge"])
    assert json.loads(output.read_text()) == expected_coco("merge")
    assert [p.name for p in output.parent.iterdir()] == ["out.json"]  # no temp file left


def test_cli_reports_a_bad_file_in_one_line_with_status_two(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as exited:
        bdd2coco.main([str(bad), str(tmp_path / "out.json")])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"detr-train-bdd2coco: error: {bad}: not valid JSON") and "\n" not in error
    assert not (tmp_path / "out.json").exists()


def test_cli_reports_a_missing_file_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        bdd2coco.main([str(tmp_path / "missing.json"), str(tmp_path / "out.json")])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"detr-train-bdd2coco: error: {tmp_path / 'missing.json'}: No such file or directory")


# --------------------------------------------------------------------------------------
# Image sizes and missing images (--images-dir)


def write_image(path: Path, size=(1280, 720), boxes=()) -> None:
    """A JPEG with each box (x1, y1, x2, y2, colour) filled, so a model has something to see."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (90, 90, 90))
    draw = ImageDraw.Draw(image)
    for x1, y1, x2, y2, colour in boxes:
        draw.rectangle([x1, y1, x2, y2], fill=colour)
    image.save(path, quality=90)


def frame(name: str, *labels: dict, **extra) -> dict:
    return {"name": name, "labels": list(labels), **extra}


def box_label(label_id: str, category: str, x1, y1, x2, y2, **attributes) -> dict:
    return {
        "id": label_id,
        "category": category,
        "attributes": {"occluded": False, "truncated": False, **attributes},
        "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
    }


def test_images_dir_gives_real_sizes_unless_the_file_has_one(tmp_path):
    write_image(tmp_path / "small.jpg", size=(640, 360))
    write_image(tmp_path / "declared.jpg", size=(640, 360))
    frames = [frame("small.jpg"), frame("declared.jpg", size={"width": 1920, "height": 1080})]
    with_dir = bdd100k.convert_frames(frames, images_dir=tmp_path).coco["images"]
    without_dir = bdd100k.convert_frames(frames).coco["images"]
    assert [(i["width"], i["height"]) for i in with_dir] == [(640, 360), (1920, 1080)]
    assert [(i["width"], i["height"]) for i in without_dir] == [(1280, 720), (1920, 1080)]


def test_missing_images_are_dropped_with_a_counted_warning(tmp_path, caplog):
    images = tmp_path / "images"
    write_image(images / "present.jpg")
    labels = tmp_path / "labels.json"
    labels.write_text(
        json.dumps(
            [
                frame("gone-1.jpg", box_label("1", "car", 0, 0, 9, 9)),
                frame("present.jpg", box_label("2", "car", 10, 10, 19, 19)),
                frame("gone-2.jpg"),
            ]
        )
    )
    with caplog.at_level(logging.WARNING, logger="detr_train.data.bdd100k"):
        stats = bdd100k.convert_file(labels, tmp_path / "out.json", images_dir=images)
    coco = json.loads((tmp_path / "out.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == ["present.jpg"]
    assert [(a["id"], a["image_id"], a["bdd100k_id"]) for a in coco["annotations"]] == [(1, 1, "2")]
    assert stats.missing_images == ["gone-1.jpg", "gone-2.jpg"]
    assert "2 frames dropped because their image is missing: gone-1.jpg; gone-2.jpg" in caplog.text


def test_no_listed_image_found_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="none of the 2 images"):
        bdd100k.convert_frames([frame("a.jpg"), frame("b.jpg")], images_dir=tmp_path / "images")


# --------------------------------------------------------------------------------------
# Bad input: each a DatasetError naming the file and what is wrong; nothing is written


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('"just a string"', "expected the BDD100K detection format"),
        ('{"images": [], "annotations": [], "categories": []}', "already COCO json"),
        ('[["a list, not a frame"]]', r"frame 0: expected an object"),
        ('[{"labels": []}]', r"frame 0: 'name' .* missing"),
        ('[{"name": "a.jpg", "labels": {"x": 1}}]', r"frame 0 \(a.jpg\): 'labels' must be a list"),
        (
            '[{"name": "a.jpg", "labels": [{"id": "7", "category": "car", "box2d": {"x1": 1, "y1": 2, "x2": "3"}}]}]',
            r"frame 0 \(a.jpg\), label 7: box2d.x2 must be a finite number",
        ),
        (
            '[{"name": "a.jpg", "labels": [{"id": "7", "box2d": {"x1": 1, "y1": 2, "x2": 3, "y2": 4}}]}]',
            r"label 7: 'category' must be a string",
        ),
        (
            '[{"name": "a.jpg", "size": {"width": 0, "height": 720}, "labels": []}]',
            r"size.width must be a positive integer",
        ),
    ],
)
def test_malformed_label_files_are_clear_errors(tmp_path, content, message):
    labels = tmp_path / "det_val.json"
    labels.write_text(content)
    with pytest.raises(DatasetError, match=message) as error:
        bdd100k.convert_file(labels, tmp_path / "out.json")
    assert str(labels) in str(error.value)
    assert not (tmp_path / "out.json").exists()


def test_unknown_categories_are_all_listed_in_one_error(tmp_path):
    labels = tmp_path / "det_val.json"
    labels.write_text(
        json.dumps(
            [
                frame("a.jpg", box_label("1", "cat", 0, 0, 9, 9), box_label("2", "car", 0, 0, 9, 9)),
                frame("b.jpg", box_label("3", "cat", 0, 0, 9, 9), box_label("4", "tram", 0, 0, 9, 9)),
            ]
        )
    )
    with pytest.raises(DatasetError) as error:
        bdd100k.convert_file(labels, tmp_path / "out.json")
    message = str(error.value)
    assert "unknown BDD100K categories" in message
    assert "'cat': 2 box(es), first at" in message and "frame 0 (a.jpg), label 1" in message
    assert "'tram': 1 box(es)" in message and "frame 1 (b.jpg), label 4" in message
    assert "traffic sign" in message  # the known names are listed too
    assert not (tmp_path / "out.json").exists()


def test_unknown_uncertain_handling_is_an_error():
    with pytest.raises(DatasetError, match="ignore, remove, merge"):
        bdd100k.convert_frames([], uncertain="keep")


def test_scalabel_frames_wrapper_is_accepted(tmp_path):
    labels = tmp_path / "wrapped.json"
    labels.write_text(json.dumps({"frames": [frame("a.jpg", box_label("1", "bus", 0, 0, 9, 9))]}))
    assert bdd100k_layout.label_file_kind(labels) == "bdd"
    assert len(bdd100k_frames.load_bdd_frames(labels)) == 1


# --------------------------------------------------------------------------------------
# data=bdd100k: layout check, conversion cache, COCO json passed through


def data_config(root: Path, **overrides):
    """`conf/data/bdd100k.yaml` with `root` and overrides set, as the trainer sees it."""
    config = OmegaConf.load(REPO / "conf" / "data" / "bdd100k.yaml")
    config.root = str(root)
    for key, value in overrides.items():
        OmegaConf.update(config, key, value)
    return config


def make_bdd_tree(root: Path, splits: dict[str, list[dict]]) -> Path:
    """A miniature of the official layout: images/100k/<split>/*.jpg, labels/det_20/det_<split>.json."""
    colours = {name: (40 + 20 * i, 200 - 15 * i, 60 + 17 * i) for i, name in enumerate(bdd100k.CATEGORIES)}
    for split, frames in splits.items():
        for f in frames:
            boxes = [
                (*(lab["box2d"][k] for k in ("x1", "y1", "x2", "y2")), colours.get(lab["category"], (250, 250, 250)))
                for lab in f.get("labels") or []
            ]
            write_image(root / "images" / "100k" / split / f["name"], boxes=boxes)
        labels = root / "labels" / "det_20" / f"det_{split}.json"
        labels.parent.mkdir(parents=True, exist_ok=True)
        labels.write_text(json.dumps(frames))
    return root


def scene(index: int) -> dict:
    """One 1280x720 frame: small, medium and large boxes of several classes (always a
    pedestrian, a car and a truck, the uncertain classes' nearest ones), an ignore region
    of each uncertain class and a crowd box, none overlapping another."""
    classes = bdd100k.CATEGORIES
    return frame(
        f"scene-{index:03d}.jpg",
        box_label("1", classes[(index + 2) % 10], 40, 40, 339, 199),  # large
        box_label("2", classes[index % 10], 400, 60, 439, 139),  # medium
        box_label("3", classes[(index + 5) % 10], 500, 60, 511, 79),  # small
        box_label("4", "traffic sign", 560, 60, 579, 79),  # small
        box_label("9", "car", 1000, 40, 1199, 199),
        box_label("10", "truck", 400, 450, 699, 619),
        box_label("11", "pedestrian", 1220, 300, 1249, 379),
        box_label("5", "other person", 640, 300, 679, 399),
        box_label("6", "other vehicle", 760, 300, 959, 419),
        box_label("7", "trailer", 40, 450, 339, 619),
        box_label("8", "pedestrian", 1000, 450, 1199, 619, crowd=True),
        attributes={"weather": "clear", "scene": "city street", "timeofday": "daytime"},
    )


@pytest.fixture
def bdd_tree(tmp_path):
    return make_bdd_tree(
        tmp_path / "bdd100k",
        {"train": [scene(i) for i in range(4)], "val": [scene(i) for i in range(4, 7)] + [frame("empty.jpg")]},
    )


def test_wrong_layout_lists_everything_missing(tmp_path):
    root = tmp_path / "bdd100k"
    (root / "images" / "100k" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError) as error:
        bdd100k_layout.prepare(data_config(root))
    message = str(error.value)
    assert "data.train_images: " not in message  # that one exists
    for missing in (
        "data.val_images: " + str(root / "images" / "100k" / "val"),
        "data.train_ann: " + str(root / "labels" / "det_20" / "det_train.json"),
        "data.val_ann: " + str(root / "labels" / "det_20" / "det_val.json"),
        "images/100k/{train,val}",  # the expected layout is spelled out
    ):
        assert missing in message


def test_missing_root_is_reported(tmp_path):
    with pytest.raises(DatasetError, match=r"data.root: .*nowhere \(not a folder\)"):
        bdd100k_layout.prepare(data_config(tmp_path / "nowhere"))


def test_prepare_converts_once_into_a_cache_next_to_the_labels(bdd_tree):
    paths = bdd100k_layout.prepare(data_config(bdd_tree))
    cache = bdd_tree / "labels" / "det_20" / "coco"
    assert paths.train_ann == cache / "det_train_ignore.json"
    assert paths.val_ann == cache / "det_val_ignore.json"
    assert paths.train_images == bdd_tree / "images" / "100k" / "train"
    val = json.loads(paths.val_ann.read_text())
    assert [i["file_name"] for i in val["images"]][-1] == "empty.jpg"

    # Reused while newer than its source ...
    source = bdd_tree / "labels" / "det_20" / "det_val.json"
    os.utime(source, (1e9, 1e9))
    os.utime(paths.val_ann, (1e9, 2e9))
    bdd100k_layout.prepare(data_config(bdd_tree))
    assert paths.val_ann.stat().st_mtime == 2e9
    # ... converted again once the source is newer.
    os.utime(source, (1e9, 3e9))
    bdd100k_layout.prepare(data_config(bdd_tree))
    assert paths.val_ann.stat().st_mtime != 2e9
    assert json.loads(paths.val_ann.read_text()) == val


def test_prepare_caches_each_uncertain_handling_separately(bdd_tree, tmp_path):
    paths = bdd100k_layout.prepare(data_config(bdd_tree, uncertain="remove", cache_dir=str(tmp_path / "cache")))
    assert paths.train_ann == tmp_path / "cache" / "det_train_remove.json"
    assert json.loads(paths.train_ann.read_text())["info"]["uncertain"] == "remove"


def test_prepare_uses_coco_json_as_it_is(bdd_tree, tmp_path):
    coco_json = tmp_path / "val_coco.json"
    bdd100k.convert_file(bdd_tree / "labels" / "det_20" / "det_val.json", coco_json)
    paths = bdd100k_layout.prepare(data_config(bdd_tree, val_ann=str(coco_json)))
    assert paths.val_ann == coco_json
    assert paths.train_ann.name == "det_train_ignore.json"


def test_data_bdd100k_composes_and_dispatches_to_prepare(bdd_tree):
    from hydra import compose, initialize_config_dir

    from detr_train.config import config_dir

    with initialize_config_dir(str(config_dir()), version_base=None):
        cfg = compose("config", overrides=["data=bdd100k", f"data.root={bdd_tree}"])
    assert (cfg.data.image_size, cfg.data.eval_size, cfg.data.uncertain) == (800, 800, "ignore")
    paths = prepare_dataset(cfg.data)
    assert paths.val_ann.is_file() and paths.val_ann.parent.name == "coco"


def test_baseline_experiment_preset_composes():
    from hydra import compose, initialize_config_dir

    from detr_train.config import config_dir

    with initialize_config_dir(str(config_dir()), version_base=None):
        cfg = compose("config", overrides=["experiment=bdd100k_baseline", "data.root=/data/bdd100k"])
    assert cfg.name == "bdd100k_baseline"
    assert cfg.data.name == "bdd100k"
    assert cfg.model.name == "deformable_detr"
    assert cfg.model.pretrained == "SenseTime/deformable-detr"
    assert cfg.training.amp is True
    assert cfg.training.epochs == 50
    assert OmegaConf.to_container(cfg.training.resize_schedule) == [[1, 640], [20, 800], [40, 960]]
    assert cfg.data.sampler == "repeat_factor"


def test_tiles_experiment_is_the_baseline_on_native_resolution_tiles_and_passes_the_checks():
    from hydra import compose, initialize_config_dir

    from detr_train.config import config_dir
    from detr_train.config.checks import check_config

    with initialize_config_dir(str(config_dir()), version_base=None):
        baseline = compose("config", overrides=["experiment=bdd100k_baseline", "data.root=/data/bdd100k"])
        cfg = compose("config", overrides=["experiment=bdd100k_tiles", "data.root=/data/bdd100k"])
    check_config(cfg)  # tiles refuse a resize schedule: the preset turns it off
    assert cfg.name == "bdd100k_tiles"
    assert cfg.data.augment.tile.size == 640 and cfg.data.augment.crop.prob == 0 and cfg.data.augment.scales is None
    assert cfg.training.eval_slice == 640 and cfg.training.resize_schedule is None
    # Everything else is the baseline's.
    for key in ("model", "budget"):
        assert cfg[key] == baseline[key]
    differing = {k for k in cfg.training if cfg.training[k] != baseline.training[k]}
    assert differing == {"resize_schedule", "eval_slice"}


# --------------------------------------------------------------------------------------
# Round trip: converted json -> our dataset -> detections -> our evaluator


def converted_val(bdd_tree: Path, uncertain: str):
    from detr_train.data.coco import CocoDetectionDataset

    paths = bdd100k_layout.prepare(data_config(bdd_tree, uncertain=uncertain))
    return CocoDetectionDataset(paths.val_images, paths.val_ann), paths.val_ann


def detections_from_targets(dataset, score: float = 1.0) -> list[dict]:
    """Perfect predictions: every box the dataset gives the model, back in COCO ids."""
    detections = []
    for index in range(len(dataset)):
        target = dataset[index]["target"]
        for ann in target["annotations"]:
            detections.append(
                {
                    "image_id": target["image_id"],
                    "category_id": dataset.categories.category_id(ann["category_id"]),
                    "bbox": ann["bbox"],
                    "score": score,
                }
            )
    return detections


def detections_on(ann_file: Path, score: float, **where) -> list[dict]:
    """Detections exactly on the annotations of `ann_file` whose keys match `where`."""
    annotations = json.loads(ann_file.read_text())["annotations"]
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": score}
        for a in annotations
        if all(a[key] == value for key, value in where.items())
    ]


def evaluate(dataset, ann_file: Path, detections: list[dict]) -> dict:
    from detr_train.evaluation.coco import load_coco_ground_truth, score_detections

    return score_detections(load_coco_ground_truth(ann_file), detections, dataset.image_ids).metrics


def test_round_trip_perfect_predictions_score_map_one(bdd_tree):
    dataset, ann_file = converted_val(bdd_tree, "ignore")
    assert len(dataset) == 4 and dataset.image_info(0)["width"] == 1280
    assert dataset.categories.names == list(bdd100k.CATEGORIES)
    metrics = evaluate(dataset, ann_file, detections_from_targets(dataset))
    for name in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large"):
        assert metrics[name] == pytest.approx(1.0), name
    # Per-class AP: 1 for every class with (non-ignored) ground truth, n/a (-1) for the rest.
    coco = json.loads(ann_file.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    with_ground_truth = {names[a["category_id"]] for a in coco["annotations"] if not a["iscrowd"]}
    assert metrics["map_per_class"] == pytest.approx(
        {name: (1.0 if name in with_ground_truth else -1.0) for name in bdd100k.CATEGORIES}
    )


def test_ignore_regions_are_neither_rewarded_nor_penalised(bdd_tree):
    dataset, ann_file = converted_val(bdd_tree, "ignore")
    perfect = detections_from_targets(dataset, score=0.5)
    assert not any(ann["iscrowd"] for i in range(len(dataset)) for ann in dataset[i]["target"]["annotations"])
    on_ignored = detections_on(ann_file, score=0.99, iscrowd=1)
    assert len(on_ignored) == 3 * 4  # 3 scenes, each with 3 uncertain boxes and 1 crowd box
    assert evaluate(dataset, ann_file, perfect)["map"] == pytest.approx(1.0)
    assert evaluate(dataset, ann_file, perfect + on_ignored)["map"] == pytest.approx(1.0)


def test_removed_and_merged_uncertain_boxes_count_as_background_and_objects(bdd_tree):
    ignore_dataset, ignore_ann = converted_val(bdd_tree, "ignore")
    on_uncertain = detections_on(ignore_ann, score=0.99, ignore=1)
    assert len(on_uncertain) == 3 * 3

    # remove: the uncertain regions are background, so confident detections there are false positives.
    dataset, ann_file = converted_val(bdd_tree, "remove")
    perfect = detections_from_targets(dataset, score=0.5)
    assert evaluate(dataset, ann_file, perfect)["map"] == pytest.approx(1.0)
    metrics = evaluate(dataset, ann_file, perfect + on_uncertain)
    assert metrics["map"] < 0.9
    for name in ("pedestrian", "car", "truck"):
        assert metrics["map_per_class"][name] < 0.6

    # merge: they are ordinary objects, so missing them costs recall.
    dataset, ann_file = converted_val(bdd_tree, "merge")
    perfect = detections_from_targets(dataset)
    assert evaluate(dataset, ann_file, perfect)["map"] == pytest.approx(1.0)
    uncertain_boxes = {(d["image_id"], tuple(d["bbox"])) for d in on_uncertain}
    without_uncertain = [d for d in perfect if (d["image_id"], tuple(d["bbox"])) not in uncertain_boxes]
    assert len(without_uncertain) == len(perfect) - 9
    metrics = evaluate(dataset, ann_file, without_uncertain)
    assert metrics["map"] < 0.9
    for name in ("pedestrian", "car", "truck"):
        assert metrics["map_per_class"][name] < 0.6


# --------------------------------------------------------------------------------------
# End to end: `detr-train data=bdd100k` on a miniature tree


@pytest.mark.slow
def test_data_bdd100k_trains_one_short_epoch(bdd_tree, tmp_path):
    outputs = tmp_path / "outputs"
    command = [
        sys.executable,
        "-m",
        "detr_train",
        "data=bdd100k",
        f"data.root={bdd_tree}",
        "model=deformable_detr_tiny",
        "training.epochs=1",
        "training.batch_size=2",
        "data.num_workers=0",
        "data.image_size=160",
        "data.eval_size=160",
        f"output_root={outputs}",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (bdd_tree / "labels" / "det_20" / "coco" / "det_train_ignore.json").is_file()
    metric_logs = list(outputs.rglob("metrics.jsonl"))
    assert len(metric_logs) == 1
    lines = [json.loads(line) for line in metric_logs[0].read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["epoch"] == 1
    for name in ("map", "map_small", "map_medium", "map_large"):
        assert 0.0 <= lines[0][name] <= 1.0
    assert list(lines[0]["map_per_class"]) == list(bdd100k.CATEGORIES)
