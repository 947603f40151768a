"""The sweep grammar -> Optuna distributions, the override writer, samplers and pruners from config."""

from __future__ import annotations

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from detr_train.search.errors import SearchConfigError
from detr_train.search.factories import build_pruner, build_sampler, grid_size, pruner_spec
from detr_train.search.overrides import format_value, quote
from detr_train.search.space import grid_choices, parse_search_space


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        ("interval(0.1, 0.9)", FloatDistribution(0.1, 0.9)),
        ("interval(1, 10)", FloatDistribution(1.0, 10.0)),  # Hydra makes interval ends floats
        ("tag(log, interval(1e-5, 1e-3))", FloatDistribution(1e-5, 1e-3, log=True)),
        ("range(1, 5)", IntDistribution(1, 4)),  # Hydra's range excludes its stop
        ("range(0, 10, 3)", IntDistribution(0, 9, step=3)),
        ("range(8, 0, -2)", IntDistribution(2, 8, step=2)),
        ("tag(log, range(1, 65))", IntDistribution(1, 64, log=True)),
        ("range(0, 1, 0.25)", FloatDistribution(0.0, 0.75, step=0.25)),
        ("choice(10, 20, 40)", CategoricalDistribution([10, 20, 40])),
        ("choice(sgd, adamw)", CategoricalDistribution(["sgd", "adamw"])),
        ("choice(true, false)", CategoricalDistribution([True, False])),
        ("10,20", CategoricalDistribution([10, 20])),
        ("shuffle(range(1, 4))", CategoricalDistribution([1, 2, 3])),
    ],
)
def test_sweep_grammar_gives_the_intended_distribution(sweep, expected):
    space = parse_search_space({"training.x": sweep})
    dist = space.distributions["training.x"]
    if "shuffle" in sweep:  # the order of a shuffled range is random; its values are not
        assert sorted(dist.choices) == sorted(expected.choices)
    else:
        assert dist == expected


def test_params_and_command_line_combine_and_the_last_definition_wins():
    space = parse_search_space(
        {"training.lr": "tag(log, interval(1e-5, 1e-3))", "model.num_queries": "choice(10, 20)", "training.epochs": 3},
        ["model.num_queries=30", "data.num_workers=0", "+extra=choice(a, b)"],
    )
    assert list(space.distributions) == ["training.lr", "+extra"]
    assert space.fixed == {"training.epochs": "training.epochs=3", "model.num_queries": "model.num_queries=30", "data.num_workers": "data.num_workers=0"}


def test_overrides_for_a_trial_round_trip_through_hydras_parser():
    space = parse_search_space({"a": "interval(0, 1)", "b": "choice(x, 'y z', 1e-3, true)", "c": "range(1, 4)"}, ["d=5"])
    values = {"a": 0.1 + 0.2, "b": "y z", "c": 3}
    parser = OverridesParser.create()
    parsed = {o.get_key_element(): o.value() for o in parser.parse_overrides(space.overrides_for(values))}
    assert parsed == {"d": 5, "a": 0.1 + 0.2, "b": "y z", "c": 3}


@pytest.mark.parametrize("text", ["/tmp/a b/study.log", "postgresql://u:p@host/db?x=1", "it's", "back\\slash", "tail\\", "a\\'b", "1e-3", "true"])
def test_quoted_strings_parse_back_unchanged(text):
    parsed = OverridesParser.create().parse_override(f"k={quote(text)}")
    assert parsed.value() == text


def test_format_value_keeps_types():
    assert [format_value(v) for v in (None, True, 3, 0.1, "1e-3")] == ["null", "true", "3", "0.1", "'1e-3'"]


def test_probe_values_cover_every_choice():
    space = parse_search_space({"a": "interval(0, 1)", "model": "choice(small, big, huge)"})
    assert space.probe_values() == [{"a": 0.0, "model": "small"}, {"a": 0.0, "model": "big"}, {"a": 0.0, "model": "huge"}]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "search space is empty"),
        ({"training.epochs": 3}, "search space is empty"),
        ({"training.lr": "interval(1e-5"}, "Cannot parse search parameter 'training.lr=interval(1e-5'"),
        ({"training.lr": "intervall(1, 2)"}, "Unknown function 'intervall'"),
        ({"training.lr": "interval(0.5, 0.1)"}, "not a valid Optuna distribution"),
        ({"a": "choice([1, 2], [3])"}, "choices must be strings, numbers, booleans or null"),
        ({"a": "tag(log, range(1, 10, 2))"}, "log scale only with step 1"),
    ],
)
def test_bad_search_spaces_are_refused_with_the_offending_text(params, message):
    with pytest.raises(SearchConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_search_space(params)


def test_grid_needs_discrete_params():
    space = parse_search_space({"a": "choice(1, 2, 3)", "b": "range(0, 1, 0.5)"})
    assert grid_choices(space) == {"a": [1, 2, 3], "b": [0.0, 0.5]}
    assert grid_size(space) == 6
    with pytest.raises(SearchConfigError, match="grid sampler needs a finite set of values.*interval"):
        grid_choices(parse_search_space({"a": "interval(0, 1)"}))


@pytest.mark.parametrize("name", ["tpe", "random", "grid", "cmaes"])
def test_every_sampler_preset_builds(name):
    from detr_train.search.config import _SAMPLERS

    if name == "cmaes":
        pytest.importorskip("cmaes")
    spec = {k: v for k, v in vars(_SAMPLERS[name]()).items()}
    space = parse_search_space({"a": "choice(1, 2)", "b": "range(0, 3)"})
    sampler = build_sampler(spec, space)
    assert type(sampler).__name__ == spec["_target_"].rsplit(".", 1)[1]


def test_a_resumed_study_moves_the_sampler_seed_on():
    import optuna

    space = parse_search_space({"a": "interval(0, 1)"})
    spec = {"_target_": "optuna.samplers.RandomSampler", "seed": 5}

    def first_draw(sampler):
        return optuna.create_study(sampler=sampler).ask(space.distributions).params["a"]

    assert first_draw(build_sampler(spec, space)) == first_draw(build_sampler(spec, space))
    assert first_draw(build_sampler(spec, space)) != first_draw(build_sampler(spec, space, seed_offset=3))


@pytest.mark.parametrize("name", ["median", "threshold", "hyperband", "successive_halving", "nop"])
def test_every_pruner_preset_builds_from_its_stored_spec(name):
    from detr_train.search.config import _PRUNERS

    spec = pruner_spec({k: v for k, v in vars(_PRUNERS[name]()).items()})
    assert type(build_pruner(spec)).__name__ == spec["_target_"].rsplit(".", 1)[1]


def test_bad_sampler_or_pruner_config_is_a_clear_error():
    space = parse_search_space({"a": "interval(0, 1)"})
    with pytest.raises(SearchConfigError, match="cannot find class 'optuna.samplers.NoSuchSampler'"):
        build_sampler({"_target_": "optuna.samplers.NoSuchSampler"}, space)
    with pytest.raises(SearchConfigError, match="Cannot build hydra.sweeper.pruner optuna.pruners.MedianPruner"):
        pruner_spec({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": -1})
    with pytest.raises(SearchConfigError, match="needs a `_target_`"):
        pruner_spec({"n_startup_trials": 1})
