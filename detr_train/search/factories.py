"""Build Optuna samplers and pruners from `_target_` configs (hydra.sweeper.sampler / .pruner)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from detr_train.search.errors import SearchConfigError
from detr_train.search.space import SearchSpace, grid_choices


def build_sampler(sampler_cfg: DictConfig | Mapping[str, Any], space: SearchSpace, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler; the grid sampler gets its grid from the search space.

    `seed_offset` is the number of trials the study already holds: a resumed study must not
    replay the random draws of its first run, so its seed moves on by that much.
    """
    spec = _as_dict(sampler_cfg, "sampler")
    sampler_class = _locate(spec, "sampler")
    extra: dict[str, Any] = {}
    if spec.get("seed") is not None and seed_offset:
        extra["seed"] = int(spec["seed"]) + seed_offset
    if issubclass(sampler_class, optuna.samplers.GridSampler):
        extra["search_space"] = grid_choices(space)
    return _instantiate(spec, "sampler", **extra)


def grid_size(space: SearchSpace) -> int:
    """Number of points in the grid the GridSampler walks."""
    size = 1
    for values in grid_choices(space).values():
        size *= len(values)
    return size


def is_grid(sampler: optuna.samplers.BaseSampler) -> bool:
    return isinstance(sampler, optuna.samplers.GridSampler)


def pruner_spec(pruner_cfg: DictConfig | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The pruner config as a plain dict (stored in the study for the jobs), checked by building it."""
    if pruner_cfg is None:
        return None
    spec = _as_dict(pruner_cfg, "pruner")
    build_pruner(spec)
    return spec


def build_pruner(spec: Mapping[str, Any] | None) -> optuna.pruners.BasePruner:
    """The pruner described by `spec`; no spec means never prune."""
    if spec is None:
        return optuna.pruners.NopPruner()
    return _instantiate(dict(spec), "pruner")


def _as_dict(cfg: DictConfig | Mapping[str, Any], what: str) -> dict[str, Any]:
    spec = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise SearchConfigError(
            f"hydra.sweeper.{what} needs a `_target_` (an Optuna {what} class), e.g. "
            f"`hydra/sweeper/{what}=...` to pick a preset; got {spec!r}"
        )
    return spec


def _locate(spec: Mapping[str, Any], what: str) -> type:
    try:
        return get_class(spec["_target_"])
    except Exception as error:  # noqa: BLE001 - Hydra wraps lookup failures in several types
        raise SearchConfigError(f"hydra.sweeper.{what}: cannot find class '{spec['_target_']}': {error}") from error


def _instantiate(spec: Mapping[str, Any], what: str, **extra: Any) -> Any:
    try:
        built = instantiate(dict(spec), **extra)
    except Exception as error:  # noqa: BLE001 - Hydra wraps bad arguments in several types
        cause = error.__cause__ or error
        raise SearchConfigError(f"Cannot build hydra.sweeper.{what} {spec['_target_']}: {cause}") from error
    _check_optional_dependency(built)
    return built


def _check_optional_dependency(built: Any) -> None:
    # Optuna imports the cmaes package only when the CMA-ES sampler first samples, i.e. in
    # the middle of the sweep; check now so the sweep fails before its first trial instead.
    if isinstance(built, optuna.samplers.CmaEsSampler):
        try:
            import cmaes  # noqa: F401
        except ImportError as error:
            raise SearchConfigError("The CMA-ES sampler needs the `cmaes` package: pip install cmaes") from error
