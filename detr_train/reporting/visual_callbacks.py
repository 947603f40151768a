"""Results you can see: plots, prediction images and TensorBoard events, as Trainer callbacks.

What each writes into the run directory (main process only):

    training_curves.png           every epoch, from metrics.jsonl     training.plots
    plots/per_class_ap.png        at each evaluation (replaced)        training.plots
    plots/pr_curves.png           at each evaluation (replaced)        training.plots
    plots/confusion_matrix.png    at each evaluation (replaced)        training.plots
    vis/epoch_NNNN/<stem>.jpg     at each evaluation                   training.vis_images=N
    tensorboard/                  every epoch: scalars and images      logger=tensorboard

The curves are redrawn from metrics.jsonl rather than from memory, so a resumed run's
picture includes the epochs before the resume. The per-class AP and the precision-recall
curves come from the COCOeval run that scored the epoch (`EpochResult.scores`), so they
agree with the logged mAP to the last digit; the confusion matrix counts the same detections
(those scoring at least `training.vis_score_threshold`, as the prediction images draw them).
Prediction images show the first N validation images, the same ones every time, predictions
on the left (scored by the same weights as the logged mAP) and the ground truth on the right.

A picture must never cost a training run: every drawing runs inside `_drawing`, which turns
any error into one warning, and every file is written atomically, so a failure leaves the
previous picture in place. The one exception is deliberate: `logger=tensorboard` without
the package stops the run before its first step (config checks catch it earlier).
`reporting.trackers` adds TensorBoardLogging (and MLflow) after the drawing callbacks.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from detr_train.checkpointing.atomic import remove_temp_files
from detr_train.checkpointing.metrics_log import MetricsLog
from detr_train.config.checks import TENSORBOARD_MISSING
from detr_train.data.coco import SampleRequest
from detr_train.errors import ConfigError
from detr_train.evaluation.confusion import confusion_matrix
from detr_train.reporting import drawing, plots
from detr_train.reporting.tensorboard import MissingDependencyError, TensorBoardWriter
from detr_train.training.callbacks import Callback, EpochResult

if TYPE_CHECKING:
    from detr_train.config.schema import TrainingConfig
    from detr_train.training.callbacks import Trainer

log = logging.getLogger(__name__)

CURVES_FILE = "training_curves.png"
PLOTS_FOLDER = "plots"
PER_CLASS_AP_FILE = "per_class_ap.png"
PR_CURVES_FILE = "pr_curves.png"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
VIS_FOLDER = "vis"
TENSORBOARD_FOLDER = "tensorboard"


def visual_callbacks(train_cfg: TrainingConfig) -> list[Callback]:
    """The drawing callbacks that `training.plots` and `training.vis_images` ask for."""
    callbacks: list[Callback] = []
    if train_cfg.plots:
        callbacks += [TrainingCurves(), EvaluationPlots(train_cfg.vis_score_threshold)]
    if train_cfg.vis_images:
        callbacks.append(PredictionImages(train_cfg.vis_images, train_cfg.vis_score_threshold))
    return callbacks


@contextlib.contextmanager
def _drawing(what: str, epoch: int) -> Iterator[None]:
    """Any error in the block becomes one warning: the run goes on without the picture."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - deliberately broad: a plot must never end a run
        log.warning("Could not draw %s after epoch %d (training goes on): %s: %s",
                    what, epoch, type(error).__name__, error)
        log.debug("the error while drawing %s", what, exc_info=True)


def _epoch_folder(epoch: int) -> str:
    # Four digits, as checkpoints/epoch_NNNN.pt, so the folders sort in epoch order.
    return f"epoch_{epoch:04d}"


class TrainingCurves(Callback):
    """<run dir>/training_curves.png: losses, LR, mAP, AP50 and AP_small, redrawn every epoch."""

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        if not trainer.dist.is_main:
            return
        with _drawing("the training curves", result.epoch):
            started = time.perf_counter()
            # LogMetrics has appended this epoch already (it runs first), and at fit start it
            # dropped records newer than the resumed checkpoint: the file is the run's history.
            records = MetricsLog.of_run(trainer.run_dir).read()
            plots.plot_training_curves(records, trainer.run_dir / CURVES_FILE)
            log.debug("training curves drawn in %.2fs", time.perf_counter() - started)


class EvaluationPlots(Callback):
    """plots/per_class_ap.png, plots/pr_curves.png and plots/confusion_matrix.png from the
    epoch's COCOeval and its detections, replaced at each evaluation (the per-class numbers of
    every evaluation are in metrics.jsonl; a matrix per epoch there would be noise)."""

    def __init__(self, score_threshold: float):
        self.score_threshold = score_threshold  # of the detections the confusion matrix counts

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            remove_temp_files(trainer.run_dir / PLOTS_FOLDER)  # of a write a kill cut short

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        if not trainer.dist.is_main or not result.evaluated:
            return
        folder = trainer.run_dir / PLOTS_FOLDER
        paths = []
        with _drawing("the per-class AP", result.epoch):
            paths.append(plots.plot_per_class_ap(result.record["map_per_class"], folder / PER_CLASS_AP_FILE,
                                                     title=f"AP@[.5:.95] per class, epoch {result.epoch}"))
        scores = result.scores
        if scores is None or scores.precision is None:
            # No detections at all: COCOeval made no precision array, there is no curve to draw.
            log.info("No precision-recall curves after epoch %d: the model made no detections", result.epoch)
        else:
            with _drawing("the precision-recall curves", result.epoch):
                paths.append(plots.plot_precision_recall(scores.precision, scores.recall_thresholds,
                                                             scores.class_names, folder / PR_CURVES_FILE))
        if scores is not None and scores.ground_truth is not None:
            with _drawing("the confusion matrix", result.epoch):
                started = time.perf_counter()
                matrix = confusion_matrix(scores.ground_truth, scores.detections, scores.image_ids,
                                          score_threshold=self.score_threshold)
                paths.append(plots.plot_confusion_matrix(
                    matrix.counts, matrix.labels, folder / CONFUSION_MATRIX_FILE,
                    title=f"Confusion matrix, epoch {result.epoch} ({matrix.describe()})"))
                log.debug("confusion matrix drawn in %.2fs", time.perf_counter() - started)
        for path in paths:
            result.add_pictures(f"plots/{path.stem}", [path])


