"""PNG plots of a study: optimisation history, per-epoch curves (pruned ones marked), importances.

Drawn with matplotlib's object API (no pyplot), so no global backend is switched in the
user's process and no display is needed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from optuna.trial import TrialState

from detr_train.checkpointing.atomic import atomic_write

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
HISTORY_PNG = "optimization_history.png"
CURVES_PNG = "intermediate_values.png"
IMPORTANCES_PNG = "param_importances.png"
# Importances from fewer completed trials are noise; the plot is skipped until then.
MIN_TRIALS_FOR_IMPORTANCE = 4


def write_plots(study: optuna.Study, sweep_dir: Path, objective_name: str = "mAP") -> list[Path]:
    """Write the plots that the study has enough trials for; returns their paths."""
    out_dir = Path(sweep_dir) / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if not trials:
        return []
    written = [
        _save(_history_figure(study, trials, objective_name), out_dir / HISTORY_PNG),
        _save(_curves_figure(trials, objective_name), out_dir / CURVES_PNG),
    ]
    figure = _importances_figure(study)
    if figure is not None:
        written.append(_save(figure, out_dir / IMPORTANCES_PNG))
    return written


def _history_figure(study: optuna.Study, trials: list, objective_name: str) -> Figure:
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.value is not None]
    axes.scatter([t.number for t in complete], [t.value for t in complete], label="complete", color="tab:blue")
    axes.scatter([t.number for t in pruned], [t.value for t in pruned], label="pruned (last report)", color="tab:gray", marker="x")
    best_so_far, best = [], None
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    for trial in sorted(complete, key=lambda t: t.number):
        best = trial.value if best is None else pick(best, trial.value)
        best_so_far.append((trial.number, best))
    if best_so_far:
        axes.step(*zip(*best_so_far), where="post", color="tab:red", label="best so far")
    axes.set(xlabel="trial", ylabel=objective_name, title=f"Optimisation history: {study.study_name}")
    axes.legend()
    return figure


def _curves_figure(trials: list, objective_name: str) -> Figure:
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for trial in trials:
        steps = sorted(trial.intermediate_values)
        if not steps:
            continue
        values = [trial.intermediate_values[s] for s in steps]
        if trial.state == TrialState.PRUNED:
            axes.plot(steps, values, color="tab:red", linestyle="--", alpha=0.7)
            axes.plot(steps[-1], values[-1], color="tab:red", marker="x")
        else:
            axes.plot(steps, values, color="tab:blue", alpha=0.8)
    axes.plot([], [], color="tab:blue", label="complete")
    axes.plot([], [], color="tab:red", linestyle="--", marker="x", label="pruned")
    axes.set(xlabel="epoch", ylabel=f"validation {objective_name}", title="Per-epoch curves")
    axes.legend()
    return figure


def _importances_figure(study: optuna.Study) -> Figure | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return None
    try:
        importances = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as error:  # e.g. every trial had the same params
        log.info("No parameter importances yet: %s", error)
        return None
    if not importances:
        return None
    figure = Figure(figsize=(7, 1.5 + 0.5 * len(importances)))
    axes = figure.add_subplot()
    names = list(importances)[::-1]
    axes.barh(names, [importances[n] for n in names], color="tab:green")
    axes.set(xlabel="importance", title=f"Parameter importances ({len(complete)} completed trials)")
    figure.tight_layout()
    return figure


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    return atomic_write(path, lambda handle: figure.savefig(handle, dpi=100, format="png"))
