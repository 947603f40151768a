"""Bad input gives one clear message, a non-zero exit and no trial: nothing is asked of Optuna first."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
from search_app.harness import run_app

pytestmark = [pytest.mark.slow, pytest.mark.sweep]

SPACE = ("x=interval(0, 1)", "y=interval(0, 1)")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(
            ("x=interval(0, 1)", "learning_rate=interval(0.1, 0.2)"),
            "The search space does not fit the config: Could not override 'learning_rate'",
            id="unknown-param-path",
        ),
        pytest.param(
            ("x=0.3", "hydra.sweeper.params={}"),
            "The search space is empty",
            id="empty-space",
        ),
        pytest.param(
            ("x=interval(0, 1", "y=interval(0, 1)"),
            "no viable alternative at input 'interval(0, 1'",  # Hydra's own parser, before the sweeper
            id="malformed-grammar-on-the-command-line",
            marks=pytest.mark.hydra_exit_code,
        ),
        pytest.param(
            ("+hydra.sweeper.params.x='tag(log, intervl(0.1, 1))'",),
            "Cannot parse search parameter 'x=tag(log, intervl(0.1, 1))'",
            id="malformed-grammar-in-params",
        ),
        pytest.param(
            (*SPACE, "hydra.sweeper.storage=sqlite:////no/such/dir/study.db"),
            "Cannot open the Optuna storage 'sqlite:////no/such/dir/study.db'",
            id="unreachable-sqlite",
        ),
        pytest.param(
            # A bare postgresql:// URL gets the installed driver named (here psycopg2, the postgres extra).
            (*SPACE, "hydra.sweeper.storage='postgresql://user:secret@127.0.0.1:1/optuna'"),
            "Cannot open the Optuna storage 'postgresql+psycopg2://user:***@127.0.0.1:1/optuna': OperationalError",
            id="unreachable-postgresql-server",
            marks=pytest.mark.skipif(
                find_spec("psycopg2") is None or find_spec("psycopg") is not None, reason="needs psycopg2 alone"
            ),
        ),
        pytest.param(
            (*SPACE, "hydra/sweeper/sampler=grid"),
            "The grid sampler needs a finite set of values, but 'x=interval(0, 1)' is continuous",
            id="grid-over-an-interval",
        ),
        pytest.param(
            (*SPACE, "hydra.sweeper.direction=up"),
            "hydra.sweeper.direction must be one of ('maximize', 'minimize')",
            id="bad-direction",
        ),
        pytest.param(
            (*SPACE, "~trial"),
            "The app's config needs a `trial` block",
            id="no-trial-block",
        ),
    ],
)
def test_bad_input_fails_before_any_trial_with_a_clear_message(tmp_path, overrides, message, request):
    sweep_dir = tmp_path / "sweep"
    result = run_app(sweep_dir, *overrides, check=False)
    # The sweeper's config errors exit 2 like every other; Hydra's own parser (which this test
    # app meets before the sweeper; detr-train checks first) exits 1.
    assert result.returncode == (1 if request.node.get_closest_marker("hydra_exit_code") else 2)
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "secret" not in result.stderr
    assert not list(sweep_dir.glob("trial_*"))
    assert not (sweep_dir / "trials.csv").exists()
