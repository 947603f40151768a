"""Model construction: the tiny and R50 architectures, and pretrained loading offline."""

from __future__ import annotations

import time

import pytest

from detr_train.config.checks import check_config
from detr_train.modeling.build import PretrainedUnavailableError, build_model, build_model_config
from detr_train.modeling.pretrained import hub_unreachable
from tests.conftest import compose_config


def test_r50_architecture_builds_with_300_queries():
    cfg = compose_config(["model=deformable_detr"]).model
    config = build_model_config(cfg, ["car", "person"])
    assert config.num_queries == 300 and config.backbone_config.hidden_sizes[-1] == 2048
    assert config.num_labels == 2 and config.id2label == {0: "car", 1: "person"}


def test_tiny_model_trains_its_whole_backbone():
    model = build_model(compose_config().model, ["a"])
    backbone = model.model.backbone.model
    assert all(p.requires_grad for p in backbone.parameters())
    assert not any(type(m).__name__ == "DeformableDetrFrozenBatchNorm2d" for m in backbone.modules())


def test_one_decoder_layer_is_refused_clearly():
    with pytest.raises(ValueError, match="decoder_layers must be >= 2"):
        check_config(compose_config(["model.decoder_layers=1"]))


def test_pretrained_round_trip_from_a_local_folder(tmp_path):
    model = build_model(compose_config().model, ["a", "b"])
    model.save_pretrained(tmp_path / "saved")
    # Another class count: the class heads are resized (two-stage shares them with the decoder,
    # inside model.model), the rest is loaded.
    loaded = build_model(compose_config([f"model.pretrained={tmp_path / 'saved'}"]).model, ["x", "y", "z"])
    assert loaded.config.num_labels == 3
    loaded_state = loaded.model.state_dict()
    for name, value in model.model.state_dict().items():
        if "class_embed" in name:
            assert loaded_state[name].shape[0] == 3 or loaded_state[name].dim() == 0, name
        else:
            assert (loaded_state[name] == value).all(), name


@pytest.mark.parametrize("hub_offline_flag", [True, False])
def test_pretrained_offline_fails_at_once_with_advice(monkeypatch, tmp_path, hub_offline_flag):
    # Without the flag this relies on the test machine having no route to the hub (CI has none).
    if hub_offline_flag:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        if hub_unreachable() is None:
            pytest.skip("the model hub is reachable from here; this test is about machines without it")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(PretrainedUnavailableError, match="model.pretrained='SenseTime/deformable-detr'") as info:
        build_model(compose_config(["model=deformable_detr", "model.pretrained=SenseTime/deformable-detr"]).model, ["a"])
    assert time.perf_counter() - start < 15  # the hub client alone would retry for ~30 s
    assert "model.pretrained=null" in info.value.hint and "local folder" in info.value.hint


def test_missing_local_pretrained_folder_is_named(tmp_path):
    with pytest.raises(PretrainedUnavailableError, match="no such local folder"):
        build_model(compose_config([f"model.pretrained={tmp_path / 'nope'}"]).model, ["a"])
