"""Remove the host sync from transformers' Deformable DETR encoder layers.

`DeformableDetrEncoderLayer.forward` (transformers 5.24) ends with

    if self.training:
        if not torch.isfinite(hidden_states).all():   # a host sync, every layer, every step
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)

Clamping unconditionally in training needs no sync, and it only changes values outside
+-(finfo.max - 1000). For float32 and bfloat16 that bound rounds to finfo.max, so the
only values it changes are +-inf, exactly those the original clamps: the output is
bitwise identical, and so is the gradient (clamp passes it unchanged inside the bounds).
For float16 the bound is 64504: a finite value in (64504, 65504] in a layer with no
non-finite value would be clamped here and kept by the original (a LayerNorm output that
large does not occur in practice, and the model computes it in float32 under autocast).
NaN passes through both unchanged.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import logging
import textwrap
from typing import Any

import torch
import transformers
from torch import nn
from transformers.models.deformable_detr.modeling_deformable_detr import (
    DeformableDetrEncoderLayer,
)

log = logging.getLogger(__name__)

# The transformers release whose `DeformableDetrEncoderLayer.forward` the body below copies,
# and the fingerprint of that forward: the patch applies wherever the installed one matches.
MIRRORED_TRANSFORMERS = "5.24"
MIRRORED_FORWARD = "f054c103a7a2c53e080fe73503b4f5c8051bcb3c811192f244117ee7f5d40c91"


class SyncFreeDeformableDetrEncoderLayer(DeformableDetrEncoderLayer):
    """`DeformableDetrEncoderLayer` whose training-mode clamp needs no host sync.

    Being a subclass, it gets the gradient-checkpointing wrapper that
    `GradientCheckpointingLayer.__init_subclass__` puts around every layer class's forward;
    a `forward` attribute set on an instance would bypass that wrapper and silently turn
    gradient checkpointing off for the layer.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        spatial_position_embeddings: torch.Tensor | None = None,
        reference_points: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        spatial_shapes_list: list[tuple[int, int]] | None = None,
        level_start_index: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        # Copied from transformers 5.24 DeformableDetrEncoderLayer.forward, except the clamp.
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            encoder_hidden_states=hidden_states,
            encoder_attention_mask=attention_mask,
            position_embeddings=spatial_position_embeddings,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            spatial_shapes_list=spatial_shapes_list,
            level_start_index=level_start_index,
        )

        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = residual + hidden_states
        hidden_states = self.self_attn_layer_norm(hidden_states)

        residual = hidden_states
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        hidden_states = self.final_layer_norm(hidden_states)

        if self.training:
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)

        return hidden_states


def forward_fingerprint(function) -> str:
    """A hash of a function's code (its syntax tree, docstring left out): two releases whose
    forward differs only in comments or docstrings have the same fingerprint."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    first = tree.body[0] if tree.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        tree.body = tree.body[1:]
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


def _mirrors_installed_transformers() -> bool:
    # transformers 5.17 to 5.24 share this forward; any other code is not replaced blindly.
    return forward_fingerprint(DeformableDetrEncoderLayer.forward) == MIRRORED_FORWARD


def remove_encoder_isfinite_sync(model: nn.Module) -> int:
    """Make every `DeformableDetrEncoderLayer` in `model` sync-free; returns how many are.

    Each such layer (exactly that class, not other subclasses, whose forward may differ)
    has its class switched to `SyncFreeDeformableDetrEncoderLayer`: weights, hooks and
    state_dict keys are untouched and other model instances are unaffected. Idempotent:
    layers already switched are counted again, not changed, so a second call returns the
    same number. If the installed transformers' forward is not the code that was copied (its
    fingerprint differs), nothing is changed (0 is returned) and a warning says so.
    """
    if not _mirrors_installed_transformers():
        log.warning(
            "transformers %s's DeformableDetrEncoderLayer.forward is not the one the sync-free layer copies "
            "(from %s); encoder layers left unpatched (they keep one host sync each in training)",
            transformers.__version__,
            MIRRORED_TRANSFORMERS,
        )
        return 0
    sync_free = 0
    for module in model.modules():
        if type(module) is DeformableDetrEncoderLayer:
            module.__class__ = SyncFreeDeformableDetrEncoderLayer
        if type(module) is SyncFreeDeformableDetrEncoderLayer:
            sync_free += 1
    log.debug("%d Deformable DETR encoder layers run without the isfinite host sync", sync_free)
    return sync_free
