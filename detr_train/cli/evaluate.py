"""`detr-train-eval`: score a trained model on a COCO-format split, without training.

    detr-train-eval outputs/default/2026-11-27_10-00-00            # the run's best.pt, its val split
    detr-train-eval run/checkpoints/epoch_010.pt training.val_subset_size=null
    detr-train-eval run/hf_model data=coco data.root=/data/coco    # an exported folder
    detr-train-eval run/ --slice 512 --slice-overlap 0.2          # tiles + whole images (small objects)

The scored images are the ones the run itself evaluates on (its config, overrides
applied), in the same batches, so the mAP of `best.pt` is the one its metrics.jsonl logged;
that includes sliced evaluation when the run used it (`training.eval_slice`; `--slice`
changes it, `--slice 0` turns it off).
Writes `metrics.json` (mAP, AP50/75, AP small/medium/large, AR, per-class AP, and the
confusion matrix's counts at IoU 0.5 and score >= `training.vis_score_threshold`), the
detections as a COCO results file, and the per-class AP, precision-recall and confusion
matrix plots.
Under torchrun each process scores a shard; rank 0 gathers and writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from detr_train.checkpointing.atomic import atomic_write
from detr_train.cli.common import (
    add_common_arguments,
    add_slice_arguments,
    claim_output_dir,
    refuse_taken_output,
    run_command,
    slice_overrides,
)
from detr_train.errors import DetrTrainError

log = logging.getLogger("detr_train.eval")

PROGRAM = "detr-train-eval"
EVAL_METRICS_FILE = "metrics.json"
DETECTIONS_FILE = "detections.json"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"


class ClassMismatchError(DetrTrainError, ValueError):
    """The model predicts other classes than the dataset defines."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="Score a checkpoint, a run directory (its best.pt) or an exported model folder "
                                  "on a COCO-format split.")
    parser.add_argument("model", type=Path, help="a checkpoint file, a run directory or a save_pretrained folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="changes to the run's config (data.root=..., data.val_ann=..., "
                             "training.val_subset_size=null, training.batch_size=8)")
    parser.add_argument("--output", type=Path, default=None,
                        help="results folder (default: <run dir>/eval/<checkpoint name>, + _slice<N> when sliced)")
    add_slice_arguments(parser)
    add_common_arguments(parser)
    return parser


def default_output(source: Path, slice_size: int | None = None) -> Path:
    from detr_train.checkpointing.checkpointer import CHECKPOINT_DIR

    # Sliced results go beside the unsliced ones, so both can be kept.
    suffix = "" if not slice_size else f"_slice{slice_size}"
    if source.is_dir():  # an exported folder: beside it, not inside it
        return source.parent / "eval" / f"{source.name}{suffix}"
    if source.parent.name == CHECKPOINT_DIR:
        return source.parent.parent / "eval" / f"{source.stem}{suffix}"
    return source.parent / f"eval_{source.stem}{suffix}"


def check_classes(model_classes: list[str], data_classes: list[str], annotations: Path) -> None:
    if model_classes != data_classes:
        raise ClassMismatchError(
            f"the model predicts {len(model_classes)} classes ({', '.join(model_classes[:8])}"
            f"{', ...' if len(model_classes) > 8 else ''}) but {annotations} defines {len(data_classes)} "
            f"({', '.join(data_classes[:8])}{', ...' if len(data_classes) > 8 else ''})",
            hint="evaluate on the dataset the model was trained for (data.root=..., data.val_ann=...)",
        )


def evaluate(args: argparse.Namespace) -> None:
    from detr_train.distributed import collectives as distributed
    from detr_train.distributed.launch import context_from_environment

    ctx = context_from_environment()
    distributed.quiet_non_main_logging(ctx)
    distributed.start(ctx, args.device or "auto")
    try:
        _evaluate(args, ctx)
    finally:
        distributed.stop(ctx)


