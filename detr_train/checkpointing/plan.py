"""The resume plan: the one place that decides between a new run and a continued one.

`plan(cfg, fresh_dir)` reads `training.resume` and the run directory Hydra just made:

- `training.resume=<file>`: continue from that checkpoint, in its run directory;
- `training.resume=<run dir>`: continue from that run's newest intact checkpoint;
- `training.resume=auto`: the newest resumable run under `<output_root>/<name>/`, or a new
  run when there is none;
- `training.resume=null` (the default): a new run, unless `fresh_dir` already holds one
  (a requeued SLURM job, a fixed `hydra.run.dir`, a search trial run again), which then
  continues instead of being overwritten.

Which side wins on resume:
- the checkpoint: architecture (`model`), classes, seed, and every other setting, so the
  resumed run is the same run;
- the user: the keys in USER_OVERRIDABLE and USER_CHOSEN_NODES (run length, logging/eval/checkpoint cadence,
  plots and trackers, loader workers, where the dataset lives), each change noted in the log.
Other differences are listed in one warning and ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from detr_train.checkpointing.checkpointer import Found, first_intact, newest_resumable
from detr_train.checkpointing.format import KEY_CONFIG_YAML, CheckpointError, load_checkpoint
from detr_train.config.migrate import upgrade_config
from detr_train.config.schema import Config

log = logging.getLogger(__name__)

USER_OVERRIDABLE = (
    "training.epochs",
    "training.eval_every",
    "training.log_every",
    "training.progress",
    "training.export_hf",
    # What a run draws and logs for people to look at changes nothing it computes.
    "training.plots",
    "training.vis_images",
    "training.vis_score_threshold",
    "training.checkpoint.keep_last",
    "training.checkpoint.every_n_steps",
    "data.num_workers",
    "data.persistent_workers",
    "data.root",
    "output_root",
)
# Keys that belong to this invocation, never to the checkpoint: how it was asked to resume,
# and the search trial it reports to.
PROCESS_KEYS = ("training.resume", "trial")
# User-overridable too, but taken whole: their options are null or a mapping (`logger.mlflow`),
# which key-by-key merging would leave half switched.
USER_CHOSEN_NODES = ("logger",)


@dataclass
class Plan:
    cfg: DictConfig
    run_dir: Path
    resume_from: Found | None = None

    @property
    def checkpoint(self) -> Path | None:
        return None if self.resume_from is None else self.resume_from.path


def plan(cfg: DictConfig, fresh_dir: Path) -> Plan:
    """The config, run directory and checkpoint of this invocation; reads checkpoints, not Hydra."""
    fresh_dir = Path(fresh_dir)
    if cfg.training.resume:
        found = _find(str(cfg.training.resume), Path(cfg.output_root) / cfg.name)
        if found is None:
            log.info("training.resume=auto: no resumable run under %s/%s; starting a new run", cfg.output_root, cfg.name)
    else:
        found = first_intact(fresh_dir)
        if found is not None:
            log.info("%s already holds a run; continuing it from %s", fresh_dir, found.path.name)
    if found is None:
        return Plan(cfg, fresh_dir)
    for reason in found.skipped:
        log.warning("skipped checkpoint: %s", reason)
    return Plan(reconcile_config(found, cfg), found.run_dir, found)


def _find(value: str, runs_root: Path) -> Found | None:
    if value == "auto":
        found, skipped = newest_resumable(runs_root)
        for reason in skipped:
            log.warning("skipped: %s", reason)
        return found
    path = Path(value).expanduser()
    if path.is_dir():
        found = first_intact(path)
        if found is None:
            raise CheckpointError(f"run dir {path} has no checkpoints to resume from (expected {path}/checkpoints/*.pt)")
        return found
    return Found(path, load_checkpoint(path))


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _is_under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def checkpoint_config(found: Found) -> DictConfig:
    """The checkpoint's config, typed by today's schema (keys added since get their defaults)."""
    try:
        saved = upgrade_config(OmegaConf.to_container(OmegaConf.create(str(found.payload[KEY_CONFIG_YAML]))))
        return OmegaConf.merge(OmegaConf.structured(Config), saved)
    except OmegaConfBaseException as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {found.path}: its config does not fit this detr_train ({first_line})") from exc


def reconcile_config(found: Found, new_cfg: DictConfig) -> DictConfig:
    """The config of the resumed run: the checkpoint's, with the user-overridable keys from `new_cfg`."""
    merged = checkpoint_config(found)
    old_flat = _flatten(OmegaConf.to_container(merged, resolve=True, enum_to_str=True))
    new_flat = _flatten(OmegaConf.to_container(new_cfg, resolve=True, enum_to_str=True))
    ignored = []
    for key in USER_CHOSEN_NODES:
        old, new = (OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True) for cfg in (merged, new_cfg))
        if old != new:
            log.info("resume: %s changed %r -> %r (the new value wins)", key, old, new)
            # A copy of the new node, typed as the schema types it.
            merged[key] = OmegaConf.merge(OmegaConf.select(merged, key), OmegaConf.select(new_cfg, key))
    for key in sorted(set(old_flat) | set(new_flat)):
        old, new = old_flat.get(key), new_flat.get(key)
        if old == new or _is_under(key, PROCESS_KEYS + USER_CHOSEN_NODES):
            continue
        if _is_under(key, USER_OVERRIDABLE):
            log.info("resume: %s changed %r -> %r (the new value wins)", key, old, new)
            OmegaConf.update(merged, key, new)
        else:
            ignored.append(f"{key}: checkpoint {old!r}, now {new!r}")
    if ignored:
        log.warning(
            "resume: these settings differ from the checkpoint's and are ignored (the checkpoint's "
            "values are kept so the run continues unchanged): %s", "; ".join(ignored)
        )
    for key in PROCESS_KEYS:
        OmegaConf.update(merged, key, OmegaConf.select(new_cfg, key), merge=False)
    return merged
