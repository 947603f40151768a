"""What a user looks at after (or during) a run: training curves, per-class AP, PR curves and the
confusion matrix.

Pure functions with no knowledge of the training loop: the caller hands in metrics.jsonl
records or COCOeval arrays and gets back a file path.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot), so no
global backend is switched in the user's process and no display is needed; every file
is written through `atomic_write`, so a viewer that polls a plot while the trainer
redraws it sees the old picture or the new one, never half a PNG. A class keeps its
colour (`colors.class_color`) across epochs and figures.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from detr_train.checkpointing.atomic import atomic_write
from detr_train.reporting.colors import Color, class_color, readable_text_color

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# COCOeval's accumulate() layout: eval["precision"] has shape [T, R, K, A, M] =
#   T  IoU thresholds      params.iouThrs = 0.50, 0.55, ..., 0.95  -> index 0 is 0.50, 5 is 0.75
#   R  recall thresholds   params.recThrs = 0.00, 0.01, ..., 1.00  (101 points)
#   K  categories          params.catIds, sorted category ids (class_names must follow them)
#   A  area ranges         params.areaRngLbl = all, small, medium, large -> index 0 is "all"
#   M  max detections      params.maxDets = 1, 10, 100                   -> index 2 (-1) is 100
# An entry is -1 where the class has no ground truth in that area range ("no data"); a
# class with ground truth has 0 precision at recall levels it never reaches. AP at one
# IoU is the mean over R; AP@[.5:.95] the mean over T and R (summarize() does the same).
# ---------------------------------------------------------------------------------------
COCO_IOU_THRESHOLDS = tuple(float(t) for t in np.linspace(0.5, 0.95, 10))
IOU_50_INDEX = 0
IOU_75_INDEX = 5
MEAN_OVER_IOUS = None  # an `iou_index` entry that averages over all T thresholds
AREA_ALL_INDEX = 0
MAX_DETS_100_INDEX = -1
DEFAULT_PR_PANELS: tuple[int | None, ...] = (IOU_50_INDEX, IOU_75_INDEX, MEAN_OVER_IOUS)

# With more classes than this, per-class PR curves are drawn faint and without legend
# entries: 80 legend lines would hide the plot and nobody can match 80 colours anyway.
MAX_PR_LEGEND_CLASSES = 20

# Panels of the training-curves figure: (title, [(record key, legend label), ...]).
CURVE_PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("train loss", (("train_loss", "total"),)),
    ("loss components", (("train_loss_ce", "ce"), ("train_loss_bbox", "bbox (L1)"), ("train_loss_giou", "giou"))),
    ("learning rate", (("lr", "lr"),)),
    ("mAP@[.5:.95]", (("map", "mAP"),)),
    ("AP50", (("map_50", "AP50"),)),
    ("AP small", (("map_small", "AP small"),)),
)
_EVAL_KEYS = {"map", "map_50", "map_small"}
PNG_DPI = 100



def _as_matplotlib_color(color: Color) -> tuple[float, float, float]:
    return color[0] / 255, color[1] / 255, color[2] / 255


def _save_figure(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    written = atomic_write(Path(path), lambda handle: figure.savefig(handle, dpi=PNG_DPI, format="png"))
    log.debug("wrote %s", written)
    return written



# ---------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------
def _finite_float(value: Any) -> float | None:
    """`value` as a float, or None for missing, None, NaN, inf, bools and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _epoch_of(record: Mapping[str, Any], position: int) -> float:
    epoch = _finite_float(record.get("epoch"))
    return epoch if epoch is not None else float(position)


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of `key`, skipping records where it is absent or not a finite number.

    For COCOeval scores a negative value is skipped too: summarize() reports -1 when the
    ground truth has no object in that area range (e.g. no small objects), not a score.
    """
    epochs, values = [], []
    for position, record in enumerate(records, start=1):
        value = _finite_float(record.get(key))
        if value is None or (key in _EVAL_KEYS and value < 0):
            continue
        epochs.append(_epoch_of(record, position))
        values.append(value)
    return epochs, values


def _mark_empty(axes, message: str) -> None:
    axes.text(0.5, 0.5, message, transform=axes.transAxes, ha="center", va="center", color="tab:gray")


def _empty_panel_message(records: Sequence[Mapping[str, Any]], series: Sequence[tuple[str, str]]) -> str:
    keys = [key for key, _ in series]
    if not all(key in _EVAL_KEYS for key in keys):
        return "no data yet"
    if any(_finite_float(record.get(key)) is not None for record in records for key in keys):
        return "n/a: no ground truth in this range"  # only -1s were reported
    return "not evaluated yet"


def _draw_curve_panel(axes, records: Sequence[Mapping[str, Any]], title: str,
                      series: Sequence[tuple[str, str]]) -> None:
    drawn = 0
    for key, label in series:
        epochs, values = _series(records, key)
        if not values:
            continue
        # Markers keep a single point (one epoch, or sparse evaluation) visible.
        axes.plot(epochs, values, marker="o", markersize=3, label=label)
        drawn += 1
        if key == "lr" and min(values) > 0 and max(values) / min(values) > 10:
            axes.set_yscale("log")  # warmup and decay span decades
        if key in _EVAL_KEYS:
            best = int(np.argmax(values))
            axes.plot(epochs[best], values[best], marker="*", markersize=11, color="tab:red", linestyle="none",
                      label=f"best {values[best]:.4f} @ {epochs[best]:g}")
            axes.set_ylim(0, max(values) * 1.1 or 1.0)  # from zero: the distance to it is part of the picture
    if drawn == 0:
        _mark_empty(axes, _empty_panel_message(records, series))
    elif drawn > 1 or any(key in _EVAL_KEYS for key, _ in series):
        axes.legend(fontsize=8)
    axes.set_title(title)
    axes.set_xlabel("epoch")
    axes.grid(alpha=0.3)


def _epoch_limits(records: Sequence[Mapping[str, Any]]) -> tuple[float, float]:
    """The x range every panel shares: all epochs, half an epoch of margin (a lone epoch too)."""
    epochs = [_epoch_of(record, position) for position, record in enumerate(records, start=1)] or [1.0]
    return min(epochs) - 0.5, max(epochs) + 0.5


def plot_training_curves(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One PNG of loss, loss components, LR, mAP, AP50 and AP_small by epoch; returns `path`.

    `records` are metrics.jsonl lines. Epochs without evaluation (no map* keys) and
    values that are None/NaN (or -1 for a score) leave gaps; an empty panel says why.
    Meant to be redrawn after every epoch: no layout engine runs, and `path` is replaced
    atomically.
    """
    figure = Figure(figsize=(13, 7))
    # Fixed margins instead of a layout engine: the panels never change, and constrained
    # layout would double the time of a redraw that happens every epoch.
    figure.subplots_adjust(left=0.06, right=0.985, bottom=0.08, top=0.9, wspace=0.22, hspace=0.35)
    grid = figure.subplots(2, 3)
    x_limits = _epoch_limits(records)
    for axes, (title, series) in zip(grid.flat, CURVE_PANELS):
        _draw_curve_panel(axes, records, title, series)
        axes.set_xlim(*x_limits)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    figure.suptitle(f"Training curves ({len(records)} epoch{'s' if len(records) != 1 else ''})")
    return _save_figure(figure, path)


