"""Deformable DETR's inference forward with every per-level size taken from tensors, for ONNX.

transformers' `DeformableDetrModel.forward` turns the feature maps' shapes into a Python list
of (height, width) ints (`spatial_shapes_list`) and builds from it the level split of the
attention's value tensor, the encoder's reference points and the two-stage proposals. A
traced export records those ints as constants: the graph then answers correctly only at the
image size it was traced at (0.3 off in the logits elsewhere, measured on the tiny model).

`ExportableDetector` runs the same computation from the same submodules, but reads each
level's size from the feature map itself (`_shape_as_tensor`, ranges built by cumsum over a
row of the map), so the traced graph follows the input's batch and image size. It is built
only while exporting; training and PyTorch inference never see it. Every op mirrors
transformers 5.24's forward for the inference path (no labels, no precomputed encoder
outputs) so that the outputs agree to float rounding; `onnx_export` verifies that with ONNX
Runtime at image sizes other than the traced one.
"""

from __future__ import annotations

import torch
from torch import nn

# Position embeddings this forward knows how to compute from a mask (transformers' default).
SUPPORTED_POSITION_EMBEDDING = "sine"


class UnsupportedForExport(ValueError):
    """The model uses a part this forward does not mirror."""


def _positions(row: torch.Tensor) -> torch.Tensor:
    """0, 1, ..., n-1 (float) for a 1-D tensor of length n, with n read from the tensor:
    `arange(n)` with n a traced size would be a constant in the graph."""
    return torch.ones_like(row, dtype=torch.float32).cumsum(0) - 1


def _level_shape(source: torch.Tensor) -> torch.Tensor:
    """(height, width) of a (batch, channels, height, width) map, as a graph value."""
    return torch._shape_as_tensor(source)[-2:]


