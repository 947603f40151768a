"""What pruning saves: the same sweep (same seed, trials, budget) with the preset's pruner and without.

Prints the ratio of epochs trained and of wall time (pruned / unpruned) and the best value
of each. Target: at most 0.6 of the epochs, with a best mAP within 5% of the unpruned one.

    python benchmarks/pruning_savings.py                          # detr-train search=lr budget=small
    python benchmarks/pruning_savings.py --side-by-side           # both sweeps at once, half the cores each
    python benchmarks/pruning_savings.py --budget tiny --trials 8 data.num_workers=0
    python benchmarks/pruning_savings.py --app toy                 # the tests' cheap objective, seconds
    python benchmarks/pruning_savings.py -P hydra.sweeper.pruner.n_warmup_steps=1   # pruner settings

Anything after the options is passed to both sweeps as Hydra overrides; `-P` overrides
go to the pruned sweep only (the unpruned one uses `hydra/sweeper/pruner=nop`).

To compare several pruner settings against one baseline, pass the sweep directory of an
earlier unpruned run with `--unpruned-from DIR` (it must have used the same seed, trials
and budget, and its trials the same config). Its epochs and best value are exact; its wall
time was not measured side by side with this run, so only the trial-time ratio is printed
then. Each sweep's output goes to <out>/pruned.log and <out>/unpruned.log.
"""

from __future__ import annotations

import argparse
import os
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
    wall_s: float | None  # None: a stored sweep, not timed by this run
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


@dataclass
class RunningSweep:
    name: str
    sweep_dir: Path
    log_path: Path
    process: subprocess.Popen
    started: float


def start_sweep(args: argparse.Namespace, out_dir: Path, pruned: bool, threads: int | None) -> RunningSweep:
    """Start one sweep in the background, its output going to <out>/<name>.log."""
    name = "pruned" if pruned else "unpruned"
    sweep_dir = out_dir / name
    command = sweep_command(args, sweep_dir, pruned)
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f"[{name}] {' '.join(command)}" + ("" if threads is None else f"  ({threads} thread(s))"), flush=True)
    log_path = out_dir / f"{name}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=out_dir, stdout=log, stderr=subprocess.STDOUT, env=env)
    return RunningSweep(name, sweep_dir, log_path, process, time.perf_counter())


def finish_sweep(sweep: RunningSweep) -> SweepResult:
    returncode = sweep.process.wait()
    wall = time.perf_counter() - sweep.started
    if returncode != 0:
        tail = sweep.log_path.read_text(errors="replace")[-3000:]
        sys.exit(f"[{sweep.name}] sweep failed (exit {returncode}); the end of {sweep.log_path}:\n{tail}")
    return load_sweep(sweep.name, sweep.sweep_dir, wall)


def load_sweep(name: str, sweep_dir: Path, wall_s: float | None) -> SweepResult:
    from detr_train.search.storage import DEFAULT_JOURNAL_NAME, open_storage

    journal = sweep_dir / DEFAULT_JOURNAL_NAME
    if not journal.is_file():
        sys.exit(f"{sweep_dir}: no {DEFAULT_JOURNAL_NAME} here; is it the sweep directory of a finished sweep?")
    # The sweep directory's journal holds one study, named after the directory it was made in.
    study = optuna.load_study(study_name=None, storage=open_storage(str(journal)))
    trials = study.trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return SweepResult(
        name=name,
        wall_s=wall_s,
        epochs=sum(len(t.intermediate_values) for t in trials),
        trial_seconds=sum(t.duration.total_seconds() for t in trials if t.duration is not None),
        best=max(t.value for t in complete) if complete else None,
        states={state.name: sum(t.state == state for t in trials) for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)},
    )


def check_comparable(args: argparse.Namespace, sweep_dir: Path, stored: SweepResult) -> None:
    """A stored baseline is only a baseline if it ran the same sweep unpruned."""
    from omegaconf import OmegaConf

    sweep_cfg = OmegaConf.load(sweep_dir / "multirun.yaml")
    expected = {
        "hydra.sweeper.sampler.seed": args.seed,
        "hydra.sweeper.n_trials": args.trials,
        "hydra.sweeper.pruner._target_": "optuna.pruners.NopPruner",
    }
    if args.app == "detr":
        expected["hydra.runtime.choices.budget"] = args.budget
        expected["hydra.runtime.choices.search"] = args.search
    for key, want in expected.items():
        found = OmegaConf.select(sweep_cfg, key)
        if found != want:
            sys.exit(f"{sweep_dir / 'multirun.yaml'}: {key} is {found!r}, this comparison needs {want!r}")
    if sum(stored.states.values()) != args.trials:
        sys.exit(f"{sweep_dir}: the study holds {sum(stored.states.values())} finished trials, not {args.trials}")


