"""Generated LoRA weights and the ways to apply them to a UNet.

1. `functional_lora` (training and runtime): forward hooks add a per-sample update
   scale[b] * (alpha / r) * B[b] @ A[b] @ x to each target linear; gradients flow into the
   hypernetwork, the UNet stays frozen and unmodified.
2. `to_peft_state_dict` + diffusers: `pipe.load_lora_weights(...)` / `unet.load_lora_adapter(...)`,
   `set_adapters` for separate ID and Base weights, `fuse_lora` for zero per-step overhead.
3. Files: see `export.py` (kohya, as the official Save-LoRA node writes it, and diffusers/PEFT).

Keys of `LoRAWeights.layers` are the diffusers paths of the adapted nn.Linear modules, e.g.
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LoRAWeights:
    """One generated LoRA: per target linear, down [B, r, in] and up [B, out, r]."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        """alpha / rank: 0.5 under the release's convention."""
        return self.alpha / self.rank

    @property
    def batch_size(self) -> int:
        return next(iter(self.layers.values()))[0].shape[0]

    def select(self, index: int) -> "LoRAWeights":
        """The LoRA of one sample, batch dimension kept (size 1)."""
        layers = {k: (d[index : index + 1], u[index : index + 1]) for k, (d, u) in self.layers.items()}
        return LoRAWeights(layers, self.rank, self.alpha)

    def detach(self) -> "LoRAWeights":
        layers = {k: (d.detach(), u.detach()) for k, (d, u) in self.layers.items()}
        return LoRAWeights(layers, self.rank, self.alpha)

    def to(self, *args, **kwargs) -> "LoRAWeights":
        layers = {k: (d.to(*args, **kwargs), u.to(*args, **kwargs)) for k, (d, u) in self.layers.items()}
        return LoRAWeights(layers, self.rank, self.alpha)

    def delta(self, path: str, index: int = 0) -> torch.Tensor:
        """The weight update (alpha / r) * B @ A of one linear for one sample, [out, in]."""
        down, up = self.layers[path]
        return self.scale * up[index] @ down[index]

    def parameter_count(self) -> int:
        return sum(d[0].numel() + u[0].numel() for d, u in self.layers.values())