def _downsampled_mask(pixel_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The pixel mask at a feature map's size, as `interpolate(mode="nearest")` picks it:
    source index floor(i * in / out), computed in float32 like PyTorch's kernel."""
    in_h, in_w = pixel_mask.shape[-2], pixel_mask.shape[-1]
    out_rows, out_cols = _positions(like[0, 0, :, 0]), _positions(like[0, 0, 0, :])
    scale_h = torch._shape_as_tensor(pixel_mask)[-2].float() / torch._shape_as_tensor(like)[-2].float()
    scale_w = torch._shape_as_tensor(pixel_mask)[-1].float() / torch._shape_as_tensor(like)[-1].float()
    rows = torch.clamp((out_rows * scale_h).floor().long(), max=in_h - 1)
    cols = torch.clamp((out_cols * scale_w).floor().long(), max=in_w - 1)
    return pixel_mask.index_select(1, rows).index_select(2, cols).to(torch.bool)


class TensorShapedDeformableAttention(nn.Module):
    """transformers' `MultiScaleDeformableAttention` (the PyTorch path) taking each level's
    size and start from the `spatial_shapes` and `level_start_index` tensors."""

    def forward(self, value, value_spatial_shapes, value_spatial_shapes_list, level_start_index,
                sampling_locations, attention_weights, im2col_step):
        batch_size, _, num_heads, hidden_dim = value.shape
        _, num_queries, num_heads, num_levels, num_points, _ = sampling_locations.shape
        sampling_grids = 2 * sampling_locations - 1
        sampling_value_list = []
        for level_id in range(num_levels):
            height, width = value_spatial_shapes[level_id, 0], value_spatial_shapes[level_id, 1]
            start = level_start_index[level_id]
            value_l_ = (value[:, start:start + height * width].flatten(2).transpose(1, 2)
                        .reshape(batch_size * num_heads, hidden_dim, height, width))
            sampling_grid_l_ = sampling_grids[:, :, :, level_id].transpose(1, 2).flatten(0, 1)
            sampling_value_list.append(nn.functional.grid_sample(
                value_l_, sampling_grid_l_, mode="bilinear", padding_mode="zeros", align_corners=False))
        attention_weights = attention_weights.transpose(1, 2).reshape(
            batch_size * num_heads, 1, num_queries, num_levels * num_points)
        output = ((torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights)
                  .sum(-1).view(batch_size, num_heads * hidden_dim, num_queries))
        return output.transpose(1, 2).contiguous()


class ExportableDetector(nn.Module):
    """(pixel_values, pixel_mask) -> (logits, pred_boxes) of a DeformableDetrForObjectDetection."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        config = detector.config
        if getattr(config, "position_embedding_type", SUPPORTED_POSITION_EMBEDDING) != SUPPORTED_POSITION_EMBEDDING:
            raise UnsupportedForExport(f"position_embedding_type={config.position_embedding_type!r} (only "
                                       f"{SUPPORTED_POSITION_EMBEDDING!r} exports with a dynamic image size)")
        self.detector = detector

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.detector.model
        config = model.config
        sources, masks = self._feature_levels(pixel_values, pixel_mask)
        positions = [model.position_embedding(shape=source.shape, device=source.device, dtype=pixel_values.dtype,
                                              mask=mask).to(source.dtype) for source, mask in zip(sources, masks)]
        spatial_shapes = torch.stack([_level_shape(source) for source in sources])
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        # The attention reads sizes from the tensors above; this list only feeds transformers'
        # length check, as graph values rather than ints.
        spatial_shapes_list = [(spatial_shapes[level, 0], spatial_shapes[level, 1]) for level in range(len(sources))]
        source_flatten = torch.cat([source.flatten(2).transpose(1, 2) for source in sources], 1)
        mask_flatten = torch.cat([mask.flatten(1) for mask in masks], 1)
        lvl_pos_embed_flatten = torch.cat([pos.flatten(2).transpose(1, 2) + model.level_embed[level].view(1, 1, -1)
                                           for level, pos in enumerate(positions)], 1)
        valid_ratios = torch.stack([model.get_valid_ratio(mask, dtype=source_flatten.dtype) for mask in masks], 1)

        hidden_states = source_flatten
        reference_points = self._encoder_reference_points(sources, valid_ratios)
        for layer in model.encoder.layers:
            hidden_states = layer(hidden_states, mask_flatten, spatial_position_embeddings=lvl_pos_embed_flatten,
                                  reference_points=reference_points, spatial_shapes=spatial_shapes,
                                  spatial_shapes_list=spatial_shapes_list, level_start_index=level_start_index)
        memory = hidden_states

        num_channels = memory.shape[2]
        if config.two_stage:
            object_query, output_proposals = self._encoder_proposals(model, memory, ~mask_flatten, sources, masks)
            enc_outputs_class = model.decoder.class_embed[-1](object_query)
            enc_outputs_coord_logits = model.decoder.bbox_embed[-1](object_query) + output_proposals
            topk_proposals = torch.topk(enc_outputs_class[..., 0], config.two_stage_num_proposals, dim=1)[1]
            topk_coords_logits = torch.gather(enc_outputs_coord_logits, 1,
                                              topk_proposals.unsqueeze(-1).repeat(1, 1, 4))
            reference_points = topk_coords_logits.sigmoid()
            pos_trans_out = model.pos_trans_norm(model.pos_trans(model.get_proposal_pos_embed(topk_coords_logits)))
            query_embed, target = torch.split(pos_trans_out, num_channels, dim=2)
        else:
            query_embed, target = torch.split(model.query_position_embeddings.weight, num_channels, dim=1)
            batch = torch.zeros_like(memory[:, :1, :1])  # (batch, 1, 1): broadcasting follows the batch size
            query_embed = query_embed.unsqueeze(0) + batch
            target = target.unsqueeze(0) + batch
            reference_points = model.reference_points(query_embed).sigmoid()
        init_reference_points = reference_points

        decoded = model.decoder(inputs_embeds=target, object_queries_position_embeddings=query_embed,
                                encoder_hidden_states=memory, encoder_attention_mask=mask_flatten,
                                reference_points=reference_points, spatial_shapes=spatial_shapes,
                                spatial_shapes_list=spatial_shapes_list, level_start_index=level_start_index,
                                valid_ratios=valid_ratios)
        return self._head(decoded, init_reference_points)

    def _feature_levels(self, pixel_values, pixel_mask) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The projected feature maps and their masks: the backbone's levels, then the extra
        stride-2 convolutions (DeformableDetrModel.forward's first steps)."""
        model = self.detector.model
        feature_maps = model.backbone.model(pixel_values)
        if isinstance(feature_maps, dict) or hasattr(feature_maps, "feature_maps"):
            feature_maps = feature_maps.feature_maps
        sources = [model.input_proj[level](feature_map) for level, feature_map in enumerate(feature_maps)]
        masks = [_downsampled_mask(pixel_mask, feature_map) for feature_map in feature_maps]
        for level in range(len(sources), model.config.num_feature_levels):
            source = model.input_proj[level](feature_maps[-1] if level == len(feature_maps) else sources[-1])
            sources.append(source)
            masks.append(_downsampled_mask(pixel_mask, source))
        return sources, masks

    @staticmethod
    def _encoder_reference_points(sources, valid_ratios) -> torch.Tensor:
        """DeformableDetrEncoder.get_reference_points with (height, width) from each map."""
        reference_points_list = []
        for level, source in enumerate(sources):
            rows = _positions(source[0, 0, :, 0]).to(valid_ratios.dtype) + 0.5  # linspace(0.5, h - 0.5, h)
            cols = _positions(source[0, 0, 0, :]).to(valid_ratios.dtype) + 0.5
            height, width = _level_shape(source).to(valid_ratios.dtype).unbind(0)
            ref_y = (rows[:, None] + torch.zeros_like(cols)[None, :]).reshape(-1)[None]
            ref_x = (torch.zeros_like(rows)[:, None] + cols[None, :]).reshape(-1)[None]
            ref_y = ref_y / (valid_ratios[:, None, level, 1] * height)
            ref_x = ref_x / (valid_ratios[:, None, level, 0] * width)
            reference_points_list.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(reference_points_list, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    @staticmethod
    def _encoder_proposals(model, enc_output, padding_mask, sources, masks):
        """DeformableDetrModel.gen_encoder_output_proposals with each level's grid from its map."""
        proposals = []
        for level, (source, mask) in enumerate(zip(sources, masks)):
            valid_height = torch.sum(mask[:, :, 0], 1)
            valid_width = torch.sum(mask[:, 0, :], 1)
            rows = _positions(source[0, 0, :, 0]).to(enc_output.dtype)  # linspace(0, h - 1, h)
            cols = _positions(source[0, 0, 0, :]).to(enc_output.dtype)
            grid_y = rows[:, None] + torch.zeros_like(cols)[None, :]
            grid_x = torch.zeros_like(rows)[:, None] + cols[None, :]
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.stack([valid_width, valid_height], 1)[:, None, None, :]
            grid = (grid.unsqueeze(0) + torch.zeros_like(scale) + 0.5) / scale
            width_height = torch.ones_like(grid) * 0.05 * (2.0**level)
            proposals.append(torch.cat((grid, width_height), -1).flatten(1, 2))
        output_proposals = torch.cat(proposals, 1)
        output_proposals_valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        output_proposals = output_proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
        output_proposals = output_proposals.masked_fill(~output_proposals_valid, float("inf"))
        object_query = enc_output.masked_fill(padding_mask.unsqueeze(-1), float(0))
        object_query = object_query.masked_fill(~output_proposals_valid, float(0))
        return model.enc_output_norm(model.enc_output(object_query)), output_proposals

    def _head(self, decoded, init_reference_points) -> tuple[torch.Tensor, torch.Tensor]:
        """The last decoder layer's class logits and boxes (DeformableDetrForObjectDetection's head)."""
        from transformers.models.deformable_detr.modeling_deformable_detr import inverse_sigmoid

        detector = self.detector
        hidden_states = decoded.intermediate_hidden_states
        last = len(detector.model.decoder.layers) - 1
        reference = init_reference_points if last == 0 else decoded.intermediate_reference_points[:, last - 1]
        reference = inverse_sigmoid(reference)
        logits = detector.class_embed[last](hidden_states[:, last])
        delta_bbox = detector.bbox_embed[last](hidden_states[:, last])
        if reference.shape[-1] == 4:
            coord_logits = delta_bbox + reference
        else:
            coord_logits = torch.cat([delta_bbox[..., :2] + reference, delta_bbox[..., 2:]], -1)
        return logits, coord_logits.sigmoid()
