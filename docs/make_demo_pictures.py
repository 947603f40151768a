"""Make the README's pictures from a real demo run: its training curves and its detections.

    detr-train                                              # the demo, as a new user runs it
    python docs/make_demo_pictures.py outputs/default/<run> # then this, from the checkout

Writes docs/demo_training_curves.png (the run's own training_curves.png) and
docs/demo_predictions.png: the first validation images with the boxes that
`detr-train-predict` draws at its default threshold, in a grid.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from detr_train.data.sources import validation_images_of_run

DOCS = Path(__file__).resolve().parent


def _grid(paths: list[Path], columns: int, gap: int = 4) -> Image.Image:
    tiles = [Image.open(path).convert("RGB") for path in paths]
    width, height = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * width + (columns - 1) * gap, rows * height + (rows - 1) * gap), "white")
    for index, tile in enumerate(tiles):
        grid.paste(tile, ((index % columns) * (width + gap), (index // columns) * (height + gap)))
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished demo run")
    parser.add_argument("--images", type=int, default=8, help="validation images in the grid")
    parser.add_argument("--columns", type=int, default=4)
    args = parser.parse_args()
    shutil.copyfile(args.run_dir / "training_curves.png", DOCS / "demo_training_curves.png")
    with tempfile.TemporaryDirectory() as tmp:
        chosen = Path(tmp) / "images"
        chosen.mkdir()
        for path in sorted(validation_images_of_run(args.run_dir).glob("*.png"))[:args.images]:
            shutil.copyfile(path, chosen / path.name)
        drawn = Path(tmp) / "drawn"
        subprocess.run([sys.executable, "-m", "detr_train.cli.predict", str(args.run_dir), str(chosen),
                        "--output", str(drawn), "--workers", "0"], check=True)
        _grid(sorted((drawn / "images").glob("*.png")), args.columns).save(DOCS / "demo_predictions.png")
    print(f"wrote {DOCS / 'demo_training_curves.png'} and {DOCS / 'demo_predictions.png'}")


if __name__ == "__main__":
    main()
