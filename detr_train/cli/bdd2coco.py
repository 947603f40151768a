"""`detr-train-bdd2coco`: convert one BDD100K detection label file to COCO json.

    detr-train-bdd2coco det_val.json det_val_coco.json [--images-dir DIR] [--uncertain {ignore,remove,merge}]

Errors are one line with exit status 2, like every detr-train command; nothing is
written when the conversion fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from detr_train.cli.common import run_command
from detr_train.data.bdd100k import CATEGORIES, UNCERTAIN_HANDLINGS, convert_file
from detr_train.data.sources import DatasetError

PROGRAM = "detr-train-bdd2coco"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description=(
            "Convert BDD100K detection labels (labels/det_20/det_{train,val}.json) to COCO "
            "json with the ten det_20 classes (ids 1-10: "
            + ", ".join(CATEGORIES)
            + "). Boxes become [x, y, x2-x1+1, y2-y1+1] as in the official toolkit."
        ),
        epilog=(
            "example: detr-train-bdd2coco bdd100k/labels/det_20/det_val.json det_val_coco.json "
            "--images-dir bdd100k/images/100k/val"
        ),
    )
    parser.add_argument("input", type=Path, help="BDD100K label json (a list of frames)")
    parser.add_argument("output", type=Path, help="COCO json to write (replaced atomically)")
    parser.add_argument(
        "--images-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=(
            "folder with the images: frames whose image is missing are dropped (with a "
            "warning) and frames without a 'size' get their real size from the file; "
            "without it every frame is taken as 1280x720 unless it has a 'size'"
        ),
    )
    parser.add_argument(
        "--uncertain",
        choices=UNCERTAIN_HANDLINGS,
        default="ignore",
        help=(
            "what to do with 'other person', 'other vehicle' and 'trailer': ignore = keep "
            "as ignore regions of the nearest class (iscrowd=1; COCOeval neither rewards "
            "nor penalises detections there; default), remove = drop them, merge = count "
            "them as pedestrian / car / truck"
        ),
    )
    parser.add_argument("--verbose", action="store_true", help="tracebacks for expected errors too")
    return parser


def _convert(args: argparse.Namespace) -> None:
    try:
        convert_file(args.input, args.output, uncertain=args.uncertain, images_dir=args.images_dir)
    except OSError as error:  # a missing input or an unwritable output: the user's to fix
        raise DatasetError(f"{error.filename or args.input}: {error.strerror or error}") from error


def main(argv: list[str] | None = None) -> None:
    run_command(PROGRAM, build_parser(), _convert, argv)


if __name__ == "__main__":
    main()
