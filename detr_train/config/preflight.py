"""Compose and check the config before Hydra creates a run directory.

`@hydra.main` makes the run dir, saves the config there and opens the log before it
calls the task function, and it prints composition errors as several lines with a
pointer to HYDRA_FULL_ERROR. `preflight(argv)` composes the same config first (the
same config tree, the same overrides, sweeps left out) and raises one `ConfigError`
naming the key or value at fault, so a mistake leaves no files and reads as one line.
"""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from detr_train.config.checks import check_config
from detr_train.config.migrate import moved_key_message
from detr_train.config.paths import config_dir
from detr_train.errors import ConfigError

# Flags after which Hydra runs no job (or not with our config): nothing to check.
_NO_JOB_FLAGS = ("help", "hydra_help", "cfg", "shell_completion", "info", "experimental_rerun", "config_path",
                 "config_name", "config_dir")


def preflight(argv: list[str]) -> DictConfig | None:
    """Compose the config `argv` asks for and check it; returns it (None when no job would run)."""
    args, _ = get_args_parser().parse_known_args(argv)
    if any(getattr(args, flag, None) for flag in _NO_JOB_FLAGS):
        return None
    cfg = compose_checked(_without_sweeps(args.overrides))
    _check_device_exists(cfg.training.device)
    return cfg


def compose_checked(overrides: list[str]) -> DictConfig:
    """The project's config composed with Hydra-style overrides and checked (no `hydra` node);
    a ConfigError naming the override or key at fault otherwise."""
    for override in overrides:
        moved = moved_key_message(override)
        if moved is not None:
            raise ConfigError(moved)
    try:
        cfg = _compose(overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(composition_error(exc), hint=_hint(exc)) from exc
    except AssertionError as exc:
        # OmegaConf asserts instead of raising when an override reaches under a null node
        # (data.generate.x with data=coco): find which override it was.
        culprit = _first_failing(overrides)
        raise ConfigError(f"cannot apply {culprit}: its parent key is null in this config") from exc
    with open_dict(cfg):
        cfg.pop("hydra", None)
    check_config(cfg)
    return cfg


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("config", overrides=overrides)


def _first_failing(overrides: list[str]) -> str:
    for count in range(1, len(overrides) + 1):
        try:
            _compose(overrides[:count])
        except (AssertionError, HydraException, OmegaConfBaseException):
            return overrides[count - 1]
    return " ".join(overrides)


def _without_sweeps(overrides: list[str]) -> list[str]:
    """The overrides that are plain values: a search's sweeps are checked per trial."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(composition_error(exc)) from exc
    return [o.input_line for o in parsed if not o.is_sweep_override()]


def composition_error(exc: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line that keeps the culprit."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept: list[str] = []
    for line in lines:
        if line.startswith(("Config search path", "Set the environment variable")):
            break
        if line.startswith("To append to your config"):
            continue  # the schema refuses unknown keys, appended or not
        if line and not line.startswith(("full_key:", "object_type=", "reference_type=")):
            kept.append(line)
    cause = exc.__cause__
    if cause is not None:
        cause_line = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
        if cause_line and cause_line not in kept:
            kept.append(cause_line)
    return " ".join(_join_options(kept))


def _join_options(lines: list[str]) -> list[str]:
    # "Available options in 'data':" followed by one option per line reads better on one line.
    out: list[str] = []
    for line in lines:
        if out and out[-1].startswith("Available options") and not line.endswith(":"):
            out[-1] += (" " if out[-1].endswith(":") else ", ") + line
        else:
            out.append(line)
    return out


# Config groups nested in a node: chosen with a slash (data/augment=detr), not a dot.
_NESTED_GROUPS = ("data.augment",)


def _hint(exc: BaseException) -> str | None:
    for group in _NESTED_GROUPS:
        if f"override {group}=" in str(exc):
            return f"{group} is a config group: choose a preset with {group.replace('.', '/')}=<name>"
    if "Could not override" in str(exc) or "not in struct" in str(exc.__cause__ or ""):
        return "list the keys and their values with `detr-train --cfg job`"
    return None


def _check_device_exists(device: str) -> None:
    # Only a run that names CUDA pays for importing torch here.
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"training.device={device!r} but CUDA is not available on this machine",
                              hint="use training.device=auto or cpu")