def _task_config(sweep_dir: Path) -> dict:
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(sweep_dir / "multirun.yaml"), resolve=False)
    config.pop("hydra")
    return config


def _differing_keys(left: object, right: object, prefix: str = "") -> list[str]:
    if isinstance(left, dict) and isinstance(right, dict):
        return [
            diff
            for key in sorted(left.keys() | right.keys(), key=str)
            for diff in _differing_keys(left.get(key), right.get(key), f"{prefix}{key}.")
        ]
    return [] if left == right else [f"{prefix.rstrip('.')}: {left!r} vs {right!r}"]


def check_same_task(baseline_dir: Path, pruned_dir: Path) -> None:
    """The trials of both sweeps must train the same way (e.g. a `training.epochs=5` override on
    one only would make the epoch ratio meaningless); the sweeps' multirun.yaml hold that config."""
    differing = _differing_keys(_task_config(baseline_dir), _task_config(pruned_dir))
    if differing:
        sys.exit(f"{baseline_dir / 'multirun.yaml'}: its trials' config differs from this sweep's: {'; '.join(differing)}")


def report(pruned: SweepResult, unpruned: SweepResult) -> bool:
    for r in (unpruned, pruned):
        wall = "stored sweep" if r.wall_s is None else f"{r.wall_s:8.1f} s wall"
        print(f"{r.name:>9}: {r.epochs:4d} epochs, {wall} ({r.trial_seconds:8.1f} s in trials), best {r.best}, {r.states}")
    epoch_ratio = pruned.epochs / unpruned.epochs
    trial_time_ratio = pruned.trial_seconds / unpruned.trial_seconds
    print(f"epochs ratio     {epoch_ratio:.3f}   (target <= {MAX_EPOCH_RATIO})")
    if pruned.wall_s is None or unpruned.wall_s is None:
        print(f"trial time ratio {trial_time_ratio:.3f}   (not timed side by side: compare epochs)")
    else:
        print(f"wall time ratio  {pruned.wall_s / unpruned.wall_s:.3f}   (trial time only: {trial_time_ratio:.3f})")
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
    parser.add_argument(
        "--unpruned-from", type=Path, default=None, metavar="DIR",
        help="reuse this earlier unpruned sweep (same seed, trials, budget) instead of running one",
    )
    parser.add_argument(
        "--side-by-side", action="store_true",
        help="run the two sweeps at the same time, each with half the cores as torch threads",
    )
    parser.add_argument("--out", type=Path, default=None, help="where the two sweeps go (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both sweeps")
    args = parser.parse_args()
    if args.side_by_side and args.unpruned_from is not None:
        parser.error("--side-by-side runs both sweeps; it cannot be combined with --unpruned-from")
    return args


def main() -> None:
    args = parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="pruning_savings_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"sweeps in {out_dir}")
    if args.unpruned_from is not None:
        unpruned = load_sweep("unpruned", args.unpruned_from, wall_s=None)
        check_comparable(args, args.unpruned_from, unpruned)
        pruned = finish_sweep(start_sweep(args, out_dir, pruned=True, threads=None))
        check_same_task(args.unpruned_from, out_dir / "pruned")
    elif args.side_by_side:
        # Both at once, each with its share of the cores: the same machine noise for both.
        threads = max(1, (os.cpu_count() or 2) // 2)
        running = [start_sweep(args, out_dir, pruned, threads) for pruned in (False, True)]
        unpruned, pruned = (finish_sweep(sweep) for sweep in running)
    else:
        unpruned = finish_sweep(start_sweep(args, out_dir, pruned=False, threads=None))
        pruned = finish_sweep(start_sweep(args, out_dir, pruned=True, threads=None))
    report(pruned, unpruned)


if __name__ == "__main__":
    main()
