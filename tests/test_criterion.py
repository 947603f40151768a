"""The sync-free Deformable DETR criterion against transformers' loss, and the encoder-layer patch."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import (
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    ResNetConfig,
)
from transformers.loss.loss_deformable_detr import (
    DeformableDetrForObjectDetectionLoss,
    DeformableDetrHungarianMatcher,
    DeformableDetrImageLoss,
)

from detr_train.modeling.criterion import DeformableDetrCriterion, count_target_boxes
from detr_train.modeling.sync_free import (
    SyncFreeDeformableDetrEncoderLayer,
    remove_encoder_isfinite_sync,
)

NUM_LABELS = 4
NUM_QUERIES = 10
DECODER_LAYERS = 3


def loss_config(**overrides) -> DeformableDetrConfig:
    kwargs = {"num_labels": NUM_LABELS, "decoder_layers": DECODER_LAYERS, "auxiliary_loss": True}
    return DeformableDetrConfig(**{**kwargs, **overrides})


def random_labels(counts: list[int], generator: torch.Generator, num_labels: int = NUM_LABELS) -> list[dict]:
    return [
        {
            "class_labels": torch.randint(0, num_labels, (count,), generator=generator),
            "boxes": torch.cat(
                [torch.rand(count, 2, generator=generator), torch.rand(count, 2, generator=generator) * 0.5 + 0.05], 1
            ),
        }
        for count in counts
    ]


def random_predictions(batch_size: int, generator: torch.Generator, layers: int = DECODER_LAYERS) -> tuple:
    outputs_class = torch.randn(layers, batch_size, NUM_QUERIES, NUM_LABELS, generator=generator)
    outputs_coord = torch.randn(layers, batch_size, NUM_QUERIES, 4, generator=generator).sigmoid()
    return outputs_class, outputs_coord


def loss_and_gradients(loss_function, outputs_class, outputs_coord, labels, config) -> tuple:
    """Call a loss the way the model does, with the final layer passed separately; return
    (loss, loss_dict, gradients w.r.t. logits, pred_boxes, outputs_class, outputs_coord)."""
    inputs = [
        outputs_class[-1].clone().requires_grad_(),
        outputs_coord[-1].clone().requires_grad_(),
        outputs_class.clone().requires_grad_(),
        outputs_coord.clone().requires_grad_(),
    ]
    logits, pred_boxes, layer_class, layer_coord = inputs
    loss, loss_dict, _ = loss_function(logits, labels, "cpu", pred_boxes, config, layer_class, layer_coord)
    loss.backward()
    return loss, loss_dict, [tensor.grad for tensor in inputs]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("auxiliary_loss", [True, False])
def test_loss_dict_and_gradients_equal_transformers(seed, auxiliary_loss):
    generator = torch.Generator().manual_seed(seed)
    config = loss_config(auxiliary_loss=auxiliary_loss)
    outputs_class, outputs_coord = random_predictions(3, generator)
    labels = random_labels([4, 0, 7], generator)  # the second image has no boxes

    expected = loss_and_gradients(DeformableDetrForObjectDetectionLoss, outputs_class, outputs_coord, labels, config)
    criterion = DeformableDetrCriterion.from_config(config)
    actual = loss_and_gradients(criterion, outputs_class, outputs_coord, labels, config)

    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=1e-5)
    assert list(actual[1]) == list(expected[1])  # same keys, same order, cardinality_error included
    for key, value in expected[1].items():
        torch.testing.assert_close(actual[1][key], value, rtol=0, atol=1e-5, msg=key)
    for actual_grad, expected_grad in zip(actual[2], expected[2]):
        if expected_grad is None:  # without auxiliary_loss neither loss reads outputs_class/outputs_coord
            assert actual_grad is None
        else:
            torch.testing.assert_close(actual_grad, expected_grad, rtol=0, atol=1e-5)


def test_a_batch_without_any_box_equals_transformers():
    generator = torch.Generator().manual_seed(5)
    config = loss_config()
    outputs_class, outputs_coord = random_predictions(2, generator)
    labels = random_labels([0, 0], generator)
    expected = loss_and_gradients(DeformableDetrForObjectDetectionLoss, outputs_class, outputs_coord, labels, config)
    criterion = DeformableDetrCriterion.from_config(config)
    actual = loss_and_gradients(criterion, outputs_class, outputs_coord, labels, config)
    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=1e-5)
    for actual_grad, expected_grad in zip(actual[2], expected[2]):
        torch.testing.assert_close(actual_grad, expected_grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_equals_transformers_matcher_per_layer(seed):
    generator = torch.Generator().manual_seed(seed)
    config = loss_config()
    outputs_class, outputs_coord = random_predictions(3, generator)
    labels = random_labels([4, 0, 12], generator)  # 12 > 10 queries: some targets stay unmatched
    matcher = DeformableDetrHungarianMatcher(config.class_cost, config.bbox_cost, config.giou_cost)

    match = DeformableDetrCriterion.from_config(config).match(outputs_class, outputs_coord, labels)

    for layer in range(DECODER_LAYERS):
        expected = matcher({"logits": outputs_class[layer], "pred_boxes": outputs_coord[layer]}, labels)
        for (queries, targets), (expected_queries, expected_targets) in zip(match.per_image(layer), expected):
            assert torch.equal(queries, expected_queries) and torch.equal(targets, expected_targets)


def test_non_finite_predictions_are_matched_last_like_transformers():
    generator = torch.Generator().manual_seed(7)
    config = loss_config()
    outputs_class, outputs_coord = random_predictions(2, generator)
    # transformers refuses NaN boxes (a host-synced check), so the NaN goes in the logits.
    outputs_class[:, 0, 0] = float("nan")
    labels = random_labels([3, 2], generator)
    matcher = DeformableDetrHungarianMatcher(config.class_cost, config.bbox_cost, config.giou_cost)
    match = DeformableDetrCriterion.from_config(config).match(outputs_class, outputs_coord, labels)
    for layer in range(DECODER_LAYERS):
        expected = matcher({"logits": outputs_class[layer], "pred_boxes": outputs_coord[layer]}, labels)
        assert 0 not in match.per_image(layer)[0][0].tolist()
        for (queries, targets), (expected_queries, expected_targets) in zip(match.per_image(layer), expected):
            assert torch.equal(queries, expected_queries) and torch.equal(targets, expected_targets)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_micro_batches_normalised_by_the_whole_batch_sum_to_it(as_tensor):
    generator = torch.Generator().manual_seed(11)
    config = loss_config()
    outputs_class, outputs_coord = random_predictions(4, generator)
    labels = random_labels([3, 0, 5, 2], generator)
    criterion = DeformableDetrCriterion.from_config(config)
    total_boxes = count_target_boxes(labels)
    num_boxes = torch.tensor(float(total_boxes)) if as_tensor else float(total_boxes)

    with criterion.normalized_by(num_boxes):
        whole = loss_and_gradients(criterion, outputs_class, outputs_coord, labels, config)
        halves = [
            loss_and_gradients(criterion, outputs_class[:, part], outputs_coord[:, part], labels[part], config)
            for part in (slice(0, 2), slice(2, 4))
        ]
    assert criterion.num_boxes is None  # restored on exit

    torch.testing.assert_close(halves[0][0] + halves[1][0], whole[0], rtol=0, atol=1e-6)
    for key, value in whole[1].items():
        if not key.startswith("cardinality_error"):  # a batch mean, not a sum; logged only
            torch.testing.assert_close(halves[0][1][key] + halves[1][1][key], value, rtol=0, atol=1e-6, msg=key)
    for index, whole_grad in enumerate(whole[2]):
        batch_dim = 0 if index < 2 else 1
        summed = torch.cat([halves[0][2][index], halves[1][2][index]], dim=batch_dim)
        torch.testing.assert_close(summed, whole_grad, rtol=0, atol=1e-6)


def test_num_boxes_attribute_overrides_the_batch_count_and_is_clamped_at_one():
    generator = torch.Generator().manual_seed(3)
    config = loss_config()
    outputs_class, outputs_coord = random_predictions(2, generator)
    labels = random_labels([2, 3], generator)
    criterion = DeformableDetrCriterion.from_config(config)

    def loss() -> torch.Tensor:
        return loss_and_gradients(criterion, outputs_class, outputs_coord, labels, config)[0]

    by_batch = loss()  # normalised by its 5 boxes
    criterion.num_boxes = torch.tensor(10.0)
    torch.testing.assert_close(loss(), by_batch / 2)
    criterion.num_boxes = 0.25
    torch.testing.assert_close(loss(), by_batch * 5)


class HostReadbacks(TorchFunctionMode):
    """Records the tensor calls that read device data on the host (syncs on a GPU)."""

    READBACKS = frozenset(
        {"cpu", "item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__array__", "nonzero"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READBACKS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_one_host_readback_per_call():
    generator = torch.Generator().manual_seed(0)
    config = loss_config()
    outputs_class, outputs_coord = random_predictions(3, generator)
    labels = random_labels([4, 0, 7], generator)
    criterion = DeformableDetrCriterion.from_config(config)
    with HostReadbacks() as decoder:
        loss_and_gradients(criterion, outputs_class, outputs_coord, labels, config)
    with HostReadbacks() as encoder:
        criterion.total_encoder_loss(outputs_class[-1], torch.logit(outputs_coord[-1]), labels)[0]
    assert decoder.calls == ["cpu"]
    assert encoder.calls == ["cpu"]


# --- a tiny real model -------------------------------------------------------------


def tiny_model_config(**overrides) -> DeformableDetrConfig:
    backbone = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], layer_type="basic",
        out_features=["stage2", "stage3"],
    )
    kwargs = {
        "backbone_config": backbone, "num_labels": 3, "d_model": 32, "encoder_layers": 1, "decoder_layers": 2,
        "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
        "num_queries": 5, "num_feature_levels": 2, "auxiliary_loss": True,
        "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
    }
    return DeformableDetrConfig(**{**kwargs, **overrides})


def tiny_model(seed: int = 0, **overrides) -> DeformableDetrForObjectDetection:
    torch.manual_seed(seed)
    return DeformableDetrForObjectDetection(tiny_model_config(**overrides)).train()


def tiny_batch(seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 64, 64, generator=generator), random_labels([3, 1], generator, num_labels=3)


def parameter_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad for name, param in model.named_parameters() if param.grad is not None}


def test_plugged_into_a_model_it_gives_transformers_loss_and_gradients():
    reference = tiny_model()
    model = copy.deepcopy(reference)
    criterion = DeformableDetrCriterion.from_config(model.config)
    model.loss_function = criterion
    assert model.loss_function is criterion
    pixel_values, labels = tiny_batch()

    expected = reference(pixel_values=pixel_values, labels=labels)
    actual = model(pixel_values=pixel_values, labels=labels)
    expected.loss.backward()
    actual.loss.backward()

    torch.testing.assert_close(actual.loss, expected.loss, rtol=0, atol=1e-5)
    assert set(actual.loss_dict) == set(expected.loss_dict)
    assert len(actual.auxiliary_outputs) == len(expected.auxiliary_outputs) == 1
    expected_grads, actual_grads = parameter_grads(reference), parameter_grads(model)
    assert set(actual_grads) == set(expected_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


# --- two-stage encoder loss --------------------------------------------------------


def test_two_stage_encoder_loss_reaches_the_model_and_equals_transformers_parts():
    model = tiny_model(with_box_refine=True, two_stage=True, two_stage_num_proposals=5)
    criterion = DeformableDetrCriterion.from_config(model.config)
    assert criterion.two_stage
    model.loss_function = criterion
    pixel_values, labels = tiny_batch()

    outputs = model(pixel_values=pixel_values, labels=labels)
    encoder_loss, encoder_dict = criterion.total_encoder_loss(
        outputs.enc_outputs_class, outputs.enc_outputs_coord_logits, labels
    )
    assert set(encoder_dict) == {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc", "cardinality_error_enc"}
    assert torch.isfinite(encoder_loss)
    encoder_loss.backward()
    assert model.model.enc_output.weight.grad.abs().sum() > 0  # the proposal head's input projection

    # The original's encoder branch is the ordinary image loss on class-0 targets.
    reference = DeformableDetrImageLoss(
        matcher=DeformableDetrHungarianMatcher(model.config.class_cost, model.config.bbox_cost, model.config.giou_cost),
        num_classes=model.config.num_labels,
        focal_alpha=model.config.focal_alpha,
        losses=["labels", "boxes", "cardinality"],
    )
    foreground = [{"class_labels": torch.zeros_like(t["class_labels"]), "boxes": t["boxes"]} for t in labels]
    with torch.no_grad():
        enc_outputs = {"logits": outputs.enc_outputs_class, "pred_boxes": outputs.enc_outputs_coord_logits.sigmoid()}
        expected = reference(enc_outputs, foreground)
    for key, value in expected.items():
        torch.testing.assert_close(encoder_dict[f"{key}_enc"].detach(), value, rtol=0, atol=1e-5, msg=key)


def reference_focal_loss(logit: float, target: float, alpha: float = 0.25) -> float:
    """One entry of the sigmoid focal loss, straight from the RetinaNet formula."""
    prob = 1 / (1 + math.exp(-logit))
    p_t = prob if target else 1 - prob
    alpha_t = alpha if target else 1 - alpha
    return -alpha_t * (1 - p_t) ** 2 * math.log(p_t)


def test_encoder_loss_on_a_hand_checkable_example():
    config = loss_config(num_labels=2)
    criterion = DeformableDetrCriterion.from_config(config)
    target_box = torch.tensor([0.5, 0.5, 0.2, 0.2])
    labels = [{"class_labels": torch.tensor([1]), "boxes": target_box[None]}]
    # Three tokens: the second one's proposal is exactly the target, the others far off;
    # the third is an invalid anchor (+inf logits, box (1, 1, 1, 1) as in the model).
    coord_logits = torch.stack(
        [torch.logit(torch.tensor([0.1, 0.1, 0.05, 0.05])), torch.logit(target_box), torch.full((4,), math.inf)]
    )[None]
    class_logits = torch.tensor([[[0.3, -1.0], [0.5, 2.0], [-0.2, 0.0]]])

    loss, loss_dict = criterion.total_encoder_loss(class_logits, coord_logits, labels)

    assert loss_dict["loss_bbox_enc"].item() == pytest.approx(0, abs=1e-6)
    assert loss_dict["loss_giou_enc"].item() == pytest.approx(0, abs=1e-6)
    # The target becomes class 0 and is matched to token 1; every other entry is negative.
    # Mean over tokens, times the number of tokens, over num_boxes = 1: the plain sum.
    expected_ce = sum(
        reference_focal_loss(class_logits[0, token, channel].item(), token == 1 and channel == 0)
        for token in range(3)
        for channel in range(2)
    )
    assert loss_dict["loss_ce_enc"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert loss.item() == pytest.approx(expected_ce, rel=1e-5)
    # Predicted objects (sigmoid > 0.5 in some channel): tokens 1 and 2 -> |2 - 1|.
    assert loss_dict["cardinality_error_enc"].item() == 1


# --- the encoder layer's isfinite sync ---------------------------------------------


def test_sync_free_encoder_layers_give_exactly_the_same_training_step():
    reference = tiny_model(encoder_layers=2)
    model = copy.deepcopy(reference)
    assert remove_encoder_isfinite_sync(model) == 2
    assert remove_encoder_isfinite_sync(model) == 2  # idempotent
    assert all(type(layer) is SyncFreeDeformableDetrEncoderLayer for layer in model.model.encoder.layers)
    assert model.state_dict().keys() == reference.state_dict().keys()
    pixel_values, labels = tiny_batch()

    expected = reference(pixel_values=pixel_values, labels=labels)
    actual = model(pixel_values=pixel_values, labels=labels)
    expected.loss.backward()
    actual.loss.backward()

    assert torch.equal(actual.encoder_last_hidden_state, expected.encoder_last_hidden_state)
    assert torch.equal(actual.logits, expected.logits) and torch.equal(actual.loss, expected.loss)
    expected_grads = parameter_grads(reference)
    for name, grad in parameter_grads(model).items():
        assert torch.equal(grad, expected_grads[name]), name


def test_sync_free_patch_refuses_an_encoder_layer_whose_code_changed(monkeypatch, caplog):
    from detr_train.modeling import sync_free

    model = tiny_model()
    # Patch the module sync_free reports from: an earlier test may have left another
    # `transformers` module object in sys.modules.
    monkeypatch.setattr(sync_free.transformers, "__version__", "5.99.0")
    monkeypatch.setattr(sync_free, "MIRRORED_FORWARD", "another forward")
    assert remove_encoder_isfinite_sync(model) == 0
    assert type(model.model.encoder.layers[0]) is not SyncFreeDeformableDetrEncoderLayer
    assert "5.99.0" in caplog.text


def test_the_fingerprint_ignores_docstrings_but_not_code():
    from detr_train.modeling.sync_free import forward_fingerprint

    def documented():
        def forward(x):
            """Doubles."""
            return 2 * x
        return forward

    def undocumented():
        def forward(x):
            return 2 * x  # a comment
        return forward

    def changed():
        def forward(x):
            return 3 * x
        return forward

    assert forward_fingerprint(documented()) == forward_fingerprint(undocumented())
    assert forward_fingerprint(documented()) != forward_fingerprint(changed())


class InjectInfinity(torch.nn.Module):
    """Wraps a LayerNorm and makes one of its outputs +inf, as an overflow would."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.norm(hidden_states).clone()
        hidden_states[0, 0, 0] = math.inf
        return hidden_states


