"""End-of-epoch pictures: curves, per-class AP and PR curves, prediction images, TensorBoard.

Most tests look at what the shared trained run (conftest) left in its run directory; the
others train the tiny model for an epoch or two on the shared small synthetic set.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from PIL import Image

from detr_train.checkpointing.plan import Plan, plan
from detr_train.config.checks import TENSORBOARD_MISSING
from detr_train.errors import ConfigError
from detr_train.reporting import drawing, plots
from detr_train.reporting import tensorboard as tb_module
from detr_train.reporting.trackers import tracker_callbacks
from detr_train.reporting.visual_callbacks import EvaluationPlots, TrainingCurves, visual_callbacks
from tests.conftest import (
    SHARED_RUN_SETTINGS,
    SHARED_RUN_VIS_IMAGES,
    SMALL_SYNTHETIC,
    compose_config,
    make_trainer,
    spy_on,
    train_in_process,
)

pytestmark = pytest.mark.slow

VIS_IMAGES = SHARED_RUN_VIS_IMAGES
# The shared run's settings: its EMA weights are scored, then the raw ones too (raw_map), so
# the pictures must show the first, primary evaluation.
RUN_SETTINGS = SHARED_RUN_SETTINGS
# Numbers of a record that measure time, and so differ between two identical runs.
TIMINGS = ("epoch_time", "eval_time", "raw_eval_time", "data_wait_fraction")


def _overrides(root: Path, *extra: str) -> list[str]:
    return SMALL_SYNTHETIC + [f"data.root={root}", *RUN_SETTINGS, *extra]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _without_timings(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in TIMINGS} for record in records]


def _assert_valid_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes every byte: a truncated file fails here
        assert image.width > 100 and image.height > 100


def _temp_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob(".*.tmp")]


def _spy(monkeypatch, name: str) -> list[dict]:
    """Record every call of plots.<name>, then call the real function."""
    return spy_on(monkeypatch, plots, name)


def test_plots_are_valid_pngs_at_stable_names(trained_run):
    run_dir = trained_run.run_dir
    for path in (run_dir / "training_curves.png", run_dir / "plots" / "per_class_ap.png",
                 run_dir / "plots" / "pr_curves.png", run_dir / "plots" / "confusion_matrix.png"):
        _assert_valid_png(path)
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["confusion_matrix.png", "per_class_ap.png",
                                                                     "pr_curves.png"]
    assert not _temp_files(run_dir)


def test_per_class_ap_and_pr_curves_come_from_the_runs_cocoeval(trained_run):
    evaluated = [record for record in trained_run.records if "map" in record]
    assert len(evaluated) == 2 == len(trained_run.per_class_calls) == len(trained_run.pr_calls)
    assert any(record["map"] > 0 for record in evaluated), "the run should find some true positives"
    # EMA and raw weights score differently here, so agreeing with `map` means the primary evaluation.
    assert all(record["map_per_class"] != record["raw_map_per_class"] for record in evaluated)
    class_names = trained_run.trainer.data.class_names
    for record, bars, curves in zip(evaluated, trained_run.per_class_calls, trained_run.pr_calls):
        # The bars are the logged per-class AP, number for number.
        assert bars["args"][0] == record["map_per_class"]
        precision, recall_thresholds, names, path = curves["args"][:4]
        assert path.name == "pr_curves.png" and list(names) == class_names
        assert precision.shape == (10, 101, len(class_names), 4, 3)  # COCOeval's [T, R, K, A, M]
        np.testing.assert_allclose(recall_thresholds, np.linspace(0, 1, 101))
        # The curves' own AP (mean precision over IoUs and recall points, area all, 100 dets)
        # is each class's logged AP, and their mean over classes the logged mAP.
        for k, name in enumerate(names):
            values = precision[:, :, k, 0, -1]
            assert float(np.mean(values[values > -1])) == pytest.approx(record["map_per_class"][name], abs=1e-12)
        valid = precision[:, :, :, 0, -1]
        assert float(np.mean(valid[valid > -1])) == pytest.approx(record["map"], abs=1e-12)


def test_prediction_images_for_exactly_n_fixed_val_images(trained_run, tmp_path):
    val = trained_run.trainer.data.val
    stems = sorted(Path(val.image_info(i)["file_name"]).stem for i in range(VIS_IMAGES))
    folders = sorted((trained_run.run_dir / "vis").iterdir())
    assert [folder.name for folder in folders] == ["epoch_0001", "epoch_0002"]
    for folder in folders:
        assert sorted(path.stem for path in folder.iterdir()) == stems
        assert all(path.suffix == ".jpg" for path in folder.iterdir())
    for index in range(VIS_IMAGES):
        info = val.image_info(index)
        with Image.open(val.images_dir / info["file_name"]) as plain:
            plain = plain.convert("RGB")
        # The plain image through the same JPEG encoder: what is left of a difference is drawing.
        plain_path = drawing.save_image(drawing.side_by_side(plain, plain), tmp_path / f"plain_{index}.jpg")
        with Image.open(plain_path) as reference:
            reference = np.asarray(reference.convert("RGB"), dtype=np.int16)
        with Image.open(folders[-1] / f"{Path(info['file_name']).stem}.jpg") as drawn:
            assert drawn.size == (2 * plain.width + 4, plain.height)  # predictions | gap | ground truth
            drawn = np.asarray(drawn.convert("RGB"), dtype=np.int16)
        changed = np.abs(drawn - reference).max(axis=2) > 100
        predictions_side, truth_side = changed[:, :plain.width], changed[:, plain.width + 4:]
        assert truth_side.sum() > 20, "the ground truth boxes are drawn"
        assert predictions_side.sum() > 20, "the predicted boxes are drawn"


def test_tensorboard_holds_every_metrics_scalar_and_the_pictures(trained_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert trained_run.tensorboard
    accumulator = EventAccumulator(str(trained_run.run_dir / "tensorboard"), size_guidance={"images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    for record in trained_run.records:
        expected = dict(tb_module.record_scalars(record))
        assert {"train/loss", "lr", "val/map", "val/map_50", "val/map_small", "time/epoch_time"} <= set(expected)
        assert set(expected) <= set(tags["scalars"])
        for tag, value in expected.items():
            logged = {event.step: event.value for event in accumulator.Scalars(tag)}
            assert logged[record["global_step"]] == pytest.approx(value, rel=1e-6), tag
    assert set(tags["images"]) == {"predictions/0", "predictions/1", "plots/per_class_ap/0", "plots/pr_curves/0",
                                   "plots/confusion_matrix/0"}
    steps = [record["global_step"] for record in trained_run.records]
    assert [event.step for event in accumulator.Images("predictions/0")] == steps


def test_a_drawing_failure_warns_and_the_run_finishes_unchanged(trained_run, synthetic_root, tmp_path,
                                                                monkeypatch, caplog):
    real_curves = plots.plot_training_curves

    def curves_that_die_writing(records, path):
        if len(records) == 1:
            return real_curves(records, path)

        # Epoch 2: the PNG writer dies half way through the file.
        def half_a_png(self, handle, **kwargs):
            handle.write(b"\x89PNG\r\n\x1a\n half")
            raise OSError("disk full")

        with pytest.MonkeyPatch.context() as inner:
            inner.setattr(Figure, "savefig", half_a_png)
            return real_curves(records, path)

    def broken(*args, **kwargs):
        raise RuntimeError("no luck drawing")

    monkeypatch.setattr(plots, "plot_training_curves", curves_that_die_writing)
    monkeypatch.setattr(plots, "plot_precision_recall", broken)
    monkeypatch.setattr(drawing, "compare_with_ground_truth", broken)
    run_dir = tmp_path / "run"
    cfg = compose_config(_overrides(synthetic_root, f"training.vis_images={VIS_IMAGES}"))
    with caplog.at_level(logging.WARNING, logger="detr_train.reporting.visual_callbacks"):
        best = make_trainer(Plan(cfg, run_dir)).fit()

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Could not draw the training curves after epoch 2" in w and "disk full" in w for w in warnings)
    assert any("Could not draw the precision-recall curves after epoch 1" in w for w in warnings)
    assert any("Could not draw the prediction images after epoch 2" in w for w in warnings)
    # The same run as the one that drew everything: same metrics, same checkpoints.
    assert _without_timings(_records(run_dir)) == _without_timings(trained_run.records)
    assert best == max(record["map"] for record in trained_run.records)
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    # Epoch 1's picture survives epoch 2's failed write whole; no temp file is left.
    _assert_valid_png(run_dir / "training_curves.png")
    _assert_valid_png(run_dir / "plots" / "per_class_ap.png")
    assert not (run_dir / "plots" / "pr_curves.png").exists()
    assert not _temp_files(run_dir)


def test_a_resumed_runs_curves_include_the_earlier_epochs(synthetic_root, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    make_trainer(Plan(compose_config(_overrides(synthetic_root, "training.epochs=1", "training.vis_images=1")), run_dir)).fit()
    # What a kill in the middle of writing each picture leaves behind.
    leftovers = [run_dir / ".training_curves.png.x1.tmp", run_dir / "plots" / ".pr_curves.png.x2.tmp",
                 run_dir / "vis" / "epoch_0001" / ".val_00000.jpg.x3.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a picture")
    curve_calls = _spy(monkeypatch, "plot_training_curves")
    resumed_plan = plan(compose_config(_overrides(synthetic_root, "training.epochs=2", "training.vis_images=1",
                                                  f"training.resume={run_dir}")), run_dir)
    resumed = make_trainer(resumed_plan)
    resumed.fit()

    assert len(curve_calls) == 1
    records, path = curve_calls[0]["args"]
    assert [record["epoch"] for record in records] == [1, 2]
    assert records == _records(run_dir)
    _assert_valid_png(path)
    assert sorted(p.name for p in (run_dir / "vis").iterdir()) == ["epoch_0001", "epoch_0002"]
    assert not _temp_files(run_dir)


def test_defaults_draw_the_plots_only():
    cfg = compose_config([])
    train_cfg = cfg.training
    assert (train_cfg.plots, train_cfg.vis_images, train_cfg.vis_score_threshold) == (True, 0, 0.3)
    assert OmegaConf.to_container(cfg.logger) == {"tensorboard": None, "mlflow": None}
    assert [type(c) for c in visual_callbacks(train_cfg)] == [TrainingCurves, EvaluationPlots]
    assert tracker_callbacks(cfg) == []
    cfg.training.plots = False
    assert visual_callbacks(cfg.training) == []


def _hide_tensorboard(monkeypatch) -> None:
    # None in sys.modules makes an import of these names fail, as if they were not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(tb_module.MissingDependencyError):
        tb_module.TensorBoardWriter(Path("never-made"))


@pytest.mark.parametrize("overrides,named", [
    (["logger=tensorboard"], TENSORBOARD_MISSING),
    (["training.vis_images=-1"], "training.vis_images must be >= 0"),
    (["training.vis_score_threshold=1.5"], "training.vis_score_threshold must be in [0, 1], got 1.5"),
])
def test_config_mistakes_are_one_line_before_any_run_dir(overrides, named, tmp_path, monkeypatch, capsys):
    _hide_tensorboard(monkeypatch)
    assert train_in_process(overrides, tmp_path, monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("detr-train: error: ") and named in err
    assert "\n" not in err  # one line, no hint, no traceback
    assert list(tmp_path.iterdir()) == []


def test_missing_tensorboard_message_names_the_key_and_the_install():
    assert "logger=tensorboard" in TENSORBOARD_MISSING
    assert "pip install 'detr-train[tensorboard]'" in TENSORBOARD_MISSING


def test_a_config_built_in_code_stops_before_the_first_step(synthetic_root, tmp_path, monkeypatch):
    # check_config runs on the command line; a Trainer built in code still stops before training.
    cfg = compose_config(_overrides(synthetic_root, "logger=tensorboard"))
    _hide_tensorboard(monkeypatch)
    run_dir = tmp_path / "run"
    trainer = make_trainer(Plan(cfg, run_dir))
    with pytest.raises(ConfigError, match=r"logger=tensorboard needs the tensorboard package"):
        trainer.fit()
    assert trainer.state.global_step == 0
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "tensorboard").exists()
