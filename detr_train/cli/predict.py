"""`detr-train-predict`: run a trained model over images and draw what it finds.

    detr-train-predict outputs/default/2026-11-27_10-00-00 photos/        # a run's best.pt, a folder
    detr-train-predict run/hf_model 'frames/**/*.jpg' --threshold 0.5     # a glob
    detr-train-predict run/checkpoints/last.pt street.jpg --output seen
    detr-train-predict model.onnx photos/                                  # ONNX Runtime (detr-train-export)
    detr-train-predict run/ frames/ --slice 512 --slice-overlap 0.2        # tiles + whole images

Writes `<output>/detections.json` (COCO results: image_id, category_id = the model's class
index, bbox [x, y, w, h] in pixels, score, plus file_name and category_name) and
`<output>/images/`, each image with its boxes, class names and scores drawn. Images are
batched, use AMP on a GPU, and keep their folder layout. An image that cannot be read is
skipped and counted. `--slice N` also runs N x N tiles of each image at native resolution
and merges their detections with the whole image's (`evaluation.slicing`); by default a
run predicts as it was evaluated (`training.eval_slice`). The output folder is never overwritten unless --overwrite is given;
the default (`predictions`) moves on to `predictions_2`, ... when taken.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from detr_train.checkpointing.atomic import atomic_write
from detr_train.cli.common import (
    add_common_arguments,
    add_slice_arguments,
    claim_output_dir,
    next_free_dir,
    refuse_taken_output,
    run_command,
    slice_overrides,
    split_overrides,
)
from detr_train.errors import DetrTrainError

log = logging.getLogger("detr_train.predict")

PROGRAM = "detr-train-predict"
DEFAULT_OUTPUT = Path("predictions")
DETECTIONS_FILE = "detections.json"
IMAGES_DIR = "images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class NoImagesError(DetrTrainError, FileNotFoundError):
    """The input names no image files."""


@dataclass(frozen=True)
class InputImage:
    path: Path
    name: str  # the path below the input folder: where its drawing goes


def find_images(inputs: list[str]) -> list[InputImage]:
    """The image files an input names: a file, a folder (searched recursively) or a glob."""
    found: list[InputImage] = []
    for value in inputs:
        path = Path(value).expanduser()
        if path.is_file():
            found.append(InputImage(path, path.name))
        elif path.is_dir():
            found += [InputImage(p, str(p.relative_to(path))) for p in sorted(path.rglob("*")) if _is_image(p)]
        elif glob.has_magic(value):
            found += [InputImage(Path(p), Path(p).name) for p in sorted(glob.glob(value, recursive=True))
                      if _is_image(Path(p))]
        else:
            raise NoImagesError(f"input not found: {value}")
    if not found:
        raise NoImagesError(f"no images in {', '.join(inputs)} (looked for {', '.join(IMAGE_SUFFIXES)})")
    names = [image.name for image in found]
    if len(set(names)) != len(names):  # two inputs with the same file name: keep them apart
        found = [InputImage(image.path, f"{index:06d}_{image.name}") for index, image in enumerate(found)]
    return found


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


class ImageFiles(Dataset):
    """Decoded images by index; None for one that cannot be read (the caller counts those)."""

    def __init__(self, images: list[InputImage]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        try:
            with Image.open(self.images[index].path) as image:
                return {"index": index, "image": image.convert("RGB")}
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            return {"index": index, "error": f"{type(exc).__name__}: {exc}"}


class InferenceCollator:
    """Readable images through the model's image processor; unreadable ones listed apart."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, samples: list[dict]) -> dict:
        readable = [s for s in samples if "image" in s]
        batch: dict = {"failed": [(s["index"], s["error"]) for s in samples if "error" in s],
                       "image_ids": [s["index"] for s in readable], "images": [s["image"] for s in readable]}
        if readable:
            encoded = self.processor(images=batch["images"], return_tensors="pt")
            batch.update(pixel_values=encoded["pixel_values"], pixel_mask=encoded["pixel_mask"],
                         orig_sizes=torch.tensor([(im.height, im.width) for im in batch["images"]]))
        return batch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="Detect objects in images with a trained model and draw them.")
    parser.add_argument("model", type=Path, help="a checkpoint file, a run directory, a save_pretrained folder or an exported .onnx file")
    parser.add_argument("inputs", nargs="+", metavar="IMAGES",
                        help="image files, folders or globs (quote globs); key=value items change the run's "
                             "config instead")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"results folder (default: {DEFAULT_OUTPUT}, or the next free {DEFAULT_OUTPUT}_N)")
    parser.add_argument("--threshold", type=float, default=0.3,
                        help="keep (and draw) detections scoring at least this (default 0.3)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="image-decoding processes (0: in this one)")
    parser.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                        help="autocast on a GPU (auto: bf16 where supported, else fp16); ignored on CPU")
    parser.add_argument("--no-draw", dest="draw", action="store_false", help="write detections.json only")
    add_slice_arguments(parser)
    add_common_arguments(parser)
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    from detr_train.errors import ConfigError

    if not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold {args.threshold}: must be between 0 and 1")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers}: must be 0 or more")


