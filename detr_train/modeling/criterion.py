"""Deformable DETR's training criterion without host syncs.

`DeformableDetrCriterion` is a drop-in replacement for transformers'
`DeformableDetrForObjectDetectionLoss` (transformers 5.24, `loss/loss_deformable_detr.py`
and `loss/loss_for_object_detection.py`): same call signature, same return value
`(loss, loss_dict, auxiliary_outputs)`, same keys and weights, so that
`model.loss_function = DeformableDetrCriterion.from_config(model.config)` plugs it in.

What is matched from transformers:

* the Hungarian matching cost: focal class cost with the fixed alpha=0.25, gamma=2 (not
  `focal_alpha`), L1 and negative GIoU between cxcywh boxes, weighted by `class_cost`,
  `bbox_cost`, `giou_cost`; NaN/inf costs replaced by float32's max before scipy's
  `linear_sum_assignment`, so broken predictions are only matched as a last resort;
* the losses: sigmoid focal loss (`focal_alpha`, gamma 2) over the one-hot targets,
  `mean` over queries times the number of queries, divided by num_boxes; L1 and
  `1 - GIoU` of the matched pairs summed and divided by num_boxes; the `_{i}` keys of the
  auxiliary decoder layers; `cardinality_error` (sigmoid > 0.5 count versus target count,
  logged only, never weighted into the loss);
* the total: `loss_ce + bbox_loss_coefficient * loss_bbox + giou_loss_coefficient *
  loss_giou` over the final and the auxiliary layers.

Where it departs, and why:

* Host syncs. Transformers syncs ~130 times per step on a GPU (a `.cpu()` per decoder
  layer, `.all()` box checks, CPU index tensors, `num_boxes.item()`, a pageable
  `torch.as_tensor(list, device=cuda)`). Here the cost matrices of all decoder layers are
  computed in one batched pass on the device, copied to pinned host memory once, waited
  for with one event synchronize, solved on the host, and every index tensor (and the
  per-image target counts that `cardinality_error` needs) goes back in a single pinned,
  non-blocking copy. That is one sync per call; `encoder_loss` costs one more.
* Costs are computed per image (targets padded to the largest image's count) instead of
  over the whole batch's concatenated targets and then cut per image: the same entries,
  `batch_size` times less work and transfer. They are computed in float32 whatever the
  prediction dtype, because numpy (and so scipy) has no bfloat16.
* GIoU does not validate boxes. Transformers raises on a degenerate predicted box
  (x1 < x0), which needs a host sync; here such a box gives a finite or NaN cost that
  `nan_to_num` makes a last resort in the matcher. The model's boxes are sigmoid outputs
  with positive width and height, so they are never degenerate in practice.
* Each matched pair's GIoU is computed directly instead of as the diagonal of an N x N
  matrix, and the losses of all layers are computed in one batched pass; values agree
  with transformers to float rounding (the tests hold them to 1e-5).
* num_boxes is not all-reduced here (transformers does it only when `accelerate` state
  exists). By default it is this call's target count; for gradient accumulation or DDP
  the caller sets it (`num_boxes` attribute or `normalized_by`), see the class docstring.
* The hyperparameters come from the config given to `from_config`; the `config` passed at
  call time is accepted for signature compatibility and not read again.
* The class is not an `nn.Module`: `PreTrainedModel.loss_function` is a property with a
  setter, and `nn.Module.__setattr__` would register a module value as a submodule
  instead of calling that setter, leaving the model on its default loss.

Two-stage Deformable DETR: transformers 5.24 neither computes nor receives the encoder
proposal loss; `encoder_loss` / `total_encoder_loss` compute it from the model outputs
(see their docstrings for what they match).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, sigmoid_focal_loss

Labels = Sequence[Mapping[str, Tensor]]

# The matcher's focal cost uses these fixed values in transformers and in the original
# Deformable DETR; the loss uses the configurable `focal_alpha` instead.
MATCHER_FOCAL_ALPHA = 0.25
MATCHER_FOCAL_GAMMA = 2.0
LOSS_FOCAL_GAMMA = 2.0
# Padding for images with fewer targets than the largest one: a valid box keeps the
# padded cost entries finite; the host never reads them.
_PADDING_BOX = 0.5


def count_target_boxes(labels: Labels) -> int:
    """The number of target boxes in `labels`, read from tensor shapes (no sync).

    For gradient accumulation, sum this over the micro-batches of one optimiser step; under
    DDP, all-reduce that sum and divide it by the world size (see `DeformableDetrCriterion`).
    """
    return sum(len(target["boxes"]) for target in labels)


@dataclass(frozen=True)
class HungarianMatch:
    """The matching of `num_layers` prediction layers against one batch's targets.

    Every image keeps `min(num_queries, its target count)` pairs in every layer, so all
    layers have the same number of pairs M and the index tensors are rectangular. All
    tensors live on the predictions' device.
    """

    query_index: Tensor  # [layers, M] query of each pair, within its image
    target_index: Tensor  # [layers, M] target of each pair, within its image
    batch_index: Tensor  # [M] image of each pair
    target_start: Tensor  # [M] where the pair's image starts in the concatenated targets
    target_counts: Tensor  # [batch] number of targets per image
    pairs_per_image: tuple[int, ...]

    def per_image(self, layer: int) -> list[tuple[Tensor, Tensor]]:
        """One layer's matching in transformers' format: per image (query indices, target indices)."""
        queries = self.query_index[layer].split(self.pairs_per_image)
        targets = self.target_index[layer].split(self.pairs_per_image)
        return list(zip(queries, targets))


class DeformableDetrCriterion:
    """Deformable DETR's Hungarian-matched loss, one host sync per call.

    Call it like transformers' `DeformableDetrForObjectDetectionLoss`, or install it with
    `model.loss_function = criterion`.

    Normalisation. The box losses and the focal loss are divided by a box count:

    * `criterion.num_boxes = None` (default): the number of target boxes in this call's
      labels, at least 1, as transformers does on one process;
    * `criterion.num_boxes = n` (a float, or a scalar tensor on the loss device): `n`,
      clamped at 1 on the device, for every later call until reset to None;
    * `with criterion.normalized_by(n): ...`: the same, restored on exit.

    With gradient accumulation, set it to the box count of the whole optimiser step (the
    sum of `count_target_boxes` over its micro-batches): the micro-batch losses then sum to
    the loss of the step's whole batch, gradients included, since matching is per image.
    Under DDP, pass the all-reduced count divided by the world size: DDP averages the
    gradients, which gives the gradient of the global batch's loss.
    """

    def __init__(
        self,
        *,
        num_labels: int,
        class_cost: float,
        bbox_cost: float,
        giou_cost: float,
        bbox_loss_coefficient: float,
        giou_loss_coefficient: float,
        focal_alpha: float,
        auxiliary_loss: bool,
        decoder_layers: int,
        two_stage: bool,
    ) -> None:
        if class_cost == 0 and bbox_cost == 0 and giou_cost == 0:
            raise ValueError("All costs of the Matcher can't be 0")
        self.num_labels = num_labels
        self.class_cost = class_cost
        self.bbox_cost = bbox_cost
        self.giou_cost = giou_cost
        self.bbox_loss_coefficient = bbox_loss_coefficient
        self.giou_loss_coefficient = giou_loss_coefficient
        self.focal_alpha = focal_alpha
        self.auxiliary_loss = auxiliary_loss
        self.decoder_layers = decoder_layers
        # Informs the caller that `encoder_loss` applies; the decoder loss does not depend on it.
        self.two_stage = two_stage
        self.num_boxes: float | Tensor | None = None

    @classmethod
    def from_config(cls, config: Any) -> DeformableDetrCriterion:
        """Build from a `DeformableDetrConfig` (or anything with the same attributes)."""
        return cls(
            num_labels=config.num_labels,
            class_cost=config.class_cost,
            bbox_cost=config.bbox_cost,
            giou_cost=config.giou_cost,
            bbox_loss_coefficient=config.bbox_loss_coefficient,
            giou_loss_coefficient=config.giou_loss_coefficient,
            focal_alpha=config.focal_alpha,
            auxiliary_loss=config.auxiliary_loss,
            decoder_layers=config.decoder_layers,
            two_stage=config.two_stage,
        )

    @contextmanager
    def normalized_by(self, num_boxes: float | Tensor) -> Iterator[DeformableDetrCriterion]:
        """Normalise the calls inside the block by `num_boxes`; the previous setting returns on exit."""
        previous = self.num_boxes
        self.num_boxes = num_boxes
        try:
            yield self
        finally:
            self.num_boxes = previous

    def __call__(
        self,
        logits: Tensor,
        labels: Labels,
        device: torch.device | str | None,
        pred_boxes: Tensor,
        config: Any = None,
        outputs_class: Tensor | Sequence[Tensor] | None = None,
        outputs_coord: Tensor | Sequence[Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, dict[str, Tensor], list[dict[str, Tensor]] | None]:
        """The decoder loss, as transformers' `DeformableDetrForObjectDetectionLoss` returns it.

        `logits` [batch, queries, num_labels] and `pred_boxes` [batch, queries, 4] (cxcywh in
        [0, 1]) are the final layer's; with `auxiliary_loss`, `outputs_class` and
        `outputs_coord` hold every decoder layer, the final one last. `labels` has one dict
        per image with "class_labels" [n] and "boxes" [n, 4] on the predictions' device.
        `device` and `config` are unused (see the module docstring).
        """
        auxiliary_outputs = None
        layer_logits, layer_boxes = logits.unsqueeze(0), pred_boxes.unsqueeze(0)
        if self.auxiliary_loss:
            if outputs_class is None or outputs_coord is None:
                raise ValueError("auxiliary_loss needs outputs_class and outputs_coord")
            auxiliary_outputs = [
                {"logits": layer_class, "pred_boxes": layer_coord}
                for layer_class, layer_coord in zip(outputs_class[:-1], outputs_coord[:-1])
            ]
            # The final layer comes from `logits`/`pred_boxes` so that their gradients flow
            # to the tensors the caller passed, as in transformers.
            layer_logits = torch.stack([*outputs_class[:-1], logits])
            layer_boxes = torch.stack([*outputs_coord[:-1], pred_boxes])

        per_layer = self._per_layer_losses(layer_logits, layer_boxes, labels)
        final = layer_logits.shape[0] - 1
        loss_dict = {key: values[final] for key, values in per_layer.items()}
        for layer in range(final):
            loss_dict.update({f"{key}_{layer}": values[layer] for key, values in per_layer.items()})
        return self._weighted_sum(per_layer), loss_dict, auxiliary_outputs

    def encoder_loss(
        self, enc_outputs_class: Tensor, enc_outputs_coord_logits: Tensor, labels: Labels
    ) -> dict[str, Tensor]:
        """Two-stage Deformable DETR's encoder proposal loss, keys suffixed `_enc`.

        Inputs are the model output's `enc_outputs_class` [batch, tokens, num_labels] (logits
        of the proposal head, for every encoder token, before the top-k selection) and
        `enc_outputs_coord_logits` [batch, tokens, 4] (unsigmoided cxcywh: the box head's
        delta plus the inverse-sigmoid anchor, +inf at padded or out-of-range anchors).

        This matches the `enc_outputs` branch of `SetCriterion.forward` in the original
        Deformable DETR (fundamentalvision/Deformable-DETR, models/deformable_detr.py):
        every target is relabelled to class 0; predictions are `enc_outputs_class` and
        `sigmoid(enc_outputs_coord_logits)` (so +inf anchors become the box (1, 1, 1, 1),
        as there); the same Hungarian matcher; the focal loss over all `num_labels` logits
        with channel 0 positive for matched tokens and every other entry negative, times
        the number of tokens; L1 and 1 - GIoU of the matched pairs; all divided by the same
        num_boxes as the decoder loss. `cardinality_error_enc` uses transformers' sigmoid
        > 0.5 count (the original kept DETR's softmax rule, argmax != last class, which
        does not fit sigmoid scores). One host sync.
        """
        foreground = [
            {"class_labels": torch.zeros_like(target["class_labels"]), "boxes": target["boxes"]} for target in labels
        ]
        per_layer = self._per_layer_losses(
            enc_outputs_class.unsqueeze(0), enc_outputs_coord_logits.sigmoid().unsqueeze(0), foreground
        )
        return {f"{key}_enc": values[0] for key, values in per_layer.items()}

    def total_encoder_loss(
        self, enc_outputs_class: Tensor, enc_outputs_coord_logits: Tensor, labels: Labels
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted encoder loss, `encoder_loss`'s dict), weighted with the decoder loss's
        coefficients as the original does: add the first to `outputs.loss` before backward."""
        loss_dict = self.encoder_loss(enc_outputs_class, enc_outputs_coord_logits, labels)
        loss = (
            loss_dict["loss_ce_enc"]
            + self.bbox_loss_coefficient * loss_dict["loss_bbox_enc"]
            + self.giou_loss_coefficient * loss_dict["loss_giou_enc"]
        )
        return loss, loss_dict

    def match(self, layer_logits: Tensor, layer_boxes: Tensor, labels: Labels) -> HungarianMatch:
        """Hungarian matching of every layer at once: [layers, batch, queries, ...] predictions."""
        target_counts = [len(target["boxes"]) for target in labels]
        cost = self._matching_cost(layer_logits, layer_boxes, labels)
        packed, pairs_per_image = _solve_assignments(_copy_to_host(cost), target_counts)
        return _unpack_match(_copy_to_device(packed, layer_logits.device), layer_logits.shape[0], pairs_per_image)

    @torch.no_grad()
    def _matching_cost(self, layer_logits: Tensor, layer_boxes: Tensor, labels: Labels) -> Tensor:
        """[layers, batch, queries, most targets] cost, each image against its own targets."""
        num_layers, batch_size, num_queries, _ = layer_logits.shape
        target_classes = torch.nn.utils.rnn.pad_sequence(
            [target["class_labels"].long() for target in labels], batch_first=True, padding_value=0
        )
        target_boxes = torch.nn.utils.rnn.pad_sequence(
            [target["boxes"].float() for target in labels], batch_first=True, padding_value=_PADDING_BOX
        )
        most_targets = target_classes.shape[1]

        prob = layer_logits.float().sigmoid()
        neg_cost_class = (1 - MATCHER_FOCAL_ALPHA) * (prob**MATCHER_FOCAL_GAMMA) * (-(1 - prob + 1e-8).log())
        pos_cost_class = MATCHER_FOCAL_ALPHA * ((1 - prob) ** MATCHER_FOCAL_GAMMA) * (-(prob + 1e-8).log())
        class_index = target_classes[None, :, None, :].expand(num_layers, batch_size, num_queries, most_targets)
        class_cost = torch.gather(pos_cost_class - neg_cost_class, 3, class_index)

        pred = layer_boxes.float()[..., :, None, :]  # [L, B, Q, 1, 4]
        target = target_boxes[None, :, None, :, :]  # [1, B, 1, T, 4]
        bbox_cost = (pred - target).abs().sum(-1)
        giou_cost = -generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(target, "cxcywh", "xyxy"))

        cost = self.bbox_cost * bbox_cost + self.class_cost * class_cost + self.giou_cost * giou_cost
        max_value = torch.finfo(cost.dtype).max
        return torch.nan_to_num(cost, nan=max_value, posinf=max_value, neginf=max_value)

    def _per_layer_losses(self, layer_logits: Tensor, layer_boxes: Tensor, labels: Labels) -> dict[str, Tensor]:
        """Each loss as a [layers] vector."""
        num_layers, batch_size, num_queries, num_classes = layer_logits.shape
        match = self.match(layer_logits, layer_boxes, labels)
        num_boxes = self._normaliser(labels, layer_logits.device)
        target_classes = torch.cat([target["class_labels"].long() for target in labels])
        target_boxes = torch.cat([target["boxes"] for target in labels])

        # Rows of the predictions flattened to [layers * batch * queries] and of the
        # concatenated targets, for every matched pair of every layer.
        layer_start = torch.arange(num_layers, device=layer_logits.device)[:, None] * (batch_size * num_queries)
        pred_rows = (layer_start + match.batch_index * num_queries + match.query_index).flatten()
        target_rows = (match.target_start + match.target_index).flatten()

        # Unmatched predictions get the extra "no object" class, whose one-hot column is
        # dropped, as in transformers.
        dense_classes = torch.full(
            (num_layers * batch_size * num_queries,), num_classes, dtype=torch.int64, device=layer_logits.device
        )
        dense_classes.index_copy_(0, pred_rows, target_classes.index_select(0, target_rows))
        onehot = torch.zeros(
            (dense_classes.shape[0], num_classes + 1), dtype=layer_logits.dtype, device=layer_logits.device
        )
        # scatter_, not F.one_hot: one_hot may check the class range with a host sync.
        onehot.scatter_(1, dense_classes.unsqueeze(-1), 1)
        onehot = onehot[:, :-1].view(num_layers, batch_size, num_queries, num_classes)
        focal = sigmoid_focal_loss(layer_logits, onehot, alpha=self.focal_alpha, gamma=LOSS_FOCAL_GAMMA,
                                   reduction="none")
        loss_ce = focal.mean(2).sum(dim=(1, 2)) / num_boxes * num_queries

        source_boxes = layer_boxes.reshape(-1, 4).index_select(0, pred_rows)
        matched_targets = target_boxes.index_select(0, target_rows)
        loss_bbox = (source_boxes - matched_targets).abs().view(num_layers, -1).sum(1) / num_boxes
        giou = generalized_box_iou(box_convert(source_boxes, "cxcywh", "xyxy"),
                                   box_convert(matched_targets, "cxcywh", "xyxy"))
        loss_giou = (1 - giou).view(num_layers, -1).sum(1) / num_boxes

        return {
            "loss_ce": loss_ce,
            "loss_bbox": loss_bbox,
            "loss_giou": loss_giou,
            "cardinality_error": _cardinality_error(layer_logits, match.target_counts),
        }

    def _normaliser(self, labels: Labels, device: torch.device) -> Tensor:
        """num_boxes as a device scalar, at least 1; `torch.full` fills on the device, no copy."""
        if isinstance(self.num_boxes, Tensor):
            return self.num_boxes.detach().to(device=device, dtype=torch.float32).clamp(min=1)
        count = count_target_boxes(labels) if self.num_boxes is None else self.num_boxes
        return torch.full((), max(float(count), 1.0), dtype=torch.float32, device=device)

    def _weighted_sum(self, per_layer: Mapping[str, Tensor]) -> Tensor:
        return (
            per_layer["loss_ce"]
            + self.bbox_loss_coefficient * per_layer["loss_bbox"]
            + self.giou_loss_coefficient * per_layer["loss_giou"]
        ).sum()


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of corner-format boxes, elementwise with broadcasting over the leading dims.

    Pairwise for [N, 1, 4] against [1, M, 4]. Transformers' arithmetic, without its
    `.all()` validation of the corners (a host sync).
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    inter_wh = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area1 + area2 - inter
    iou = inter / union
    hull_wh = (torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou - (hull - union) / hull


@torch.no_grad()
def _cardinality_error(layer_logits: Tensor, target_counts: Tensor) -> Tensor:
    """Per layer, the mean absolute error of the predicted object count (logging only)."""
    predicted = (layer_logits.sigmoid().max(-1).values > 0.5).sum(-1).float()  # [layers, batch]
    return (predicted - target_counts.float()).abs().mean(-1)


def _solve_assignments(cost: np.ndarray, target_counts: Sequence[int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Solve every (layer, image) assignment; pack all indices into one int64 array.

    Layout: query_index [L*M], target_index [L*M], batch_index [M], target_start [M],
    target_counts [B] -- one buffer so that one copy brings everything to the device.
    """
    num_layers, _, num_queries, _ = cost.shape
    pairs_per_image = tuple(min(num_queries, count) for count in target_counts)
    num_pairs = sum(pairs_per_image)
    query_index = np.empty((num_layers, num_pairs), dtype=np.int64)
    target_index = np.empty((num_layers, num_pairs), dtype=np.int64)
    image_ends = np.cumsum(pairs_per_image)
    for layer in range(num_layers):
        for image, (count, end) in enumerate(zip(target_counts, image_ends)):
            rows, cols = linear_sum_assignment(cost[layer, image, :, :count])
            query_index[layer, end - len(rows) : end] = rows
            target_index[layer, end - len(cols) : end] = cols
    target_starts = np.concatenate([[0], np.cumsum(target_counts)[:-1]]).astype(np.int64)
    batch_index = np.repeat(np.arange(len(target_counts), dtype=np.int64), pairs_per_image)
    packed = np.concatenate(
        [
            query_index.ravel(),
            target_index.ravel(),
            batch_index,
            target_starts[batch_index],
            np.asarray(target_counts, dtype=np.int64),
        ]
    )
    return packed, pairs_per_image


def _unpack_match(packed: Tensor, num_layers: int, pairs_per_image: tuple[int, ...]) -> HungarianMatch:
    """Views into the device copy of `_solve_assignments`' buffer (no further copies)."""
    num_pairs = sum(pairs_per_image)
    sizes = [num_layers * num_pairs, num_layers * num_pairs, num_pairs, num_pairs, len(pairs_per_image)]
    query_index, target_index, batch_index, target_start, target_counts = packed.split(sizes)
    return HungarianMatch(
        query_index=query_index.view(num_layers, num_pairs),
        target_index=target_index.view(num_layers, num_pairs),
        batch_index=batch_index,
        target_start=target_start,
        target_counts=target_counts,
        pairs_per_image=pairs_per_image,
    )


def _copy_to_host(tensor: Tensor) -> np.ndarray:
    """The one device-to-host sync of a matching: a non-blocking copy into pinned memory,
    then a wait on an event recorded after it (only this copy, not the whole device)."""
    if tensor.device.type != "cuda":
        return tensor.cpu().numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tensor.device))
    copied.synchronize()
    return host.numpy()


def _copy_to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """Host-to-device without a sync: from pinned memory, non-blocking. The caching host
    allocator keeps the pinned block alive until the copy is done."""
    host = torch.from_numpy(array)
    if device.type != "cuda":
        return host.to(device, non_blocking=True)  # a no-op on CPU; elsewhere the device orders it
    return host.pin_memory().to(device, non_blocking=True)