def _evaluate(args: argparse.Namespace, ctx) -> None:
    from detr_train.data.build import build_evaluation_data, evaluation_sampler, make_loader
    from detr_train.data.collate import DetrCollator
    from detr_train.distributed import collectives as distributed
    from detr_train.evaluation.coco import format_per_class_table, load_coco_ground_truth
    from detr_train.evaluation.confusion import confusion_matrix
    from detr_train.evaluation.evaluator import Evaluator
    from detr_train.evaluation.inference import load_for_inference, locate_model
    from detr_train.evaluation.slicing import SliceSettings, sliced_collator
    from detr_train.modeling.fast_paths import apply_fast_paths
    from detr_train.modeling.precision import resolve_precision
    from detr_train.training.runtime import resolve_device, show_progress

    overrides = list(args.overrides) + slice_overrides(args)
    # The output folder's name needs the slice size before the model (and its config) loads.
    output = args.output or default_output(locate_model(args.model)[1], args.slice)
    if ctx.is_main:
        refuse_taken_output(output, overwrite=args.overwrite)
    device = distributed.device_for(ctx, resolve_device(args.device or "auto"))
    loaded = load_for_inference(args.model, overrides, device)
    cfg = loaded.cfg
    slicing = SliceSettings.from_training(cfg.training)
    with distributed.main_first(ctx):
        data = build_evaluation_data(cfg.data, cfg.training, cfg.budget)
    check_classes(loaded.class_names, data.class_names, data.val_ann)
    apply_fast_paths(loaded.model, cfg.model, cfg.training, device)
    precision = resolve_precision(cfg.training.amp, cfg.training.amp_dtype, device)
    progress = show_progress("auto" if args.progress is None else args.progress)
    # The batches training evaluated with: padding depends on the batch, so the numbers match.
    sampler = evaluation_sampler(len(data.val), cfg.training.batch_size, cfg.data.eval_size, ctx)
    collator = sliced_collator(DetrCollator(loaded.processor, cfg.data.max_size_ratio), loaded.processor, slicing,
                               cfg.training.batch_size)
    loader = make_loader(data.val, sampler, collator, cfg.data, cfg.training.seed, device)
    evaluator = Evaluator(loaded.processor, precision, device, load_coco_ground_truth(data.val_ann),
                          data.val.image_ids, data.val.categories.category_id, dist=ctx, progress=progress,
                          slicing=slicing)
    evaluation = evaluator(loaded.model, loader)
    if not ctx.is_main:
        return
    metrics = evaluation.metrics
    detections = sorted(evaluation.scores.detections, key=lambda d: (d["image_id"], -d["score"]))
    scores = evaluation.scores
    # The detections the run's prediction images draw: one threshold for every picture.
    confusion = confusion_matrix(scores.ground_truth, scores.detections, scores.image_ids,
                                 score_threshold=cfg.training.vis_score_threshold)
    claim_output_dir(output, overwrite=args.overwrite)
    report = {"model": str(loaded.source), "weights": loaded.weights, "epoch": loaded.epoch,
              "annotations": str(data.val_ann), "images": len(data.val),
              "slicing": None if slicing is None else dataclasses.asdict(slicing), "metrics": metrics,
              "confusion_matrix": confusion.as_dict()}
    atomic_write(output / DETECTIONS_FILE, json.dumps(detections))
    _plot(scores, confusion, output)
    atomic_write(output / EVAL_METRICS_FILE, json.dumps(report, indent=2) + "\n")  # last: the results are complete
    if slicing is not None:
        log.info("Sliced: %d px tiles overlapping by %.2f, merged at IoU %.2f", slicing.size, slicing.overlap,
                 slicing.iou_threshold)
    log.info("mAP %.4f (AP50 %.4f, AP75 %.4f, small %.4f, medium %.4f, large %.4f) on %d images of %s",
             metrics["map"], metrics["map_50"], metrics["map_75"], metrics["map_small"], metrics["map_medium"],
             metrics["map_large"], len(data.val), data.val_ann)
    if len(metrics["map_per_class"]) > 1:
        log.info("per-class AP:\n%s", format_per_class_table(metrics["map_per_class"]))
    log.info("Confusion matrix: %s", confusion.summary())
    log.info("Wrote %s, %s and plots to %s", EVAL_METRICS_FILE, DETECTIONS_FILE, output)


def _plot(scores, confusion, output: Path) -> None:
    from detr_train.reporting.plots import plot_confusion_matrix, plot_per_class_ap, plot_precision_recall

    plot_per_class_ap(scores.metrics["map_per_class"], output / "per_class_ap.png")
    if scores.precision is not None:
        plot_precision_recall(scores.precision, scores.recall_thresholds, scores.class_names,
                              output / "pr_curves.png")
    plot_confusion_matrix(confusion.counts, confusion.labels, output / CONFUSION_MATRIX_FILE,
                          title=f"Confusion matrix ({confusion.describe()})")


def main(argv: list[str] | None = None) -> None:
    run_command(PROGRAM, build_parser(), evaluate, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
