"""The search space: Hydra's sweep grammar turned into Optuna distributions.

The grammar is the one users already know from `-m` sweeps and from the upstream
hydra-optuna-sweeper:

    interval(a, b)             FloatDistribution(a, b)            (interval always means floats)
    tag(log, interval(a, b))   FloatDistribution(a, b, log=True)
    range(a, b, s)  (ints)     IntDistribution(a, last, step=s)   `last`: the last value Hydra's
    range(a, b, s)  (floats)   FloatDistribution(a, last, step=s)  range yields (b is exclusive)
    tag(log, range(a, b))      IntDistribution(a, last, log=True)
    choice(x, y, ...) / x,y    CategoricalDistribution([x, y, ...])
    shuffle(...)               CategoricalDistribution of the values (order is irrelevant)

Anything that is not a sweep (`training.epochs=3`) is a fixed override passed to every job.
A key given twice keeps its last definition, so a command-line `training.lr=1e-4` pins a
parameter that a preset searches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.errors import HydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from detr_train.search.errors import SearchConfigError
from detr_train.search.overrides import override as format_override

_CATEGORICAL_TYPES = (str, int, float, bool, type(None))


@dataclass
class SearchSpace:
    """What to sample (`distributions`, by override key) and what to pass unchanged (`fixed`)."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: dict[str, str] = field(default_factory=dict)  # key -> the override exactly as written
    sources: dict[str, str] = field(default_factory=dict)  # key -> the sweep as written, for messages

    def overrides_for(self, values: Mapping[str, Any]) -> list[str]:
        """The overrides of one job: the fixed ones, then the sampled values."""
        return list(self.fixed.values()) + [format_override(key, values[key]) for key in self.distributions]

    def probe_values(self) -> list[dict[str, Any]]:
        """Value sets that together touch every parameter and every choice, to test composition.

        The first set takes the lowest value / first choice of everything; each further set
        swaps in one other choice of one categorical parameter (a config group option that
        does not exist only shows when it is selected).
        """
        base = {key: _representative(dist) for key, dist in self.distributions.items()}
        probes = [base]
        for key, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                probes += [{**base, key: choice} for choice in dist.choices[1:]]
        return probes


def parse_search_space(
    params: Mapping[str, Any] | None,
    arguments: Sequence[str] = (),
    parser: OverridesParser | None = None,
) -> SearchSpace:
    """Parse `hydra.sweeper.params` and the command-line overrides into a SearchSpace.

    Raises SearchConfigError, naming the offending text, for malformed grammar, values
    Optuna cannot represent, or a space with nothing to search.
    """
    parser = parser or OverridesParser.create()
    lines = [f"{key}={value}" for key, value in (params or {}).items()] + list(arguments)
    space = SearchSpace()
    for line in lines:
        parsed = _parse_line(parser, line)
        key = parsed.get_key_element()
        # The last definition of a key wins, whether it is a sweep or a fixed value.
        space.distributions.pop(key, None)
        space.fixed.pop(key, None)
        if parsed.is_sweep_override():
            space.distributions[key] = distribution_from_override(parsed)
            space.sources[key] = line
        else:
            space.fixed[key] = parsed.input_line or line
    if not space.distributions:
        raise SearchConfigError(
            "The search space is empty: give hydra.sweeper.params (or command-line sweeps) at least "
            "one parameter to search, e.g. 'training.lr=tag(log, interval(1e-5, 1e-3))'."
        )
    return space


def distribution_from_override(parsed: Override) -> BaseDistribution:
    """The Optuna distribution for one sweep override (see the module docstring)."""
    line = parsed.input_line
    try:
        if parsed.is_interval_sweep():
            return _interval_distribution(parsed)
        if parsed.is_range_sweep() and not parsed.value().shuffle:
            return _range_distribution(parsed)
        if parsed.is_choice_sweep() or parsed.is_range_sweep():
            return _categorical_distribution(parsed)
    except ValueError as error:  # Optuna's own checks: low > high, step does not fit, ...
        raise SearchConfigError(f"Search parameter '{line}' is not a valid Optuna distribution: {error}") from error
    raise SearchConfigError(f"Search parameter '{line}': this kind of sweep is not supported by the sweeper.")


def grid_choices(space: SearchSpace) -> dict[str, list[Any]]:
    """Every value of every parameter, for Optuna's GridSampler; continuous intervals are refused."""
    return {key: _grid_values(key, dist, space.sources.get(key, key)) for key, dist in space.distributions.items()}


def _parse_line(parser: OverridesParser, line: str) -> Override:
    try:
        return parser.parse_override(line)
    except HydraException as error:
        raise SearchConfigError(f"Cannot parse search parameter '{line}': {error}") from error


def _interval_distribution(parsed: Override) -> FloatDistribution:
    interval = parsed.value()
    # Hydra turns both ends of interval() into floats, so an interval is always continuous.
    return FloatDistribution(float(interval.start), float(interval.end), log="log" in interval.tags)


def _range_distribution(parsed: Override) -> BaseDistribution:
    sweep = parsed.value()
    values = list(parsed.sweep_iterator(transformer=Transformer.identity))
    if not values:
        raise SearchConfigError(f"Search parameter '{parsed.input_line}' is an empty range.")
    low, high, step = min(values), max(values), abs(sweep.step)
    log = "log" in sweep.tags
    if all(isinstance(v, int) for v in values) and isinstance(sweep.step, int):
        if log and step != 1:
            raise SearchConfigError(
                f"Search parameter '{parsed.input_line}': Optuna samples integers on a log scale only with step 1."
            )
        return IntDistribution(int(low), int(high), log=log, step=1 if log else int(step))
    if log:
        raise SearchConfigError(
            f"Search parameter '{parsed.input_line}': a log scale with a float step is not supported; "
            "use tag(log, interval(a, b))."
        )
    return FloatDistribution(float(low), float(high), step=float(step))


def _categorical_distribution(parsed: Override) -> CategoricalDistribution:
    choices = list(parsed.sweep_iterator(transformer=Transformer.identity))
    bad = [c for c in choices if not isinstance(c, _CATEGORICAL_TYPES)]
    if bad:
        raise SearchConfigError(
            f"Search parameter '{parsed.input_line}': choices must be strings, numbers, booleans or null; "
            f"got {bad[0]!r}."
        )
    return CategoricalDistribution(choices)


def _representative(dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0]
    return dist.low  # Int/FloatDistribution


def _grid_values(key: str, dist: BaseDistribution, source: str) -> list[Any]:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        n_values = round((dist.high - dist.low) / dist.step) + 1
        return [dist.low + i * dist.step for i in range(n_values)]
    raise SearchConfigError(
        f"The grid sampler needs a finite set of values, but '{source}' is continuous: "
        f"use choice(...) or range(...) for '{key}'."
    )


def describe(space: SearchSpace) -> Iterable[str]:
    """One line per parameter, for the sweep's log."""
    for key, dist in space.distributions.items():
        yield f"{key}: {dist}"
