"""`detr-train-export`: a trained model as an ONNX graph or a save_pretrained folder.

    detr-train-export outputs/default/2026-11-27_10-00-00                   # ./model.onnx
    detr-train-export run/checkpoints/last.pt --output street.onnx
    detr-train-export run --format hf --output deformable-detr-bdd          # from_pretrained loads it

The model is what `detr-train-predict` takes: a checkpoint, a run directory (its best.pt:
the weights the run scored) or a save_pretrained folder; `key=value` items change the run's
config (e.g. `data.eval_size=800` for the image processor stored with the export).

`--format onnx` writes one file holding the graph (inputs pixel_values and pixel_mask with a
dynamic batch and image size, outputs logits and pred_boxes) and, as metadata, the class
names and the image processor's settings. It is written only after ONNX Runtime has matched
PyTorch's outputs within 1e-4 on two image sizes other than the traced one. `--format hf`
writes the folder `from_pretrained` loads. An existing output is never replaced unless
--overwrite is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from detr_train.cli.common import OutputExistsError, run_command, split_overrides

log = logging.getLogger("detr_train.export")

PROGRAM = "detr-train-export"
FORMATS = ("onnx", "hf")
DEFAULT_OUTPUTS = {"onnx": Path("model.onnx"), "hf": Path("hf_model")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM,
                                     description="Export a trained model to ONNX (verified by ONNX Runtime) or as a "
                                                 "save_pretrained folder.")
    parser.add_argument("model", type=Path, help="a checkpoint file, a run directory or a save_pretrained folder")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="changes to the run's config")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="onnx (default) or hf (save_pretrained)")
    parser.add_argument("--output", type=Path, default=None,
                        help="the file or folder to write (default: ./model.onnx, or ./hf_model for hf)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the newest the exporter writes)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for expected errors too")
    return parser


def export_model(args: argparse.Namespace) -> None:
    import torch

    from detr_train.errors import ConfigError

    paths, overrides = split_overrides(args.overrides)
    if paths:
        raise ConfigError(f"unexpected argument(s) {' '.join(paths)}: give one model, then key=value overrides")
    if args.format == "hf" and args.opset is not None:
        raise ConfigError("--opset applies to --format onnx only")
    output = args.output or DEFAULT_OUTPUTS[args.format]
    if output.exists() and not args.overwrite:  # before the model loads
        raise OutputExistsError(f"output {output} already exists",
                                hint="choose another with --output, or pass --overwrite to replace it")
    if args.format == "onnx":
        from detr_train.modeling.onnx_export import require_onnx

        require_onnx()  # before the model loads, too
    if Path(args.model).suffix.lower() == ".onnx":
        raise ConfigError(f"{args.model} is already an ONNX graph: export from a checkpoint, run dir or HF folder")

    from detr_train.evaluation.inference import load_for_inference

    loaded = load_for_inference(args.model, overrides, torch.device("cpu"))
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "hf":
        from detr_train.modeling.hf_export import save_pretrained_folder

        save_pretrained_folder(loaded.model, loaded.processor, loaded.cfg.model, output)
        log.info("Wrote %s (%s weights of %s): a save_pretrained folder with the image processor", output,
                 loaded.weights, loaded.source)
        return
    _export_onnx(loaded, output, args.opset)


def _export_onnx(loaded, output: Path, opset: int | None) -> None:
    from detr_train.checkpointing.atomic import atomic_write
    from detr_train.modeling.onnx_export import OPSET, export_onnx

    graph, parity = export_onnx(loaded.model, loaded.class_names, loaded.processor,
                                source=f"{loaded.source} ({loaded.weights} weights)", opset=opset or OPSET)
    atomic_write(output, graph)
    log.info("Wrote %s (%.1f MB, %s weights of %s); %s", output, len(graph) / 1e6, loaded.weights, loaded.source,
             parity.describe())


def main(argv: list[str] | None = None) -> None:
    run_command(PROGRAM, build_parser(), export_model, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