class PredictionImages(Callback):
    """vis/epoch_NNNN/<image stem>.jpg: predictions | ground truth on the first `count`
    validation images, at each evaluation.

    The boxes are the evaluation's own detections (of the weights its mAP scores, the EMA
    when there is one): no second forward pass. Boxes scoring under `score_threshold` are
    left out; the ground truth is drawn whole.
    """

    def __init__(self, count: int, score_threshold: float):
        self.count = count
        self.score_threshold = score_threshold
        self._dataset = None
        self._names: list[str] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        # A kill while saving an epoch's images leaves a temp file behind, and that epoch may
        # never be redone (its checkpoint was saved before the images were drawn).
        for folder in sorted((trainer.run_dir / VIS_FOLDER).glob("epoch_*")):
            remove_temp_files(folder)

    def _choose(self, trainer: Trainer) -> None:
        val = trainer.data.val
        ids = val.image_ids[:self.count]
        if len(ids) < self.count:
            log.info("training.vis_images=%d but the validation set has %d images: drawing all of them",
                     self.count, len(ids))
        self._dataset = val.subset(ids)
        self._dataset.augmenter = None  # the images as they are
        names = [Path(self._dataset.image_info(i)["file_name"]).stem for i in range(len(ids))]
        # Two files may share a stem in different folders: the image id tells them apart.
        self._names = [name if names.count(name) == 1 else f"{name}_{image_id}" for name, image_id in zip(names, ids)]

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        if not trainer.dist.is_main or not result.evaluated:
            return
        with _drawing("the prediction images", result.epoch):
            started = time.perf_counter()
            if self._dataset is None:
                self._choose(trainer)
            images = self._draw(trainer, result.scores.detections)
            folder = trainer.run_dir / VIS_FOLDER / _epoch_folder(result.epoch)
            for name, image in zip(self._names, images):
                drawing.save_image(image, folder / f"{name}.jpg")
            result.add_pictures("predictions", images)
            log.debug("%d prediction images drawn in %.2fs", len(images), time.perf_counter() - started)

    def _draw(self, trainer: Trainer, detections: list[dict]) -> list[torch.Tensor]:
        """The evaluation's own detections of these images (gathered from every rank), drawn."""
        dataset = self._dataset
        # Each image unaugmented, as the Evaluator read it; the boxes are in its pixels.
        samples = [dataset[SampleRequest(index, trainer.cfg.data.eval_size, 0)] for index in range(len(dataset))]
        wanted = {sample["target"]["image_id"] for sample in samples}
        categories = dataset.categories
        per_image: dict[int, list[dict]] = {}
        for detection in detections:
            if detection["image_id"] in wanted:  # category ids back to the model's class indices
                per_image.setdefault(detection["image_id"], []).append(
                    {**detection, "category_id": categories.label(detection["category_id"])})
        return [
            drawing.compare_with_ground_truth(
                sample["image"], drawing.coco_detections_drawable(per_image.get(sample["target"]["image_id"], [])),
                _ground_truth(sample["target"]["annotations"]), trainer.data.class_names,
                score_threshold=self.score_threshold,
            )
            for sample in samples
        ]


def _ground_truth(annotations: list[dict]) -> dict[str, Any]:
    return {"boxes": drawing.xywh_to_xyxy([a["bbox"] for a in annotations]),
            "labels": [a["category_id"] for a in annotations]}


def _read_png(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return pil_to_tensor(image.convert("RGB"))


class TensorBoardLogging(Callback):
    """<run dir>/tensorboard: every metrics.jsonl record's numbers (tags as in
    `detr_train.reporting.tensorboard`) at the epoch's global step, and the pictures the
    callbacks before it drew this epoch (`EpochResult.pictures`): `predictions/<i>` (vis
    images), `plots/per_class_ap/0`, `plots/pr_curves/0`, `plots/confusion_matrix/0`."""

    def __init__(self) -> None:
        self.writer: TensorBoardWriter | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        try:
            self.writer = TensorBoardWriter(trainer.run_dir / TENSORBOARD_FOLDER)
        except MissingDependencyError as error:
            # check_config refuses this before a run dir exists; a config from a checkpoint or
            # built in code arrives here, still before the first training step.
            raise ConfigError(TENSORBOARD_MISSING) from error

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        if self.writer is None:
            return
        step = int(result.record["global_step"])
        with _drawing("the TensorBoard events", result.epoch):
            self.writer.log_record(dict(result.record), step)
            for tag, pictures in result.pictures.items():
                images = [_read_png(picture) if isinstance(picture, Path) else picture for picture in pictures]
                self.writer.log_images(tag, images, step)
            # Each epoch visible in a live TensorBoard now, not after flush_secs.
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
