"""Finding the checkpoint to resume from and reconciling its config with the new one.

Which side wins on resume:
- the checkpoint: architecture (`model`), classes, seed, and every other setting, so the
  resumed run is the same run;
- the user: the keys in USER_OVERRIDABLE (run length and logging/eval/checkpoint
  cadence, loader workers), each change noted in the log.
Other differences are listed in one warning and ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from detr_train.checkpoint import (
    KEY_CONFIG_YAML,
    CheckpointError,
    candidate_checkpoints,
    load_checkpoint,
)

log = logging.getLogger(__name__)

USER_OVERRIDABLE = (
    "training.epochs",
    "training.eval_every",
    "training.log_every",
    "training.progress",
    "training.export_hf",
    "training.checkpoint.keep_last",
    "training.checkpoint.every_n_steps",
    "training.resume",
    "data.num_workers",
    "data.persistent_workers",
    "output_root",
)


@dataclass
class ResumeTarget:
    checkpoint: Path
    payload: dict[str, Any]
    run_dir: Path
    skipped: list[str] = field(default_factory=list)


def _first_intact(checkpoint_dir: Path) -> tuple[Path, dict, list[str]] | tuple[None, None, list[str]]:
    skipped = []
    for candidate in candidate_checkpoints(checkpoint_dir):
        try:
            return candidate, load_checkpoint(candidate), skipped
        except CheckpointError as exc:
            skipped.append(str(exc))
    return None, None, skipped


def _from_run_dir(run_dir: Path) -> ResumeTarget:
    checkpoint_dir = run_dir / "checkpoints"
    path, payload, skipped = _first_intact(checkpoint_dir)
    if path is None:
        detail = "; ".join(skipped) if skipped else f"no checkpoints in {checkpoint_dir}"
        raise CheckpointError(f"run dir {run_dir} has no intact checkpoint to resume from ({detail})")
    return ResumeTarget(path, payload, run_dir, skipped)


def resume_in_place(run_dir: Path) -> ResumeTarget | None:
    """The run already in `run_dir`, if any: None for an empty (new) run dir.

    A run dir that holds checkpoints, none of them intact, is an error rather than a
    fresh start: starting over would overwrite what is left of that run.
    """
    if not candidate_checkpoints(run_dir / "checkpoints"):
        return None
    target = _from_run_dir(run_dir)
    log.info("%s already holds a run; continuing it from %s", run_dir, target.checkpoint.name)
    return target


def run_dir_of(checkpoint: Path) -> Path:
    """Checkpoints live in <run_dir>/checkpoints/; a file elsewhere is its own run dir's."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def find_resume_target(value: str, output_root: Path, name: str) -> ResumeTarget | None:
    """Resolve `training.resume` (file | run dir | auto). None: `auto` found nothing to resume."""
    if value == "auto":
        runs_root = output_root / name
        run_dirs = sorted(
            (p.parent.parent for p in runs_root.glob("*/checkpoints/*.pt")),
            key=lambda d: max(f.stat().st_mtime for f in (d / "checkpoints").glob("*.pt")),
            reverse=True,
        )
        seen: set[Path] = set()
        skipped_all: list[str] = []
        for run_dir in run_dirs:
            if run_dir in seen:
                continue
            seen.add(run_dir)
            path, payload, skipped = _first_intact(run_dir / "checkpoints")
            skipped_all += skipped
            if path is not None:
                return ResumeTarget(path, payload, run_dir, skipped_all)
        for reason in skipped_all:
            log.warning("skipped: %s", reason)
        return None
    path = Path(value).expanduser()
    if path.is_dir():
        return _from_run_dir(path)
    return ResumeTarget(path, load_checkpoint(path), run_dir_of(path))


def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for key, value in cfg.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: cfg}


def reconcile_config(checkpoint_yaml: str, new_cfg: DictConfig) -> DictConfig:
    """The config of the resumed run: the checkpoint's, with the user-overridable keys from `new_cfg`."""
    old = OmegaConf.create(checkpoint_yaml)
    new_flat = _flatten(OmegaConf.to_container(new_cfg, resolve=True))
    old_flat = _flatten(OmegaConf.to_container(old, resolve=True))
    merged = OmegaConf.create(OmegaConf.to_container(old, resolve=True))
    ignored = []
    for key in sorted(set(old_flat) | set(new_flat)):
        if old_flat.get(key) == new_flat.get(key) or key.startswith("trial."):
            continue
        if any(key == k or key.startswith(k + ".") for k in USER_OVERRIDABLE):
            if key != "training.resume":
                log.info("resume: %s changed %r -> %r (the new value wins)", key, old_flat.get(key), new_flat.get(key))
            OmegaConf.update(merged, key, new_flat.get(key), force_add=True)
        else:
            ignored.append(f"{key}: checkpoint {old_flat.get(key)!r}, now {new_flat.get(key)!r}")
    if ignored:
        log.warning(
            "resume: these settings differ from the checkpoint's and are ignored (the checkpoint's "
            "values are kept so the run continues unchanged): %s", "; ".join(ignored)
        )
    # The search channel belongs to this process, not to the checkpoint.
    if "trial" in new_cfg:
        merged.trial = OmegaConf.create(OmegaConf.to_container(new_cfg.trial, resolve=True))
    return merged


def checkpoint_config_yaml(payload: dict) -> str:
    return str(payload[KEY_CONFIG_YAML])
