"""One study shared by several sweeps through PostgreSQL, as on several machines.

Needs a server: DETR_TRAIN_TEST_POSTGRES_URL=postgresql://user:pw@host:port/db
(.ci/run starts a throwaway one). Skipped without it, unless DETR_TRAIN_REQUIRE_POSTGRES=1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState
from search_app.harness import APP, read_trials_csv

from detr_train.search.storage import open_storage

pytestmark = [pytest.mark.slow, pytest.mark.sweep]

URL_VARIABLE = "DETR_TRAIN_TEST_POSTGRES_URL"
N_TRIALS = 8


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get(URL_VARIABLE)
    required = os.environ.get("DETR_TRAIN_REQUIRE_POSTGRES") == "1"
    if not url:
        if required:
            pytest.fail(f"DETR_TRAIN_REQUIRE_POSTGRES=1 but {URL_VARIABLE} is not set (.ci/run sets both)")
        pytest.skip(f"set {URL_VARIABLE}=postgresql://user:pw@host:port/db to run")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        if required:
            pytest.fail("DETR_TRAIN_REQUIRE_POSTGRES=1 but psycopg2 is missing: pip install -e '.[postgres]'")
        pytest.skip("psycopg2 is missing: pip install -e '.[postgres]'")
    return url


@pytest.fixture
def empty_schema_url(postgres_url):
    """The server's URL pointed at a new, empty schema, dropped afterwards: the sweeps find no
    Optuna tables, as on a fresh database, and the test leaves nothing behind."""
    import psycopg2
    from sqlalchemy.engine import make_url

    schema = f"detr_train_test_{uuid.uuid4().hex[:12]}"
    connect = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg2.connect(connect) as connection, connection.cursor() as cursor:
        cursor.execute(f"CREATE SCHEMA {schema}")
    yield f"{postgres_url}?options=-csearch_path%3D{schema}"
    with psycopg2.connect(connect) as connection, connection.cursor() as cursor:
        cursor.execute(f"DROP SCHEMA {schema} CASCADE")


def _start_sweep(sweep_dir, url: str, study_name: str, seed: int, epoch_seconds: float) -> subprocess.Popen:
    command = [
        sys.executable, str(APP), "-m", f"hydra.sweep.dir={sweep_dir}",
        "x=interval(0, 1)", "y=interval(0, 1)", f"epoch_seconds={epoch_seconds}",
        "hydra/sweeper/sampler=random", f"hydra.sweeper.sampler.seed={seed}",
        f"hydra.sweeper.storage='{url}'", f"hydra.sweeper.study_name={study_name}", f"hydra.sweeper.n_trials={N_TRIALS}",
    ]
    return subprocess.Popen(command, cwd=sweep_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_sweeps_started_together_share_one_study_without_losing_or_repeating_a_trial(tmp_path, empty_schema_url):
    sweep_dir, url, study_name = tmp_path / "sweep", empty_schema_url, "shared"
    # The same command on two machines, one slower than the other (so the sweeps fall out of
    # step); each gets its own seed, as docs/search.md says.
    sweeps = [_start_sweep(sweep_dir, url, study_name, seed, pace) for seed, pace in ((0, 0.1), (1000, 0.17))]
    outputs = [sweep.communicate(timeout=300) for sweep in sweeps]
    for sweep, (stdout, stderr) in zip(sweeps, outputs):
        assert sweep.returncode == 0, f"{stdout}\n{stderr}"
    told = [{int(n) for n in re.findall(r"Trial (\d+) (?:COMPLETE|PRUNED)", stdout)} for stdout, _ in outputs]
    assert all(told), f"both sweeps should have run trials: {told}"
    assert not told[0] & told[1]  # no trial told by both

    study = optuna.load_study(study_name=study_name, storage=open_storage(url))
    trials = study.trials
    # Together they ran what the study holds: the n_trials target, or one more when both
    # asked for the last missing trial at the same moment.
    assert len(trials) == len(told[0]) + len(told[1])
    assert N_TRIALS <= len(trials) <= N_TRIALS + 1
    assert [t.number for t in trials] == list(range(len(trials)))
    assert Counter(t.state for t in trials).keys() <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert len({(t.params["x"], t.params["y"]) for t in trials}) == len(trials)

    # Each trial directory holds its own trial's job, run by the sweep that asked for it.
    pids = [sweep.pid for sweep in sweeps]
    for trial in trials:
        job = json.loads((sweep_dir / f"trial_{trial.number}" / "job.json").read_text())
        assert (job["trial"], job["x"], job["y"]) == (trial.number, trial.params["x"], trial.params["y"])
        assert trial.number in told[pids.index(job["pid"])]
    assert sorted(p.name for p in sweep_dir.glob("trial_*")) == sorted(f"trial_{t.number}" for t in trials)

    # The sweep that finished last wrote trials.csv with every trial, as the study has them.
    table = read_trials_csv(sweep_dir)
    assert list(table["number"]) == [t.number for t in trials]
    assert list(table["state"]) == [t.state.name for t in trials]