def _precision(amp: str, device: torch.device):
    from detr_train.modeling.precision import resolve_precision

    if amp == "off" or device.type != "cuda":
        return resolve_precision(False, "bfloat16", device)
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return resolve_precision(True, {"bf16": "bfloat16", "fp16": "float16"}[amp], device)


def predict_images(args: argparse.Namespace) -> None:
    from detr_train.evaluation.evaluator import predict
    from detr_train.evaluation.slicing import sliced_collator
    from detr_train.training.runtime import resolve_device, show_progress

    _check_arguments(args)
    inputs, overrides = split_overrides(args.inputs)
    slicing_overrides = slice_overrides(args)  # checks the options under their own names, first
    images = find_images(inputs)
    output = args.output or next_free_dir(DEFAULT_OUTPUT)
    refuse_taken_output(output, overwrite=args.overwrite)  # before the model loads
    device = resolve_device(args.device or "auto")
    model, class_names, processor, slicing = _load_model(args, overrides, slicing_overrides, device)
    collator = sliced_collator(InferenceCollator(processor), processor, slicing, args.batch_size)
    loader = DataLoader(ImageFiles(images), batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=collator, pin_memory=device.type == "cuda")
    precision = _precision(args.amp, device)
    # Filled as the images are drawn; detections.json, written last, marks a finished folder.
    claim_output_dir(output, overwrite=args.overwrite)
    failed: list[tuple[int, str]] = []
    detections: list[dict] = []
    progress = show_progress("auto" if args.progress is None else args.progress)
    for batch in _with_progress(loader, len(images), progress):
        failed += batch["failed"]
        if not batch["image_ids"]:
            continue
        found = [d for d in predict(model, [batch], processor, precision, device, int, slicing=slicing)
                 if d["score"] >= args.threshold]
        for detection in found:
            detection.update(file_name=str(images[detection["image_id"]].path),
                             category_name=class_names[detection["category_id"]])
        detections += found
        if args.draw:
            _draw(batch, found, images, class_names, output / IMAGES_DIR, args.threshold)
    atomic_write(output / DETECTIONS_FILE, json.dumps(detections))
    for index, error in failed:
        log.warning("skipped %s: cannot read it (%s)", images[index].path, error)
    log.info("%d detection(s) at score >= %g in %d image(s)%s; wrote %s", len(detections), args.threshold,
             len(images) - len(failed), f", {len(failed)} unreadable image(s) skipped" if failed else "", output)


def _load_model(args: argparse.Namespace, overrides: list[str], slicing_overrides: list[str],
                device: torch.device):
    """(model, class names, image processor, slice settings or None): a checkpoint, run dir or
    HF folder on its fast paths, slicing as its run did unless --slice says otherwise; or an
    exported `.onnx` graph run by ONNX Runtime (no transformers model code), slicing only on
    --slice."""
    from detr_train.evaluation.onnx_runtime import is_onnx_file, load_onnx
    from detr_train.evaluation.slicing import SliceSettings

    if is_onnx_file(args.model):
        if overrides:
            from detr_train.errors import ConfigError

            raise ConfigError(f"{args.model}: an ONNX model has no run config to change ({' '.join(overrides)})")
        loaded = load_onnx(args.model, device)
        slicing = None
        if args.slice:
            defaults = SliceSettings(args.slice)
            slicing = SliceSettings(args.slice, defaults.overlap if args.slice_overlap is None else args.slice_overlap,
                                    defaults.iou_threshold if args.slice_iou is None else args.slice_iou)
        return loaded.detector, loaded.class_names, loaded.processor, slicing
    from detr_train.evaluation.inference import load_for_inference
    from detr_train.modeling.fast_paths import apply_fast_paths

    loaded = load_for_inference(args.model, overrides + slicing_overrides, device)
    apply_fast_paths(loaded.model, loaded.cfg.model, loaded.cfg.training, device)
    return loaded.model, loaded.class_names, loaded.processor, SliceSettings.from_training(loaded.cfg.training)


def _with_progress(loader: DataLoader, total: int, show: bool):
    from tqdm import tqdm

    with tqdm(total=total, desc="predict", disable=not show, dynamic_ncols=True) as bar:
        for batch in loader:
            yield batch
            bar.update(len(batch["image_ids"]) + len(batch["failed"]))


def _draw(batch: dict, detections: list[dict], images: list[InputImage], class_names: list[str], folder: Path,
          threshold: float) -> None:
    from detr_train.reporting.drawing import coco_detections_drawable, draw_detections, save_image

    for image_id, image in zip(batch["image_ids"], batch["images"]):
        own = coco_detections_drawable([d for d in detections if d["image_id"] == image_id])
        drawn = draw_detections(image, own["boxes"], own["labels"], own["scores"], class_names,
                                score_threshold=threshold)
        target = folder / images[image_id].name
        suffix = target.suffix.lower()
        save_image(drawn, target if suffix in (".jpg", ".jpeg", ".png") else target.with_suffix(".png"))


def main(argv: list[str] | None = None) -> None:
    run_command(PROGRAM, build_parser(), predict_images, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
