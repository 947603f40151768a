"""Fine-tuning as users do it: pretrained detectors of every variant and ImageNet backbones
from timm load, train, checkpoint and resume; the HF export is the trained network.

Nothing is downloaded: the "pretrained" checkpoints are tiny timm-backbone models built here.
"""

from __future__ import annotations

import logging
import shutil
import time

import pytest
import torch

from detr_train.checkpointing.plan import Plan, plan
from detr_train.modeling.build import PretrainedUnavailableError, build_model
from detr_train.training.trainer import Trainer
from tests.conftest import compose_config, make_trainer

TINY_TIMM = "test_resnet"  # timm's 0.1M-parameter test ResNet
TINY_DETECTOR = ["model.d_model=32", "model.encoder_ffn_dim=64", "model.decoder_ffn_dim=64", "model.num_queries=8",
                 "model.encoder_attention_heads=2", "model.decoder_attention_heads=2"]
SHORT = ["training.subset_size=8", "training.val_subset_size=8", "training.schedule.name=constant",
         "training.schedule.warmup_steps=0"]


def _save_detector(folder, *, with_box_refine=False, two_stage=False):
    """A tiny Deformable DETR with a timm backbone, written with save_pretrained."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, TimmBackboneConfig

    torch.manual_seed(1)
    config = DeformableDetrConfig(
        backbone_config=TimmBackboneConfig(backbone=TINY_TIMM, out_indices=[2, 3]), num_labels=7,
        d_model=64, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=6, two_stage_num_proposals=6, num_feature_levels=2,
        with_box_refine=with_box_refine, two_stage=two_stage, auxiliary_loss=True,
    )
    model = DeformableDetrForObjectDetection(config)
    model.save_pretrained(folder)
    return model


def _resumed(overrides: list[str], run_dir) -> Trainer:
    trainer = make_trainer(plan(compose_config(overrides + [f"training.resume={run_dir}"]), run_dir))
    trainer.fit()
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "box_refine", "two_stage"])
def test_a_pretrained_detector_loads_trains_and_resumes_without_its_source(variant, small_run_overrides, tmp_path,
                                                                          caplog):
    source = _save_detector(tmp_path / "pretrained", with_box_refine=variant != "plain",
                            two_stage=variant == "two_stage")
    overrides = small_run_overrides + SHORT + [f"model.pretrained={tmp_path / 'pretrained'}"]
    with caplog.at_level(logging.INFO):
        trainer = make_trainer(Plan(compose_config(overrides + ["training.epochs=1"]), tmp_path / "run"))
    # The architecture is the checkpoint's (d_model 64, two-stage...), not the YAML's (128).
    assert trainer.model.config.d_model == 64 and trainer.model.config.two_stage == (variant == "two_stage")
    assert "its architecture is the checkpoint's" in caplog.text
    loaded, saved = trainer.model.state_dict(), source.state_dict()
    backbone = [k for k in saved if ".backbone." in k]
    assert backbone and all(torch.equal(loaded[k], saved[k]) for k in backbone)
    assert trainer.model.config.num_labels == 3  # the class head is the dataset's
    trainer.fit()
    # Resuming rebuilds the architecture from the checkpoint: the pretrained source is not needed.
    shutil.rmtree(tmp_path / "pretrained")
    resumed = _resumed(overrides + ["training.epochs=2"], tmp_path / "run")
    assert resumed.state.epoch == 2 and resumed.state.global_step == 2 * resumed.steps_per_epoch


@pytest.mark.slow
def test_a_local_timm_backbone_starts_the_detector(small_run_overrides, tmp_path):
    import timm

    torch.manual_seed(2)
    weights = tmp_path / "backbone.pth"
    torch.save(timm.create_model(TINY_TIMM, pretrained=False).state_dict(), weights)
    expected = timm.create_model(TINY_TIMM, pretrained=False, features_only=True, out_indices=(2, 3))
    expected.load_state_dict(torch.load(weights, weights_only=True), strict=False)
    overrides = small_run_overrides + SHORT + TINY_DETECTOR + [
        "model.backbone.type=timm", f"model.backbone.name={TINY_TIMM}", f"model.backbone.pretrained={weights}",
        "model.backbone.train_stem=false",
    ]
    trainer = make_trainer(Plan(compose_config(overrides + ["training.epochs=1"]), tmp_path / "run"))
    backbone = trainer.model.model.backbone.model
    for name, value in expected.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(backbone.state_dict()[name], value), name
    # As in Deformable DETR, the stem and first stage stay frozen; the stages it returns train.
    assert not any(p.requires_grad for n, p in backbone.named_parameters() if n.startswith(("conv1", "layer1")))
    assert all(p.requires_grad for n, p in backbone.named_parameters() if n.startswith(("layer2", "layer3")))
    trainer.fit()
    weights.unlink()
    resumed = _resumed(overrides + ["training.epochs=2"], tmp_path / "run")
    assert resumed.state.epoch == 2


def test_an_imagenet_backbone_offline_fails_at_once_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(PretrainedUnavailableError, match="model.backbone.pretrained='resnet18.a1_in1k'") as info:
        build_model(compose_config(["model=deformable_detr", "model.backbone.pretrained=resnet18.a1_in1k"]).model,
                    ["a"])
    assert time.perf_counter() - start < 15
    assert "model.backbone.pretrained=null" in info.value.hint


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tiny_default", "timm_two_stage"])
def test_the_export_is_the_trained_network(case, small_run_overrides, tmp_path):
    """from_pretrained on hf_model/ gives back the network that scored best: same outputs."""
    from transformers import DeformableDetrForObjectDetection

    overrides = small_run_overrides + SHORT + ["training.epochs=1", "training.export_hf=true"]
    if case == "timm_two_stage":
        _save_detector(tmp_path / "pretrained", with_box_refine=True, two_stage=True)
        overrides.append(f"model.pretrained={tmp_path / 'pretrained'}")
    trainer = make_trainer(Plan(compose_config(overrides), tmp_path / "run"))
    trainer.fit()
    trained, _ = trainer.best_weights()
    exported = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "run" / "hf_model")
    batch = next(iter(trainer.val_loader))
    with torch.no_grad():
        expected = trained.eval()(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
        got = exported.eval()(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    assert torch.allclose(got.logits, expected.logits, atol=1e-5)
    assert torch.allclose(got.pred_boxes, expected.pred_boxes, atol=1e-5)