def _per_sample(scale, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A float or a per-sample tensor [B] -> a tensor [batch, 1, 1] to multiply lora_up with."""
    scale = torch.as_tensor(scale, dtype=like.dtype, device=like.device)
    if scale.ndim == 0:
        return scale.expand(batch).view(batch, 1, 1)
    if scale.shape != (batch,):
        raise ValueError(f"per-sample scales must have shape ({batch},), got {tuple(scale.shape)}")
    return scale.view(batch, 1, 1)


def _stack_branches(branches: list[tuple[torch.Tensor, torch.Tensor, float, object]]):
    """Fold each branch's alpha / r and user scale into lora_up and concatenate the ranks.

    sum_i s_i c_i B_i A_i x = [s_1 c_1 B_1 | s_2 c_2 B_2] [A_1; A_2] x, so one pair of matmuls
    per layer serves every branch. Returns down [N, r_total, in] and up [N, out, r_total].
    """
    batch = max(max(d.shape[0] for d, _, _, _ in branches), max(torch.as_tensor(s).numel() for *_, s in branches))
    downs, ups = [], []
    for down, up, lora_scale, user_scale in branches:
        n = batch if torch.as_tensor(user_scale).ndim or down.shape[0] != 1 else 1
        scale = _per_sample(user_scale, n, up) * lora_scale
        downs.append(down.expand(n, -1, -1) if down.shape[0] != n else down)
        ups.append((up.expand(n, -1, -1) if up.shape[0] != n else up) * scale)
    n = max(d.shape[0] for d in downs)
    downs = [d.expand(n, -1, -1) if d.shape[0] != n else d for d in downs]
    ups = [u.expand(n, -1, -1) if u.shape[0] != n else u for u in ups]
    return torch.cat(downs, dim=1), torch.cat(ups, dim=2)


def _match_batch(t: torch.Tensor, batch: int, path: str) -> torch.Tensor:
    """A LoRA batch that divides the activations' batch (CFG: [uncond; cond]) is tiled."""
    n = t.shape[0]
    if n == batch:
        return t
    if batch % n:
        raise ValueError(f"{path}: LoRA batch {n} does not divide the UNet batch {batch}")
    return t.repeat(batch // n, *([1] * (t.ndim - 1)))


class _LoRAHook:
    """Forward hook of one nn.Linear: output + (x A^T) B^T with every branch folded in."""

    def __init__(self, path: str, down: torch.Tensor, up: torch.Tensor):
        self.path = path
        self.down, self.up = down, up  # [N, r, in], [N, out, r]; N = 1 shares one LoRA over the batch
        self.shared = (down[0].t(), up[0].t()) if down.shape[0] == 1 else None

    def __call__(self, module: nn.Linear, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if self.shared is not None:
            down_t, up_t = self.shared
            return output + (x @ down_t.to(x.dtype)) @ up_t.to(x.dtype)
        if x.ndim != 3:
            raise ValueError(f"{self.path}: expected activations [B, tokens, features], got {tuple(x.shape)}")
        down = _match_batch(self.down, x.shape[0], self.path).to(x.dtype)
        up = _match_batch(self.up, x.shape[0], self.path).to(x.dtype)
        return output + (x @ down.transpose(1, 2)) @ up.transpose(1, 2)  # [B, T, r] -> [B, T, out]


@contextlib.contextmanager
def functional_lora(
    unet: nn.Module, loras: Sequence[LoRAWeights], scales: Sequence[float | torch.Tensor]
) -> Iterator[None]:
    """Apply generated LoRAs to `unet` for the duration of the block, without touching its weights.

    `scales[i]` is a float or a per-sample tensor [B]; a sample whose scale is 0 gets no update
    from that LoRA, so each branch can be switched on or off sample by sample. A LoRA of batch 1
    is shared by every sample; a LoRA batch that divides the UNet batch is tiled (CFG halves).
    """
    if len(loras) != len(scales):
        raise ValueError(f"{len(loras)} LoRAs but {len(scales)} scales")
    modules = dict(unet.named_modules())
    per_layer: dict[str, list] = {}
    for lora, scale in zip(loras, scales):
        for path, (down, up) in lora.layers.items():
            linear = modules.get(path)
            if not isinstance(linear, nn.Linear):
                raise KeyError(f"LoRA layer {path!r} is not an nn.Linear of this UNet")
            expected = (linear.in_features, linear.out_features)
            if (down.shape[-1], up.shape[-2]) != expected:
                raise ValueError(
                    f"{path}: LoRA maps {down.shape[-1]} -> {up.shape[-2]}, the UNet layer {expected[0]} -> {expected[1]}"
                )
            per_layer.setdefault(path, []).append((down, up, lora.scale, scale))
    hooks = {path: _LoRAHook(path, *_stack_branches(branches)) for path, branches in per_layer.items()}
    handles = [modules[path].register_forward_hook(hook) for path, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class InPlaceFusion:
    """Generated LoRAs added straight into a UNet's weights: the base model's cost per step, and undoable.

    The first fuse keeps a CPU copy of every weight it touches (pinned when the UNet is on a GPU), and later
    fuses reuse it: `restore` copies the base weights back, so switching identities never accumulates
    rounding (unlike subtracting a delta from fp16 weights) and costs one host-to-device copy, not a
    device-to-host one each time. This is the fast path for personalisation: no PEFT modules are created.
    The copies assume the base weights change only through this object; `forget` drops them (after
    loading other base weights into the UNet, say).
    """

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.modules = dict(unet.named_modules())
        self.backup: dict[str, torch.Tensor] = {}  # path -> the base weight, on the CPU
        self.fused: set[str] = set()  # paths whose weight holds a LoRA now

    @torch.no_grad()
    def fuse(self, loras: Sequence[LoRAWeights], scales: Sequence[float], index: int = 0) -> None:
        """W <- W_base + sum_i scales[i] * (alpha_i / r_i) * B_i A_i, for one sample's LoRAs."""
        self.restore()
        deltas: dict[str, torch.Tensor] = {}
        for lora, scale in zip(loras, scales):
            for path in lora.layers:
                delta = float(scale) * lora.delta(path, index).float()
                deltas[path] = deltas[path] + delta if path in deltas else delta
        for path, delta in deltas.items():
            linear = self.modules.get(path)
            if not isinstance(linear, nn.Linear) or linear.weight.shape != delta.shape:
                raise ValueError(f"{path}: not a Linear of this UNet with weight shape {tuple(delta.shape)}")
            if path not in self.backup:
                copy = linear.weight.detach().to("cpu", copy=True)
                self.backup[path] = copy.pin_memory() if linear.weight.is_cuda else copy
            self.fused.add(path)
            linear.weight.copy_((linear.weight.float() + delta.to(linear.weight.device)).to(linear.weight.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        """Back to the base weights, exactly."""
        for path in self.fused:
            self.modules[path].weight.copy_(self.backup[path], non_blocking=True)
        self.fused.clear()

    def forget(self) -> None:
        """Restore, then drop the copies of the base weights (the next fuse copies them again)."""
        self.restore()
        self.backup.clear()


# --- diffusers / PEFT ------------------------------------------------------------------------


def to_peft_state_dict(lora: LoRAWeights, index: int = 0, prefix: str = "unet.", dtype=None) -> dict[str, torch.Tensor]:
    """One sample's LoRA as a diffusers/PEFT state dict: `{prefix}{path}.lora_A.weight` / `.lora_B.weight`.

    PEFT's default lora_alpha equals the rank, so the release's alpha / r = 0.5 is folded into
    lora_B; the update is exactly the same.
    """
    state = {}
    for path, (down, up) in lora.layers.items():
        state[f"{prefix}{path}.lora_A.weight"] = down[index].detach().contiguous().to(dtype or down.dtype)
        state[f"{prefix}{path}.lora_B.weight"] = (up[index].detach() * lora.scale).contiguous().to(dtype or up.dtype)
    return state


def load_into_diffusers(
    pipe_or_unet,
    loras: dict[str, LoRAWeights],
    scales: dict[str, float],
    *,
    fuse: bool = False,
    index: int = 0,
) -> list[str]:
    """Load generated LoRAs as named diffusers adapters, set their weights, optionally fuse them.

    `pipe_or_unet` is a diffusers pipeline (uses `load_lora_weights`) or a UNet2DConditionModel
    (uses `load_lora_adapter`). Returns the adapter names. Existing adapters of the same names are
    replaced, so this can be called again with the LoRAs of another identity.
    """
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    names = [f"hyperlora_{branch}" for branch in loras]
    present = set(getattr(unet, "peft_config", {}) or {})
    stale = [n for n in names if n in present]
    if stale:
        pipe_or_unet.delete_adapters(stale)
    for branch, name in zip(loras, names):
        if hasattr(pipe_or_unet, "load_lora_weights"):
            pipe_or_unet.load_lora_weights(to_peft_state_dict(loras[branch], index), adapter_name=name)
        else:
            unet.load_lora_adapter(to_peft_state_dict(loras[branch], index), prefix="unet", adapter_name=name)
    weights = [float(scales[branch]) for branch in loras]
    pipe_or_unet.set_adapters(names, weights)
    if fuse:
        if hasattr(pipe_or_unet, "fuse_lora"):
            kwargs = {"components": ["unet"]} if hasattr(pipe_or_unet, "load_lora_weights") else {}
            pipe_or_unet.fuse_lora(adapter_names=names, **kwargs)
    return names
