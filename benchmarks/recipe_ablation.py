"""The DETR recipe on small objects, measured: multi-scale crops and EMA weights, on and off.

Trains the same model for the same number of optimiser steps (same images, batch and
epochs) on `data=synthetic_small` (4-16 px shapes on 320-640 px images, a stand-in for
BDD100K's traffic lights), once per variant, one after another in this process's
machine, and prints the held-out scores side by side:

    variant      augment  EMA   mAP    AP_small  AP50   (ratios to `plain`)
    plain        flip     off
    ema          flip     on
    multiscale   detr     off
    recipe       detr     on

Every variant starts from the same seed and sees the same images; only the recipe's two
parts change. The defaults fit in about 30 minutes on a 2-core CPU:

    python benchmarks/recipe_ablation.py                     # prints the table, writes recipe_ablation.json
    python benchmarks/recipe_ablation.py --epochs 8 --train-images 400 --image-size 480   # closer to the preset
    python benchmarks/recipe_ablation.py --data synthetic --image-size 160 --train-images 800 \
        --val-images 100 --epochs 4          # the default demo's data and length (about 15 minutes)

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
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {  # name: (data/augment preset, EMA on)
    "plain": ("flip", False),
    "ema": ("flip", True),
    "multiscale": ("detr", False),
    "recipe": ("detr", True),
}
SCORES = ("map", "map_small", "map_50")


def overrides_for(variant: str, args: argparse.Namespace, work: Path) -> list[str]:
    augment, ema = VARIANTS[variant]
    return [
        f"data={args.data}", f"data/augment={augment}", f"data.root={work / 'data'}",
        f"data.generate.num_train={args.train_images}", f"data.generate.num_val={args.val_images}",
        f"data.image_size={args.image_size}", f"data.eval_size={args.image_size}",
        f"training.epochs={args.epochs}", f"training.batch_size={args.batch_size}",
        f"training.ema.enabled={str(ema).lower()}", "training.ema.eval_raw=false", "training.plots=false",
        f"training.eval_every={args.epochs}", "training.progress=false", "training.log_every=0",
        f"output_root={work / 'outputs'}", f"name={variant}",
    ]


def run_variant(variant: str, args: argparse.Namespace, work: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "detr_train", *overrides_for(variant, args, work)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{result.stderr[-3000:]}")
    (run_dir,) = (work / "outputs" / variant).iterdir()
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    scores = {key: final[key] for key in SCORES}
    scores.update(steps=final["global_step"], minutes=(time.perf_counter() - started) / 60)
    return scores


def table(results: dict[str, dict]) -> str:
    base = results["plain"]
    lines = ["| variant | augment | EMA | mAP | AP_small | AP50 | mAP / plain | AP_small / plain | steps | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, scores in results.items():
        augment, ema = VARIANTS[name]
        ratios = [scores[k] / base[k] if base[k] > 0 else float("nan") for k in ("map", "map_small")]
        lines.append(f"| {name} | {augment} | {'on' if ema else 'off'} | {scores['map']:.4f} | "
                     f"{scores['map_small']:.4f} | {scores['map_50']:.4f} | {ratios[0]:.2f} | {ratios[1]:.2f} | "
                     f"{scores['steps']} | {scores['minutes']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic_small", choices=("synthetic_small", "synthetic"),
                        help="synthetic_small: 4-16 px objects; synthetic: the default demo's shapes")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--val-images", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=320, help="training and evaluation shortest edge")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for each run")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("recipe_ablation.json"))
    args = parser.parse_args()
    if "plain" not in args.variants:
        args.variants.insert(0, "plain")
    with tempfile.TemporaryDirectory(prefix="recipe_ablation_") as folder:
        results = {}
        for variant in args.variants:
            results[variant] = run_variant(variant, args, Path(folder))
            print(f"{variant}: {results[variant]}", flush=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.write_text(json.dumps({"settings": settings, "results": results}, indent=2, default=str) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