# ---------------------------------------------------------------------------------------
# Per-class AP
# ---------------------------------------------------------------------------------------
def _ap_or_none(value: Any) -> float | None:
    """AP as a float, or None for "no ground truth" (COCOeval's -1) and missing values."""
    value = _finite_float(value)
    return None if value is None or value < 0 else value


def plot_per_class_ap(map_per_class: Mapping[str, float], path: Path, *, sort: bool = True,
                      title: str = "AP@[.5:.95] per class") -> Path:
    """Horizontal bars of each class's AP; classes without ground truth (-1) read "n/a".

    Sorted best first (n/a last) unless `sort=False`; the height grows with the number of
    classes so 80 names stay readable. The dashed line is the mean over classes with
    ground truth, which is COCOeval's mAP.
    """
    entries = [(str(name), _ap_or_none(ap)) for name, ap in map_per_class.items()]
    if sort:
        entries.sort(key=lambda entry: -1.0 if entry[1] is None else entry[1], reverse=True)
    count = max(len(entries), 1)
    figure = Figure(figsize=(8, 1.4 + 0.24 * count), layout="constrained")
    axes = figure.add_subplot()
    font_size = 9 if count <= 30 else 7
    # Top to bottom in list order: barh draws position 0 at the bottom.
    positions = np.arange(len(entries))[::-1]
    scored_positions = [position for position, (_, ap) in zip(positions, entries) if ap is not None]
    scored_values = [ap for _, ap in entries if ap is not None]
    if scored_values:
        axes.barh(scored_positions, scored_values, color="tab:blue", height=0.75)
    for position, (_, ap) in zip(positions, entries):
        text, color = ("n/a (no ground truth)", "tab:gray") if ap is None else (f"{ap:.3f}", "black")
        axes.text((ap or 0.0) + 0.005, position, text, va="center", fontsize=font_size, color=color)
    axes.set_yticks(positions, [name for name, _ in entries], fontsize=font_size)
    axes.set_ylim(-0.75, count - 0.25)
    axes.set_xlim(0, 1.08)
    if scored_values:
        mean = float(np.mean(scored_values))
        axes.axvline(mean, color="tab:red", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
        axes.legend(loc="lower right", fontsize=8)
    elif not entries:
        _mark_empty(axes, "no classes")
    axes.set_xlabel("AP")
    axes.set_title(title)
    axes.grid(axis="x", alpha=0.3)
    return _save_figure(figure, path)


# ---------------------------------------------------------------------------------------
# Precision-recall curves
# ---------------------------------------------------------------------------------------
def precision_recall_curves(precision: np.ndarray, iou_index: int | None, *, area_index: int = AREA_ALL_INDEX,
                            max_dets_index: int = MAX_DETS_100_INDEX) -> np.ndarray:
    """Per-class precision at each recall threshold, shape [R, K]; NaN where there is no data.

    `iou_index` picks one IoU threshold of COCOeval's T axis (0 is 0.50, 5 is 0.75), or
    None (MEAN_OVER_IOUS) for the mean over all of them, as AP@[.5:.95] averages. The mean
    over R of a column is that class's AP, exactly as COCOeval's summarize() computes it.
    """
    selected = np.asarray(precision, dtype=float)[:, :, :, area_index, max_dets_index]  # [T, R, K]
    selected = np.where(selected > -1, selected, np.nan)  # -1: class has no ground truth
    if iou_index is not None:
        return selected[iou_index]
    all_nan = np.all(np.isnan(selected), axis=0)
    # Mean over T of the valid entries; a column that is NaN everywhere stays NaN, quietly.
    sums = np.nansum(selected, axis=0)
    counts = np.sum(~np.isnan(selected), axis=0)
    return np.where(all_nan, np.nan, sums / np.maximum(counts, 1))


def _mean_over_classes(curves: np.ndarray) -> np.ndarray | None:
    """Mean over the classes that have data, per recall point; None when no class has any."""
    has_data = ~np.all(np.isnan(curves), axis=0)
    if not has_data.any():
        return None
    return np.mean(curves[:, has_data], axis=1)


def _iou_title(iou_index: int | None, iou_thresholds: Sequence[float]) -> str:
    if iou_index is None:
        return f"IoU {iou_thresholds[0]:.2f}:{iou_thresholds[-1]:.2f} (mean)"
    return f"IoU {iou_thresholds[iou_index]:.2f}"


def _ap_name(iou_index: int | None, iou_thresholds: Sequence[float]) -> str:
    """AP50, AP75, AP (mean over IoUs) or AP@0.60: how the legend names a panel's AP."""
    if iou_index is None:
        return "AP"
    threshold = iou_thresholds[iou_index]
    return f"AP{round(threshold * 100)}" if threshold in (0.5, 0.75) else f"AP@{threshold:.2f}"


def _check_precision_shapes(precision: np.ndarray, recall_thresholds: np.ndarray, class_names: Sequence[str],
                            iou_thresholds: Sequence[float], panels: Sequence[int | None]) -> None:
    if precision.ndim != 5:
        raise ValueError(f"precision must be COCOeval's [T, R, K, A, M] array, got shape {precision.shape}")
    iou_count, recall_count, class_count = precision.shape[:3]
    if len(recall_thresholds) != recall_count:
        raise ValueError(f"{len(recall_thresholds)} recall thresholds for {recall_count} recall points")
    if len(class_names) != class_count:
        raise ValueError(f"{len(class_names)} class names for {class_count} categories (in params.catIds order)")
    if len(iou_thresholds) != iou_count:
        raise ValueError(f"{len(iou_thresholds)} IoU thresholds for {iou_count} in precision; pass params.iouThrs")
    if not panels:
        raise ValueError("iou_index must name at least one panel")
    for index in panels:
        if index is not None and not -iou_count <= index < iou_count:
            raise ValueError(f"iou_index {index} is out of range for {iou_count} IoU thresholds")


def _draw_pr_panel(axes, curves: np.ndarray, recall: np.ndarray, many_classes: bool, title: str) -> None:
    for k in range(curves.shape[1]):
        if np.all(np.isnan(curves[:, k])):
            continue  # no ground truth: nothing to draw
        axes.plot(recall, curves[:, k], color=_as_matplotlib_color(class_color(k)),
                  linewidth=0.8 if many_classes else 1.3, alpha=0.35 if many_classes else 0.9)
    mean_curve = _mean_over_classes(curves)
    if mean_curve is None:
        _mark_empty(axes, "no class has ground truth")
    else:
        axes.plot(recall, mean_curve, color="black", linewidth=2.2)
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", title=title)
    axes.grid(alpha=0.3)


def _pr_legend(figure: Figure, panel_curves: list[np.ndarray], class_names: Sequence[str], ap_names: list[str]) -> None:
    """One legend for all panels: each class's colour and its AP in every panel, then the mean."""
    handles, labels = [], []
    if len(class_names) <= MAX_PR_LEGEND_CLASSES:
        for k, name in enumerate(class_names):
            columns = [curves[:, k] for curves in panel_curves]
            if all(np.all(np.isnan(column)) for column in columns):
                continue
            handles.append(Line2D([], [], color=_as_matplotlib_color(class_color(k)), linewidth=1.3))
            labels.append(f"{name}  " + " / ".join(f"{float(np.mean(column)):.3f}" for column in columns))
    means = [_mean_over_classes(curves) for curves in panel_curves]
    if all(mean is not None for mean in means):
        handles.append(Line2D([], [], color="black", linewidth=2.2))
        labels.append("mean  " + " / ".join(f"{float(np.mean(mean)):.3f}" for mean in means))
    if not handles:
        return
    title = "class  " + " / ".join(ap_names)
    if len(class_names) > MAX_PR_LEGEND_CLASSES:
        title = f"{len(class_names)} classes, drawn faint\n" + " / ".join(ap_names)
    figure.legend(handles, labels, loc="outside right upper", fontsize=8, title=title, title_fontsize=8)


def plot_precision_recall(precision: np.ndarray, recall_thresholds: np.ndarray, class_names: Sequence[str],
                          path: Path, iou_index: Sequence[int | None] = DEFAULT_PR_PANELS, *,
                          iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS, area_index: int = AREA_ALL_INDEX,
                          max_dets_index: int = MAX_DETS_100_INDEX) -> Path:
    """PR curves from COCOeval's own `eval["precision"]`, one panel per entry of `iou_index`.

    precision:          COCOeval.eval["precision"] after accumulate(), [T, R, K, A, M].
    recall_thresholds:  COCOeval.params.recThrs (the R axis).
    class_names:        one per K, in COCOeval.params.catIds order (sorted category ids).
    iou_index:          T indices to draw, None for the mean over all T; the default draws
                        IoU 0.50 (index 0), 0.75 (index 5) and the mean over 0.50:0.95.
    iou_thresholds:     COCOeval.params.iouThrs, for the titles (default: COCO's ten).
    area_index, max_dets_index: default area=all (0) and maxDets=100 (-1), as mAP uses.

    Each panel has a curve per class and, in black, their mean over classes; the legend
    gives every class's AP in each panel (mean over recall points, as COCOeval computes
    it), and the mean's are the AP50 / AP75 / mAP that summarize() reports. Classes
    without ground truth (-1 everywhere) are left out.
    """
    precision = np.asarray(precision)
    recall = np.asarray(recall_thresholds, dtype=float)
    panels = list(iou_index)
    _check_precision_shapes(precision, recall, class_names, iou_thresholds, panels)
    many_classes = len(class_names) > MAX_PR_LEGEND_CLASSES
    figure = Figure(figsize=(4.8 * len(panels) + 3.0, 5.0), layout="constrained")
    axes_row = np.atleast_1d(figure.subplots(1, len(panels), sharey=True))
    panel_curves = []
    for axes, panel_iou in zip(axes_row, panels):
        curves = precision_recall_curves(precision, panel_iou, area_index=area_index, max_dets_index=max_dets_index)
        _draw_pr_panel(axes, curves, recall, many_classes, _iou_title(panel_iou, iou_thresholds))
        panel_curves.append(curves)
    axes_row[0].set_ylabel("precision")
    _pr_legend(figure, panel_curves, class_names, [_ap_name(i, iou_thresholds) for i in panels])
    figure.suptitle("Precision-recall (area=all, maxDets=100)")
    return _save_figure(figure, path)


# ---------------------------------------------------------------------------------------
# Confusion matrix
# ---------------------------------------------------------------------------------------
# With more classes than this, cells carry no numbers (they would not fit); the shading and
# metrics.json's counts remain.
MAX_ANNOTATED_CONFUSION_CLASSES = 30
CONFUSION_COLORMAP = "Blues"


def confusion_row_shares(counts: np.ndarray) -> np.ndarray:
    """Each count as a share of its row's total (0 in an empty row): the cells' shading."""
    counts = np.asarray(counts, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _colour_class_labels(labels, class_count: int) -> None:
    """Class names on their class colour (as in every plot and drawing); background stays plain."""
    for k, label in enumerate(labels[:class_count]):
        color = class_color(k)
        label.set_bbox({"facecolor": _as_matplotlib_color(color), "edgecolor": "none", "pad": 1.5})
        label.set_color(_as_matplotlib_color(readable_text_color(color)))


def plot_confusion_matrix(counts: np.ndarray, labels: Sequence[str], path: Path, *,
                          title: str = "Confusion matrix") -> Path:
    """A detection confusion matrix: rows ground truth, columns predicted, the last of each
    "background" (`evaluation.confusion` says how it is counted); returns `path`.

    Every cell shows its count (up to MAX_ANNOTATED_CONFUSION_CLASSES classes) and is shaded
    by its share of the row: where the objects of that class went, or for the background row
    which classes the false detections claimed.
    """
    counts = np.asarray(counts)
    size = len(labels)
    if counts.shape != (size, size):
        raise ValueError(f"confusion counts of shape {counts.shape} for {size} labels (classes + background)")
    shares = confusion_row_shares(counts)
    annotated = size <= MAX_ANNOTATED_CONFUSION_CLASSES + 1
    cell = 0.55 if annotated else 0.16
    side = 3.0 + cell * size
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    axes = figure.add_subplot()
    shading = axes.imshow(shares, cmap=CONFUSION_COLORMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(shading, ax=axes, shrink=0.8, label="share of the row")
    font_size = 9 if size <= 12 else (7 if annotated else 5)
    if annotated:
        for (row, column), count in np.ndenumerate(counts):
            axes.text(column, row, str(int(count)), ha="center", va="center", fontsize=font_size,
                      color="white" if shares[row, column] > 0.5 else ("black" if count else "tab:gray"))
    axes.set_xticks(range(size), labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=font_size)
    axes.set_yticks(range(size), labels, fontsize=font_size)
    _colour_class_labels(axes.get_xticklabels(), size - 1)
    _colour_class_labels(axes.get_yticklabels(), size - 1)
    axes.set_xlabel("predicted class (background: object missed)")
    axes.set_ylabel("ground-truth class (background: false detection)")
    axes.set_title(title)
    return _save_figure(figure, path)
