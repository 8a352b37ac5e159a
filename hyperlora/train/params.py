"""Which hypernetwork parameters a stage owns: named groups, selected by parameter name.

    base            base_resampler.* and the base_{down,up}_basis banks (stage 1)
    id_basis        the id_{down,up}_basis banks
    resampler_core  the ID resampler's queries, self-attention, feed-forward and proj_out
    clip_path       proj_in_2, the CLIP cross-attention attn3 and its norms (the second condition `y`)
    arcface_path    the ID projector, proj_in, the ArcFace cross-attention attn2 and its norms (`x`)

A stage trains only its groups; every other parameter has requires_grad False and is not given to
the optimiser, so weight decay cannot move it either (tested).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..hypernet import HyperLoRA

_ARCFACE = re.compile(r"^(id_projector\.|resampler\.proj_in\.|resampler\.layers\.\d+\.(attn2|norm_attn2_[lx])\.)")
_CLIP = re.compile(r"^resampler\.(proj_in_2\.|layers\.\d+\.(attn3|norm_attn3_[ly])\.)")


def group_of(name: str) -> str:
    """The group of one parameter name of a HyperLoRA."""
    if name.startswith("base_resampler.") or ".base_down_basis" in name or ".base_up_basis" in name:
        return "base"
    if ".id_down_basis" in name or ".id_up_basis" in name:
        return "id_basis"
    if _ARCFACE.match(name):
        return "arcface_path"
    if _CLIP.match(name):
        return "clip_path"
    if name.startswith("resampler."):
        return "resampler_core"
    raise ValueError(f"parameter {name!r} belongs to no group")


def select_trainable(model: HyperLoRA, groups: tuple[str, ...]) -> list[nn.Parameter]:
    """Freeze every parameter outside `groups`; return those inside, in model order. Raises if none."""
    trainable = []
    for name, param in model.named_parameters():
        train = group_of(name) in groups
        param.requires_grad_(train)
        if train:
            trainable.append(param)
    if not trainable:
        raise ValueError(f"no parameter of this HyperLoRA is in groups {groups} (has_base_lora={model.config.has_base_lora})")
    return trainable


def optimizer_groups(model: HyperLoRA, params: list[nn.Parameter], lr: float, basis_lr_scale: float = 1.0) -> list[dict]:
    """AdamW parameter groups: one at `lr`, or, when `basis_lr_scale` != 1, the basis banks (id and base) at
    lr x basis_lr_scale beside the rest at lr. An LR schedule scales every group alike."""
    if basis_lr_scale == 1.0:
        return [{"params": params, "lr": lr}]
    bases = {id(p) for name, p in model.named_parameters() if name.endswith("_basis")}
    basis = [p for p in params if id(p) in bases]
    rest = [p for p in params if id(p) not in bases]
    groups = [{"params": rest, "lr": lr}, {"params": basis, "lr": lr * basis_lr_scale}]
    return [group for group in groups if group["params"]]


@torch.no_grad()
def zero_new_paths(model: HyperLoRA) -> None:
    """Zero the output projection of the ArcFace cross-attention (attn2) in every resampler block.

    Stage 2 never feeds ArcFace tokens; zeroed, attn2 adds nothing when stage 3 first feeds them, so
    stage 3 starts from exactly the model stage 2 left (a new pathway starts as the identity) and
    learns to open it. The release's layout is kept: this is an initial value, not a new module.
    """
    for layer in model.resampler.layers:
        layer.attn2.to_out[0].weight.zero_()