def test_sync_free_encoder_layer_clamps_infinity_like_the_original():
    reference = tiny_model()
    model = copy.deepcopy(reference)
    remove_encoder_isfinite_sync(model)
    for each in (reference, model):
        layer = each.model.encoder.layers[0]
        layer.final_layer_norm = InjectInfinity(layer.final_layer_norm)
    pixel_values, _ = tiny_batch()
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values).encoder_last_hidden_state
        actual = model(pixel_values=pixel_values).encoder_last_hidden_state
    assert actual[0, 0, 0] == torch.finfo(actual.dtype).max
    assert torch.equal(actual, expected)


def test_sync_free_encoder_layer_keeps_gradient_checkpointing():
    model = tiny_model()
    remove_encoder_isfinite_sync(model)
    model.activation_checkpointing_enable()
    attention_calls = []
    model.model.encoder.layers[0].self_attn.register_forward_hook(lambda *_: attention_calls.append(1))
    pixel_values, labels = tiny_batch()
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    assert len(attention_calls) == 2  # the forward, and its replay in backward


# --- on a GPU: count the syncs --------------------------------------------------------

requires_cuda = pytest.mark.gpu


class SyncCounter:
    """Counts CUDA stream, event and device synchronisations (GPU trace callbacks; they
    cannot be unregistered, so one counter serves the whole test session)."""

    _instance: SyncCounter | None = None

    def __init__(self) -> None:
        import torch.cuda._gpu_trace as gpu_trace

        self.active = False
        self.count = 0
        torch._C._activate_gpu_trace()
        gpu_trace.register_callback_for_stream_synchronization(self._record)
        gpu_trace.register_callback_for_event_synchronization(self._record)
        gpu_trace.register_callback_for_device_synchronization(self._record)

    @classmethod
    def get(cls) -> SyncCounter:
        if cls._instance is None:
            cls._instance = SyncCounter()
        return cls._instance

    def _record(self, *_) -> None:
        if self.active:
            self.count += 1

    @contextmanager
    def counting(self) -> Iterator[list[int]]:
        """Yields a one-element list that holds the count once the block has ended."""
        result: list[int] = []
        torch.cuda.synchronize()
        self.count, self.active = 0, True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield result
            finally:
                torch.cuda.set_sync_debug_mode("default")
                self.active = False
        sync_warnings = sum("synchronizing" in str(warning.message) for warning in caught)
        result.append(max(self.count, sync_warnings))


