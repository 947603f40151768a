"""One sweep, start to end: check everything, open the study, then ask / launch / tell in batches.

Everything that can be wrong with the request (search space, config paths, sampler,
pruner, storage) is checked before the first trial is asked for. Each trial is told to
Optuna exactly once, whatever happens to its job; after every batch `trials.csv`, the
best-trial recipe and the plots are rewritten.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from optuna.distributions import check_distribution_compatibility
from optuna.trial import Trial, TrialState

from detr_train.data.sources import validation_images_of_run
from detr_train.reporting.next_steps import next_steps
from detr_train.search import attrs, export, plots
from detr_train.search.errors import SearchConfigError, SweepInterrupted, TooManyFailedTrials
from detr_train.search.factories import build_pruner, build_sampler, grid_size, is_grid, pruner_spec
from detr_train.search.outcome import Outcome, judge
from detr_train.search.overrides import override
from detr_train.search.space import SearchSpace, describe, parse_search_space
from detr_train.search.storage import count_trials, open_storage, redact, resolve_storage_url
from detr_train.search.tracking import SweepTracking

if TYPE_CHECKING:
    from hydra.core.plugins import HydraContext
    from hydra.plugins.launcher import Launcher

log = logging.getLogger(__name__)


class OptunaSearchSweeper(Protocol):
    """What a session uses of the Hydra sweeper plugin that opens it (`search.sweeper`)."""

    settings: Any  # its SweepSettings: the sweep's own options, checked
    config: DictConfig
    hydra_context: HydraContext
    launcher: Launcher

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None: ...

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
TRIAL_KEYS = ("study_name", "storage", "number")


def run_search(sweeper: OptunaSearchSweeper, arguments: list[str]) -> list[Sequence[JobReturn]]:
    session = SearchSession.open(sweeper, arguments)
    return session.run()


class SearchSession:
    def __init__(
        self, sweeper: OptunaSearchSweeper, study: optuna.Study, space: SearchSpace, storage_url: str, target: int,
        sweep_dir: Path, stored_at_open: int = 0, tracking: SweepTracking | None = None,
    ) -> None:
        self.sweeper = sweeper
        self.study = study
        self.space = space
        self.storage_url = storage_url
        self.target = target
        self.sweep_dir = sweep_dir
        self.stored_at_open = stored_at_open
        self.tracking = tracking  # the sweep's MLflow run, when the app logs to MLflow

    @classmethod
    def open(cls, sweeper: OptunaSearchSweeper, arguments: list[str]) -> SearchSession:
        """Check the request and open (or resume) the study; raises SearchConfigError first."""
        settings, config = sweeper.settings, sweeper.config
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        parser = OverridesParser.create(config_loader=sweeper.hydra_context.config_loader)
        space = parse_search_space(_plain(settings.params), arguments, parser)
        _check_trial_block(config)
        _check_space_composes(sweeper, space)
        pruner_config = pruner_spec(settings.pruner)

        storage_url = resolve_storage_url(settings.storage, sweep_dir)
        storage = open_storage(storage_url)
        study_name = settings.study_name or sweep_dir.name
        stored = count_trials(storage, study_name)
        sampler = build_sampler(settings.sampler, space, seed_offset=stored)
        try:
            study = optuna.create_study(
                study_name=study_name,
                storage=storage,
                sampler=sampler,
                pruner=build_pruner(pruner_config),
                direction=settings.direction,
                load_if_exists=True,
            )
        except ValueError as error:
            raise SearchConfigError(f"Cannot open study '{study_name}' in {redact(storage_url)}: {error}") from error
        _check_same_direction(study, settings.direction)
        _check_compatible_with_stored(study, space)
        # Jobs rebuild the pruner from here, so they prune exactly as configured now.
        study.set_user_attr(attrs.PRUNER, pruner_config)

        target = settings.n_trials
        if is_grid(sampler):
            target = min(target, grid_size(space))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, sweep_dir / "multirun.yaml")
        log.info("Study '%s' in %s", study_name, redact(storage_url))
        log.info("Sampler %s, pruner %s, direction %s", type(sampler).__name__, (pruner_config or {}).get("_target_"), settings.direction)
        for line in describe(space):
            log.info("  %s", line)
        tracking = SweepTracking.open(config, study, sweep_dir)
        return cls(sweeper, study, space, storage_url, target, sweep_dir, stored_at_open=stored, tracking=tracking)

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> list[Sequence[JobReturn]]:
        if self.tracking is None:
            return self._run()
        status = "FAILED"
        try:
            returns = self._run()
            status = "FINISHED"
            return returns
        except (SweepInterrupted, KeyboardInterrupt):
            status = "KILLED"  # a re-run of the sweep continues it
            raise
        finally:
            best = export.best_trial(self.study)
            self.tracking.close(None if best is None else best.value, status)

    def _run(self) -> list[Sequence[JobReturn]]:
        settings = self.sweeper.settings
        planned = self._missing()
        log.info(
            "%d trials stored, n_trials=%d: running %d now (%d at a time)",
            len(self.study.get_trials(deepcopy=False)), self.target, planned, settings.n_jobs,
        )
        failures_allowed = settings.max_failure_rate * planned
        failures, returns = 0, []
        while (missing := self._missing()) > 0:
            batch = [self.study.ask(fixed_distributions=self.space.distributions) for _ in range(min(settings.n_jobs, missing))]
            results, outcomes = self._run_batch(batch)
            returns.append(results)
            failures += sum(o.state == TrialState.FAIL and not o.interrupted for o in outcomes)
            self.export()
            interrupted = [trial.number for trial, o in zip(batch, outcomes) if o.interrupted]
            if interrupted:
                raise SweepInterrupted(
                    f"Trial(s) {interrupted} were interrupted and recorded FAIL; the study is saved in "
                    f"{redact(self.storage_url)}. Run the same command again to resume the search."
                )
            if failures > failures_allowed:
                raise TooManyFailedTrials(
                    f"{failures} of the {planned} trials planned have failed, more than "
                    f"hydra.sweeper.max_failure_rate={settings.max_failure_rate} allows; see the errors above "
                    f"and {self.sweep_dir / export.TRIALS_CSV}"
                )
        if not returns:  # nothing ran: still refresh the files (e.g. after an upgrade)
            self.export()
        self._tell_best()
        return returns

    def _missing(self) -> int:
        trials = self.study.get_trials(deepcopy=False)
        # A trial cut short by a signal says nothing about its configuration: it does not
        # count, so a resumed sweep runs another in its place.
        counted = [t for t in trials if t.state in FINISHED and attrs.INTERRUPTED not in t.user_attrs]
        # Several sweeps may share one study (the same command on several machines): a trial
        # another sweep is running counts too, or each sweep would ask for the last missing
        # trials and the study would overshoot n_trials by a batch per sweep. Only trials asked
        # since this sweep opened count: one left RUNNING by an earlier sweep that was killed
        # outright has nobody running it, and a re-run must replace it. (Our own trials are
        # all told by the time this is called.)
        running = [t for t in trials if t.state == TrialState.RUNNING and t.number >= self.stored_at_open]
        return self.target - len(counted) - len(running)

    def _run_batch(self, batch: list[Trial]) -> tuple[list[JobReturn], list[Outcome]]:
        results: list[JobReturn] = []
        outcomes: list[Outcome] = []
        for chunk in _consecutive_runs(batch):
            overrides = [self.space.overrides_for(trial.params) + self._identity(trial.number) for trial in chunk]
            try:
                # Hydra numbers jobs from initial_job_idx: starting at the trial number makes
                # hydra.job.num (and so trial_${hydra.job.num}) the trial number, so a
                # resumed study never reuses a directory.
                chunk_results = self.sweeper.launcher.launch(overrides, initial_job_idx=chunk[0].number)
            except BaseException as error:  # noqa: BLE001 - including Ctrl-C: leave no trial RUNNING
                reason = f"the launch ended with {type(error).__name__}: {error}"
                for trial in batch[len(results) :]:
                    self._finish(trial, Outcome(TrialState.FAIL, error=reason, interrupted=True))
                self.export()
                raise
            for trial, result in zip(chunk, chunk_results):
                outcomes.append(self._record(trial, result))
                results.append(result)
        return results, outcomes

    def _identity(self, number: int) -> list[str]:
        return [
            override("trial.study_name", self.study.study_name),
            override("trial.storage", self.storage_url),
            override("trial.number", number),
            *(self.tracking.trial_overrides() if self.tracking is not None else []),
        ]

    def _record(self, trial: Trial, result: JobReturn) -> Outcome:
        # Read the trial back: the job's reporter wrote into it from its own process.
        stored = self.study._storage.get_trial(trial._trial_id)  # Optuna has no public trial id
        outcome = judge(result, stored)
        run_dir = _output_dir(result)
        if run_dir is not None:
            trial.set_user_attr(attrs.RUN_DIR, run_dir)
        self._finish(trial, outcome)
        log.info("Trial %d %s (%s)", trial.number, outcome.state.name, run_dir)
        return outcome

    def _finish(self, trial: Trial, outcome: Outcome) -> None:
        """Record why a trial failed, then tell Optuna: the only place that calls study.tell."""
        if outcome.error is not None:
            trial.set_user_attr(attrs.ERROR, outcome.error[:2000])
            log.error("Trial %d failed: %s\n%s", trial.number, outcome.error, outcome.details or "")
        if outcome.interrupted and attrs.INTERRUPTED not in trial.user_attrs:
            trial.set_user_attr(attrs.INTERRUPTED, outcome.error)
        value = outcome.value if outcome.state == TrialState.COMPLETE else None
        try:
            self.study.tell(trial, values=value, state=outcome.state)
        except RuntimeError as error:
            # GridSampler.after_trial calls study.stop() when the grid is used up, which
            # raises outside study.optimize; the trial is already stored by then.
            if not (is_grid(self.study.sampler) and "Study.stop" in str(error)):
                raise
        if self.tracking is not None:
            self.tracking.record_trial(trial.number, outcome.state.name)

    # --- outputs ----------------------------------------------------------------------------

    def _tell_best(self) -> None:
        """The search's last lines: its best trial as a run's last lines, and where every trial is."""
        trials_csv = self.sweep_dir / export.TRIALS_CSV
        best = export.best_trial(self.study)
        if best is None:
            log.info("No trial has completed; every trial is in %s", trials_csv)
            return
        history = best.intermediate_values
        best_epoch = max(history, key=history.get) if history else 0
        lines = [f"Best trial {best.number} (mAP {best.value:.4f}); every trial: {trials_csv}"]
        run_dir = best.user_attrs.get(attrs.RUN_DIR)
        if run_dir is not None:
            lines += next_steps(Path(run_dir), best.value, best_epoch, _validation_images(Path(run_dir)))
        log.info("\n%s", "\n".join(lines))

    def export(self) -> None:
        export.write_trials_csv(self.study, self.sweep_dir)
        export.write_best_trial(self.study, self.sweep_dir, self.space.fixed, _full_budget_overrides(self.sweeper.config))
        try:
            plots.write_plots(self.study, self.sweep_dir)
        except Exception:  # noqa: BLE001 - a plotting problem must never cost the search
            log.warning("Could not draw the study's plots", exc_info=True)


# --- checks before the first trial ------------------------------------------------------------


def _check_trial_block(config: DictConfig) -> None:
    trial = OmegaConf.select(config, "trial")
    if not isinstance(trial, DictConfig) or any(key not in trial for key in TRIAL_KEYS):
        raise SearchConfigError(
            "The app's config needs a `trial` block for the sweeper to fill in: "
            "`trial: {study_name: null, storage: null, number: null}`"
        )


def _check_space_composes(sweeper: OptunaSearchSweeper, space: SearchSpace) -> None:
    """Compose the job config for values touching every parameter and choice, so an unknown
    key or group option fails now, not after hours of trials."""
    identity = [override("trial.study_name", "probe"), override("trial.storage", "probe"), override("trial.number", 0)]
    for values in space.probe_values():
        overrides = space.overrides_for(values) + identity
        try:
            sweeper.validate_batch_is_legal([overrides])
        except HydraException as error:
            raise SearchConfigError(f"The search space does not fit the config: {error}") from error


def _check_same_direction(study: optuna.Study, direction: str) -> None:
    # Optuna silently keeps a loaded study's own direction; optimising the wrong way is worse.
    stored = study.direction.name.lower()
    if stored != direction:
        raise SearchConfigError(
            f"Study '{study.study_name}' was created to {stored}, but hydra.sweeper.direction={direction}; "
            "use a new study_name or sweep dir."
        )


def _check_compatible_with_stored(study: optuna.Study, space: SearchSpace) -> None:
    stored: dict[str, Any] = {}
    for trial in study.get_trials(deepcopy=False):
        stored.update(trial.distributions)
    for key, distribution in space.distributions.items():
        if key in stored:
            try:
                check_distribution_compatibility(stored[key], distribution)
            except ValueError as error:
                raise SearchConfigError(
                    f"Study '{study.study_name}' already sampled '{key}' from {stored[key]}, which cannot "
                    f"continue as {distribution}: {error}. Use a new study_name or sweep dir."
                ) from error


# --- small helpers ---------------------------------------------------------------------------


def _plain(params: Any) -> dict[str, Any] | None:
    if params is None:
        return None
    return OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else dict(params)


def _consecutive_runs(trials: list[Trial]) -> list[list[Trial]]:
    """Split a batch where trial numbers jump (another process asked in between), since the
    launcher numbers each job from one starting index."""
    runs: list[list[Trial]] = []
    for trial in trials:
        if runs and trial.number == runs[-1][-1].number + 1:
            runs[-1].append(trial)
        else:
            runs.append([trial])
    return runs


def _output_dir(result: JobReturn) -> str | None:
    hydra_cfg = getattr(result, "hydra_cfg", None)
    return None if hydra_cfg is None else OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir")


def _full_budget_overrides(config: DictConfig) -> list[str]:
    """`budget=none` when the app has a budget group (detr-train does), else nothing."""
    choices = OmegaConf.select(config, "hydra.runtime.choices") or {}
    return ["budget=none"] if "budget" in choices else []


def _validation_images(run_dir: Path) -> Path | None:
    try:
        return validation_images_of_run(run_dir)
    except (OSError, OmegaConfBaseException):
        return None
