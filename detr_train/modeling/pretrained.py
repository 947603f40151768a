"""Pretrained weights: a whole Deformable DETR (`model.pretrained`) or an ImageNet backbone
(`model.backbone.pretrained`), from the Hugging Face hub, its cache, or a local file.

Offline, both fail within seconds with one message that says what to do instead: a cached
copy is tried first, then the hub's reachability is probed (the hub client alone would
retry for half a minute before giving up).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch

from detr_train.errors import DetrTrainError

log = logging.getLogger(__name__)


class PretrainedUnavailableError(DetrTrainError, RuntimeError):
    """Pretrained weights were asked for but cannot be found or fetched."""


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the model hub cannot be reached, or None."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set and the weights are not in the local cache"
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot reach {constants.ENDPOINT}: {exc}"
    return None


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make the hub client read its cache only (it checks this flag at call time)."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def _looks_local(source: str, *, suffixes: tuple[str, ...] | None = None) -> bool:
    """A path rather than a hub name: it exists, starts like a path, or (when `suffixes` are
    given) ends like a weights file; otherwise any suffix counts (hub ids have none)."""
    if Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
        return True
    suffix = Path(source).suffix
    return suffix in suffixes if suffixes is not None else bool(suffix)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# --- the whole detector --------------------------------------------------------------------


def load_detector(source: str, class_names: list[str]):
    """A DeformableDetrForObjectDetection from a hub id or a save_pretrained folder, any variant
    (plain, box refinement, two-stage); its class head re-initialised for `class_names`."""
    from transformers import DeformableDetrForObjectDetection

    label_kwargs = {
        "num_labels": len(class_names),
        "id2label": dict(enumerate(class_names)),
        "label2id": {name: i for i, name in enumerate(class_names)},
        # The class head is re-initialised for this dataset's classes.
        "ignore_mismatched_sizes": True,
    }
    local = Path(source).expanduser()
    if _looks_local(source):
        if not local.is_dir():
            raise PretrainedUnavailableError(f"model.pretrained={source!r}: no such local folder")
        return _from_pretrained(DeformableDetrForObjectDetection, str(local), label_kwargs, source)
    try:
        # A cached copy needs no network at all.
        return DeformableDetrForObjectDetection.from_pretrained(source, local_files_only=True, **label_kwargs)
    except OSError:
        pass
    problem = hub_unreachable()
    if problem:
        raise PretrainedUnavailableError(
            f"could not load model.pretrained={source!r}: {problem}",
            hint="train from scratch with model.pretrained=null, or point model.pretrained at a local folder "
                 "written by save_pretrained (or a downloaded hub snapshot)",
        )
    return _from_pretrained(DeformableDetrForObjectDetection, source, label_kwargs, source)


def _from_pretrained(model_class, where: str, kwargs: dict, source: str):
    try:
        return model_class.from_pretrained(where, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise PretrainedUnavailableError(f"could not load model.pretrained={source!r} ({_first_line(exc)})") from exc


# --- an ImageNet backbone from timm --------------------------------------------------------


def timm_architecture(name: str) -> str:
    """`resnet50.a1_in1k` -> `resnet50`: the architecture, without the pretrained tag."""
    return name.split(".", 1)[0]


def load_timm_backbone_weights(backbone: torch.nn.Module, pretrained: str, architecture: str,
                               out_indices: list[int]) -> None:
    """Copy timm's pretrained weights into the detector's (timm) backbone.

    `pretrained` is a timm model name with its pretrained tag (`resnet50.a1_in1k`) or a local
    weights file for `architecture`. BatchNorm statistics land in the detector's frozen
    BatchNorm layers, whose parameter names are BatchNorm's.
    """
    import timm

    local = Path(pretrained).expanduser()
    options = {"features_only": True, "out_indices": tuple(out_indices)}
    try:
        if _looks_local(pretrained, suffixes=WEIGHT_FILE_SUFFIXES):
            if not local.is_file():
                raise PretrainedUnavailableError(f"model.backbone.pretrained={pretrained!r}: no such file")
            source = timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay={"file": str(local)},
                                       **options)
        else:
            source = _timm_from_hub(timm, pretrained, options)
    except (OSError, RuntimeError, ValueError) as exc:
        if isinstance(exc, PretrainedUnavailableError):
            raise
        raise PretrainedUnavailableError(
            f"could not load model.backbone.pretrained={pretrained!r} ({_first_line(exc)})",
            hint="use a timm model name with pretrained weights (e.g. resnet50.a1_in1k) or a local weights file "
                 "with model.backbone.name",
        ) from exc
    missing, unexpected = backbone.load_state_dict(source.state_dict(), strict=False)
    if missing or unexpected:
        raise PretrainedUnavailableError(
            f"model.backbone.pretrained={pretrained!r} does not fit the backbone "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    log.info("Backbone weights from timm %s", pretrained)


def _timm_from_hub(timm, name: str, options: dict):
    try:
        with _hub_offline():
            return timm.create_model(name, pretrained=True, **options)
    except (OSError, RuntimeError, ValueError):
        pass  # not in the cache
    problem = hub_unreachable()
    if problem:
        raise PretrainedUnavailableError(
            f"could not load model.backbone.pretrained={name!r}: {problem}",
            hint="train the backbone from scratch (model.backbone.pretrained=null), or give a local weights file "
                 "with model.backbone.name",
        )
    return timm.create_model(name, pretrained=True, **options)
