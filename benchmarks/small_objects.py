"""The three small-object levers, measured side by side: tiles, slicing and repeat-factor sampling.

Trains the tiny model three times with the same budget (same images, batch, epochs and
input size: every optimiser step sees 128 px inputs) on `data=synthetic_small_rare`
(10-24 px shapes on 240-400 px frames, crosses about 25 times rarer than the other
shapes), one run after another on this machine, and scores each on the same held-out
frames:

    column  training                          evaluation
    (a)     whole frames (shrunk to 128 px)   whole frames
    (b)     (a)'s model                       sliced: 128 px tiles at native resolution + the frame
    (c)     128 px tiles at native resolution sliced
    (d)     (c) + data.sampler=repeat_factor  sliced

Columns: AP_small, the rare class's AP (cross), mAP, AP50, and minutes (training + its
evaluation). The defaults take about 15 minutes on a 2-core CPU:

    python benchmarks/small_objects.py                 # prints the table, writes small_objects.json
    python benchmarks/small_objects.py --epochs 3      # a quicker, noisier look

It is a measurement, not a test: the numbers are what they are (docs/recipe.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = "synthetic_small_rare"
RARE_CLASS = "cross"


@dataclass(frozen=True)
class Column:
    name: str
    training: str  # the training run it evaluates
    sliced: bool


TRAININGS = ("whole", "tiles", "tiles_rfs")
COLUMNS = (
    Column("(a) whole frames", "whole", sliced=False),
    Column("(b) (a) + sliced inference", "whole", sliced=True),
    Column("(c) tiles + sliced inference", "tiles", sliced=True),
    Column("(d) (c) + repeat-factor sampling", "tiles_rfs", sliced=True),
)


def overrides_for(name: str, args: argparse.Namespace, work: Path) -> list[str]:
    overrides = [
        f"data={DATA}", f"data.root={work / 'data'}",
        f"data.generate.num_train={args.train_images}", f"data.generate.num_val={args.val_images}",
        f"data.image_size={args.size}", f"data.eval_size={args.size}",
        f"training.epochs={args.epochs}", f"training.eval_every={args.epochs}",
        "training.plots=false", "training.progress=false", "training.log_every=0",
        f"output_root={work / 'outputs'}", f"name={name}",
    ]
    if name in ("tiles", "tiles_rfs"):
        overrides += ["data/augment=tiles", f"data.augment.tile.size={args.size}"]
    if name == "tiles_rfs":
        overrides += ["data.sampler=repeat_factor", f"data.repeat_threshold={args.repeat_threshold}"]
    return overrides


def run(command: list[str], threads: int, what: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{what} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def train(name: str, args: argparse.Namespace, work: Path) -> tuple[Path, float]:
    seconds = run([sys.executable, "-m", "detr_train", *overrides_for(name, args, work)], args.threads,
                  f"training {name}")
    (run_dir,) = (work / "outputs" / name).iterdir()
    return run_dir, seconds


def evaluate(run_dir: Path, sliced: bool, args: argparse.Namespace, output: Path) -> tuple[dict, float]:
    command = [sys.executable, "-m", "detr_train.cli.evaluate", str(run_dir), "--output", str(output),
               "--slice", str(args.size if sliced else 0), "--slice-overlap", str(args.overlap)]
    seconds = run(command, args.threads, f"evaluating {run_dir.name}")
    return json.loads((output / "metrics.json").read_text())["metrics"], seconds


def score_row(column: Column, metrics: dict, minutes: float) -> dict:
    return {
        "column": column.name, "map_small": metrics["map_small"],
        "rare_ap": metrics["map_per_class"][RARE_CLASS], "map": metrics["map"], "map_50": metrics["map_50"],
        "minutes": minutes,
    }


def table(rows: list[dict]) -> str:
    lines = [f"| column | AP_small | AP {RARE_CLASS} (rare) | mAP | AP50 | minutes |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['column']} | {row['map_small']:.4f} | {row['rare_ap']:.4f} | {row['map']:.4f} | "
                     f"{row['map_50']:.4f} | {row['minutes']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-images", type=int, default=800)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--size", type=int, default=128, help="training input, evaluation and tile size (px)")
    parser.add_argument("--overlap", type=float, default=0.2, help="overlap of neighbouring tiles in slicing")
    parser.add_argument("--repeat-threshold", type=float, default=0.3,
                        help="data.repeat_threshold of (d): classes in fewer images than this fraction repeat")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for each run")
    parser.add_argument("--out", type=Path, default=Path("small_objects.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="small_objects_") as folder:
        work = Path(folder)
        runs = {name: train(name, args, work) for name in TRAININGS}
        for index, column in enumerate(COLUMNS):
            run_dir, train_seconds = runs[column.training]
            metrics, eval_seconds = evaluate(run_dir, column.sliced, args, work / f"eval_{index}")
            # (b) reuses (a)'s training: its time is (a)'s training plus its own evaluation.
            rows.append(score_row(column, metrics, (train_seconds + eval_seconds) / 60))
            print(json.dumps(rows[-1]), flush=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    total_minutes = (time.perf_counter() - started) / 60
    args.out.write_text(json.dumps({"settings": settings, "rows": rows, "total_minutes": total_minutes},
                                   indent=2, default=str) + "\n")
    print(table(rows))
    print(f"total: {total_minutes:.1f} minutes")


if __name__ == "__main__":
    main()
