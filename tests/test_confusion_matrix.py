"""The detection confusion matrix: exact counts of a constructed case, its picture, and what
`detr-train-eval` and a training run write."""

from __future__ import annotations

import contextlib
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from detr_train.evaluation.confusion import BACKGROUND, confusion_matrix
from detr_train.reporting import plots
from tests.conftest import spy_on

SCORE_THRESHOLD = 0.3
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "bird"}]  # sparse ids on purpose
CAT, DOG, BIRD = 1, 3, 7


def _coco(annotations: list[tuple[int, int, list[float], int]], image_ids: list[int]) -> COCO:
    """Ground truth from (image id, category id, bbox xywh, iscrowd)."""
    dataset = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in image_ids],
        "annotations": [{"id": n, "image_id": image, "category_id": category, "bbox": box, "area": box[2] * box[3],
                         "iscrowd": crowd} for n, (image, category, box, crowd) in enumerate(annotations, start=1)],
        "categories": CATEGORIES,
    }
    ground_truth = COCO()
    ground_truth.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
    return ground_truth


def _detection(image_id: int, category_id: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


# Image 5 holds an object and a detection but is not among the evaluated images.
GROUND_TRUTH = [
    (1, CAT, [10, 10, 50, 50], 0), (1, DOG, [100, 100, 60, 40], 0),
    (2, BIRD, [20, 30, 80, 80], 0), (2, CAT, [150, 150, 40, 40], 0),
    (3, CAT, [0, 0, 100, 100], 1), (3, DOG, [120, 120, 50, 50], 0),
    (5, CAT, [0, 0, 50, 50], 0),
    (6, CAT, [0, 0, 100, 100], 0), (6, DOG, [60, 0, 100, 100], 0),
]
DETECTIONS = [
    _detection(1, CAT, [10, 10, 50, 50], 0.9),     # the cat, exactly: cat -> cat
    _detection(1, CAT, [100, 100, 60, 52], 0.8),   # the dog (IoU 0.77) called a cat: dog -> cat
    _detection(1, DOG, [10, 10, 50, 40], 0.7),     # the cat again (IoU 0.8), already taken: false dog
    _detection(2, BIRD, [20, 30, 80, 32], 0.9),    # the bird at IoU 0.4 only: false bird, and the bird missed
    _detection(2, CAT, [150, 150, 40, 40], 0.2),   # the cat exactly, under the score threshold: the cat missed
    _detection(2, DOG, [0, 0, 10, 10], 0.5),       # nothing there: false dog
    _detection(3, CAT, [10, 10, 20, 20], 0.9),     # inside the crowd region: not counted
    _detection(3, BIRD, [90, 90, 20, 20], 0.4),    # a quarter inside the crowd region: false bird
    _detection(3, DOG, [120, 120, 50, 30], 0.6),   # the dog at IoU 0.6: dog -> dog
    _detection(4, BIRD, [5, 5, 20, 20], 0.3),      # an empty image, at exactly the threshold: false bird
    _detection(5, CAT, [0, 0, 50, 50], 0.9),       # an image not evaluated
    # Greedy by IoU, not by score: the dog detection overlaps the cat (IoU 0.56) more than the
    # dog (0.52), but the cat detection claims the cat first (IoU 0.95), so both are right.
    _detection(6, DOG, [28, 0, 100, 100], 0.9),
    _detection(6, CAT, [0, 0, 95, 100], 0.6),
]
EVALUATED = [1, 2, 3, 4, 6]
#                   predicted: cat dog bird background     ground truth:
EXPECTED = np.array([[2, 0, 0, 1],                          # cat
                     [1, 2, 0, 0],                          # dog
                     [0, 0, 0, 1],                          # bird
                     [0, 2, 3, 0]])                         # background


def test_a_constructed_case_gives_the_exact_matrix():
    matrix = confusion_matrix(_coco(GROUND_TRUTH, EVALUATED + [5]), DETECTIONS, EVALUATED,
                              score_threshold=SCORE_THRESHOLD)
    assert matrix.labels == ["cat", "dog", "bird", BACKGROUND]
    np.testing.assert_array_equal(matrix.counts, EXPECTED)
    assert matrix.as_dict() == {"classes": ["cat", "dog", "bird", "background"], "counts": EXPECTED.tolist(),
                                "rows": "ground truth", "columns": "predicted", "iou": 0.5, "score_threshold": 0.3}
    assert matrix.summary() == ("4 objects found as their class, 1 as another, 2 missed, 5 false detections "
                                "(IoU >= 0.5, score >= 0.3)")


def test_the_sum_over_images_is_the_matrix_of_the_whole():
    """Per image then summed: any split of the images (DDP shards) adds up to the same counts."""
    ground_truth = _coco(GROUND_TRUTH, EVALUATED + [5])
    parts = [confusion_matrix(ground_truth, DETECTIONS, ids, score_threshold=SCORE_THRESHOLD).counts
             for ids in ([1, 3], [2, 4, 6])]
    np.testing.assert_array_equal(parts[0] + parts[1], EXPECTED)


def test_without_detections_every_object_is_missed():
    matrix = confusion_matrix(_coco(GROUND_TRUTH, EVALUATED + [5]), [], EVALUATED, score_threshold=SCORE_THRESHOLD)
    # cat: images 1, 2, 6; dog: 1, 3, 6; bird: 2 (the crowd region and image 5 do not count)
    np.testing.assert_array_equal(matrix.counts[:, -1], [3, 3, 1, 0])
    assert matrix.counts[:, :-1].sum() == 0


def _cell_texts(figure) -> np.ndarray:
    """The numbers written in the cells of a confusion-matrix figure, as a grid."""
    axes = figure.axes[0]
    size = len(axes.get_xticks())
    grid = np.full((size, size), -1)
    for text in axes.texts:
        column, row = text.get_position()
        grid[int(row), int(column)] = int(text.get_text())
    return grid


def test_the_picture_holds_the_counts_and_row_shares(tmp_path, monkeypatch):
    saved = spy_on(monkeypatch, plots, "_save_figure")
    labels = ["cat", "dog", "bird", BACKGROUND]
    path = plots.plot_confusion_matrix(EXPECTED, labels, tmp_path / "confusion_matrix.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300
    figure = saved[0]["args"][0]
    axes = figure.axes[0]
    np.testing.assert_array_equal(_cell_texts(figure), EXPECTED)  # every cell, zeros too
    assert [t.get_text() for t in axes.get_xticklabels()] == labels == [t.get_text() for t in axes.get_yticklabels()]
    assert "ground-truth" in axes.get_ylabel() and "predicted" in axes.get_xlabel()
    # Shaded by the share of the row: the cat row 2 of 3 -> cat, 1 of 3 missed.
    shares = np.asarray(axes.images[0].get_array())
    np.testing.assert_allclose(shares[0], [2 / 3, 0, 0, 1 / 3])
    np.testing.assert_allclose(shares[3], [0, 0.4, 0.6, 0])
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temp file left
    with pytest.raises(ValueError, match="4 labels"):
        plots.plot_confusion_matrix(EXPECTED[:3], labels, tmp_path / "bad.png")


@pytest.mark.slow
def test_eval_writes_the_matrix_of_its_own_detections(trained_run, tmp_path, monkeypatch, caplog):
    from tests.test_eval_predict import _in_process

    drawn = spy_on(monkeypatch, plots, "plot_confusion_matrix")
    caplog.set_level(logging.INFO, logger="detr_train.eval")
    output = tmp_path / "scores"
    code, stderr = _in_process("cli.evaluate", trained_run.run_dir, "training.vis_score_threshold=0.05",
                               "--output", output)
    assert code == 0, stderr[-3000:]
    report = json.loads((output / "metrics.json").read_text())
    detections = json.loads((output / "detections.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(report["annotations"])
    image_ids = trained_run.trainer.data.val.image_ids
    expected = confusion_matrix(ground_truth, detections, image_ids, score_threshold=0.05)
    assert report["confusion_matrix"] == expected.as_dict()
    assert report["confusion_matrix"]["score_threshold"] == 0.05
    # The picture shows those counts, and the numbers add up to the data: every object of the
    # evaluated images in its class's row, every detection kept in its class's column.
    (call,) = drawn
    np.testing.assert_array_equal(call["args"][0], expected.counts)
    assert call["args"][2] == output / "confusion_matrix.png"
    with Image.open(output / "confusion_matrix.png") as image:
        assert image.format == "PNG"
    counts = np.array(report["confusion_matrix"]["counts"])
    objects = ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=image_ids, iscrowd=False))
    assert counts[:-1].sum() == len(objects) > 0
    assert counts[:, :-1].sum() == sum(d["score"] >= 0.05 for d in detections) > 0
    assert f"Confusion matrix: {expected.summary()}" in caplog.text


@pytest.mark.slow
def test_training_draws_the_matrix_at_each_evaluation(trained_run):
    # The shared run draws every detection (training.vis_score_threshold=0.0): the top scores
    # per image of its queries x classes (at most 100), and every object of the evaluated images.
    ground_truth = trained_run.trainer.evaluator.coco_gt
    image_ids = trained_run.trainer.data.val.image_ids
    model = trained_run.trainer.model.config
    per_image = min(100, model.num_queries * model.num_labels)
    objects = len(ground_truth.getAnnIds(imgIds=image_ids, iscrowd=False))
    calls = trained_run.confusion_calls
    assert len(calls) == len([record for record in trained_run.records if "map" in record]) == 2
    for epoch, call in enumerate(calls, start=1):
        counts, labels, path = call["args"]
        assert labels == [*trained_run.trainer.data.class_names, BACKGROUND]
        assert path == trained_run.run_dir / "plots" / "confusion_matrix.png"
        assert call["kwargs"]["title"] == f"Confusion matrix, epoch {epoch} (IoU >= 0.5, score >= 0)"
        assert counts[:-1].sum() == objects and counts[:, :-1].sum() == per_image * len(image_ids)
