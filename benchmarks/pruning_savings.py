"""What pruning saves: the same sweep (same seed, trials, budget) with the median pruner and without.

Prints the ratio of epochs trained and of wall time (pruned / unpruned) and the best value
of each. Target: at most 0.6 of the epochs, with a best mAP within 5% of the unpruned one.

    python benchmarks/pruning_savings.py                          # detr-train search=lr budget=small
    python benchmarks/pruning_savings.py --budget tiny --trials 8 data.num_workers=0
    python benchmarks/pruning_savings.py --app toy                 # the tests' cheap objective, seconds
    python benchmarks/pruning_savings.py -P hydra.sweeper.pruner.n_warmup_steps=1   # pruner settings

Anything after the options is passed to both sweeps as Hydra overrides; `-P` overrides
go to the pruned sweep only (the unpruned one uses `hydra/sweeper/pruner=nop`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

REPO_ROOT = Path(__file__).resolve().parents[1]
TOY_APP = REPO_ROOT / "tests" / "search_app" / "app.py"
MAX_EPOCH_RATIO = 0.6
MAX_BEST_SHORTFALL = 0.05


@dataclass
class SweepResult:
    name: str
    wall_s: float
    epochs: int
    trial_seconds: float
    best: float | None
    states: dict[str, int]


def sweep_command(args: argparse.Namespace, sweep_dir: Path, pruned: bool) -> list[str]:
    common = [
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweeper.n_trials={args.trials}",
        f"hydra.sweeper.sampler.seed={args.seed}",
    ]
    common += args.pruned_overrides if pruned else ["hydra/sweeper/pruner=nop"]
    if args.app == "toy":
        toy = ["x=interval(0, 1)", "y=interval(0, 1)", f"epochs={args.toy_epochs}"]
        return [sys.executable, str(TOY_APP), "-m", *toy, *common, *args.overrides]
    return [sys.executable, "-m", "detr_train", f"search={args.search}", f"budget={args.budget}", *common, *args.overrides]


def run_sweep(args: argparse.Namespace, out_dir: Path, pruned: bool) -> SweepResult:
    name = "pruned" if pruned else "unpruned"
    sweep_dir = out_dir / name
    command = sweep_command(args, sweep_dir, pruned)
    print(f"[{name}] {' '.join(command)}", flush=True)
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=out_dir, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        sys.exit(f"[{name}] sweep failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    from detr_train.search.storage import DEFAULT_JOURNAL_NAME, open_storage

    study = optuna.load_study(study_name=sweep_dir.name, storage=open_storage(str(sweep_dir / DEFAULT_JOURNAL_NAME)))
    trials = study.trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return SweepResult(
        name=name,
        wall_s=wall,
        epochs=sum(len(t.intermediate_values) for t in trials),
        trial_seconds=sum(t.duration.total_seconds() for t in trials if t.duration is not None),
        best=max(t.value for t in complete) if complete else None,
        states={state.name: sum(t.state == state for t in trials) for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)},
    )


def report(pruned: SweepResult, unpruned: SweepResult) -> bool:
    for r in (unpruned, pruned):
        print(
            f"{r.name:>9}: {r.epochs:4d} epochs, {r.wall_s:8.1f} s wall ({r.trial_seconds:8.1f} s in trials), "
            f"best {r.best}, {r.states}"
        )
    epoch_ratio = pruned.epochs / unpruned.epochs
    wall_ratio = pruned.wall_s / unpruned.wall_s
    trial_time_ratio = pruned.trial_seconds / unpruned.trial_seconds
    print(f"epochs ratio     {epoch_ratio:.3f}   (target <= {MAX_EPOCH_RATIO})")
    print(f"wall time ratio  {wall_ratio:.3f}   (trial time only: {trial_time_ratio:.3f})")
    if pruned.best is None or unpruned.best is None:
        print("best value: a sweep completed no trial")
        return False
    shortfall = (unpruned.best - pruned.best) / abs(unpruned.best) if unpruned.best else 0.0
    print(f"best value       pruned {pruned.best:.4f} vs unpruned {unpruned.best:.4f} (shortfall {shortfall:+.1%}, target <= {MAX_BEST_SHORTFALL:.0%})")
    met = epoch_ratio <= MAX_EPOCH_RATIO and shortfall <= MAX_BEST_SHORTFALL
    print("target met" if met else "target NOT met")
    return met


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", choices=("detr", "toy"), default="detr")
    parser.add_argument("--search", default="lr", help="search preset (detr only)")
    parser.add_argument("--budget", default="small", help="budget preset (detr only)")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--toy-epochs", type=int, default=10, help="epochs per toy trial")
    parser.add_argument(
        "-P", "--pruned-override", dest="pruned_overrides", action="append", default=[],
        help="an override for the pruned sweep only, e.g. -P hydra.sweeper.pruner.n_warmup_steps=1",
    )
    parser.add_argument("--out", type=Path, default=None, help="where the two sweeps go (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both sweeps")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="pruning_savings_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"sweeps in {out_dir}")
    unpruned = run_sweep(args, out_dir, pruned=False)
    pruned = run_sweep(args, out_dir, pruned=True)
    report(pruned, unpruned)


if __name__ == "__main__":
    main()