def to_cuda_labels(labels: list[dict]) -> list[dict]:
    return [{key: value.cuda() for key, value in target.items()} for target in labels]


@requires_cuda
def test_cuda_criterion_forward_and_backward_sync_at_most_twice_and_equal_transformers():
    generator = torch.Generator().manual_seed(0)
    config = loss_config()
    outputs_class, outputs_coord = (t.cuda() for t in random_predictions(3, generator))
    labels = to_cuda_labels(random_labels([4, 0, 7], generator))
    criterion = DeformableDetrCriterion.from_config(config)
    loss_and_gradients(criterion, outputs_class, outputs_coord, labels, config)  # warm-up: allocators, kernels

    counter = SyncCounter.get()
    with counter.counting() as syncs:
        actual = loss_and_gradients(criterion, outputs_class, outputs_coord, labels, config)
    with counter.counting() as encoder_syncs:
        criterion.total_encoder_loss(outputs_class[-1], torch.logit(outputs_coord[-1]), labels)[0].backward()
    assert syncs[0] <= 2 and encoder_syncs[0] <= 1

    expected = loss_and_gradients(DeformableDetrForObjectDetectionLoss, outputs_class, outputs_coord, labels, config)
    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=1e-5)
    for actual_grad, expected_grad in zip(actual[2], expected[2]):
        torch.testing.assert_close(actual_grad, expected_grad, rtol=0, atol=1e-5)


class CountedCriterion:
    """Counts the syncs inside the loss function's call during a real training step."""

    def __init__(self, criterion: DeformableDetrCriterion) -> None:
        self.criterion = criterion
        self.syncs: list[int] = []

    def __call__(self, *args, **kwargs):
        with SyncCounter.get().counting() as syncs:
            result = self.criterion(*args, **kwargs)
        self.syncs.append(syncs[0])
        return result


@requires_cuda
def test_cuda_training_step_syncs_at_most_twice_in_the_criterion():
    model = tiny_model().cuda()
    remove_encoder_isfinite_sync(model)
    counted = CountedCriterion(DeformableDetrCriterion.from_config(model.config))
    model.loss_function = counted
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixel_values, labels = tiny_batch()
    pixel_values, labels = pixel_values.cuda(), to_cuda_labels(labels)
    for _ in range(2):  # the first step warms up allocators and lazy initialisation
        optimizer.zero_grad()
        model(pixel_values=pixel_values, labels=labels).loss.backward()
        optimizer.step()
    assert counted.syncs[-1] <= 2
