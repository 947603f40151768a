"""The last lines of a run, or of a search for its best trial: where the results are and the
exact commands to run next, with the run's real path."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from detr_train.reporting.visual_callbacks import CURVES_FILE, PER_CLASS_AP_FILE, PLOTS_FOLDER, PR_CURVES_FILE
from detr_train.training.callbacks import Callback, Trainer

log = logging.getLogger(__name__)


def next_steps(run_dir: Path, best_map: float, best_epoch: int, images_dir: Path | None,
               stopped: str | None = None) -> list[str]:
    """Lines naming the run directory, the best mAP and its epoch, the curves and plots, how to
    score and draw the run again, how to export it and, for a run stopped early, how to
    continue it."""
    run_dir = Path(run_dir)
    run = shlex.quote(str(run_dir))
    lines = [f"Run directory: {run_dir}"]
    lines.append(f"Best validation mAP {best_map:.4f} at epoch {best_epoch}" if best_epoch
                 else "Best validation mAP: no epoch was evaluated")
    pictures = [path for path in (run_dir / CURVES_FILE, run_dir / PLOTS_FOLDER / PER_CLASS_AP_FILE,
                                  run_dir / PLOTS_FOLDER / PR_CURVES_FILE) if path.is_file()]
    if pictures:
        lines.append("Curves and plots: " + ", ".join(str(path) for path in pictures))
    if stopped:
        lines.append(f"Stopped {stopped}; continue with:  detr-train training.resume={run}")
    lines.append(f"Score it again:       detr-train-eval {run}")
    images = shlex.quote(str(Path(images_dir).absolute())) if images_dir is not None else "<images>"
    lines.append(f"Draw its detections:  detr-train-predict {run} {images}")
    lines.append(f"Deploy it as ONNX:    detr-train-export {run} --output {shlex.quote(str(run_dir / 'model.onnx'))}")
    return lines


class NextSteps(Callback):
    """Logs `next_steps` when the run ends, finished or stopped (main process only)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        self._tell(trainer, None)

    def on_interrupt(self, trainer: Trainer, where: str) -> None:
        self._tell(trainer, f"by {trainer.stop_request.reason} {where}")

    def _tell(self, trainer: Trainer, stopped: str | None) -> None:
        if not trainer.dist.is_main:
            return
        state = trainer.state
        lines = next_steps(trainer.run_dir, max(state.best_metric, 0.0), state.best_epoch,
                           trainer.data.val.images_dir, stopped)
        log.info("\n%s", "\n".join(lines))
