"""The Perceiver Resampler that predicts LoRA-basis coefficients (facts §1.3).

Latent queries (8 per target module) attend to themselves, then to the ID tokens `x`, then to
the CLIP tokens `y`, then pass a feed-forward; every sub-step is pre-LN with a residual. Keys
and values come only from the context (unlike IP-Adapter's resampler), and `x`, `y` are never
updated. The per-image outputs are averaged over the reference images, then every coefficient
vector is L2-normalised. Module names match the official `resampler.safetensors` keys.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from einops import rearrange
from torch import nn


def _attention(dim: int, heads: int, dim_head: int) -> Attention:
    return Attention(query_dim=dim, cross_attention_dim=dim, heads=heads, dim_head=dim_head, out_bias=False)


class PerceiverAttentionBlock(nn.Module):
    """Self-attention, cross-attention to x, optional cross-attention to y, feed-forward."""

    def __init__(self, *, dim: int, heads: int, dim_head: int, ff_mult: int, n_conds: int):
        super().__init__()
        self.norm_attn1 = nn.LayerNorm(dim)
        self.attn1 = _attention(dim, heads, dim_head)
        self.norm_attn2_l = nn.LayerNorm(dim)
        self.norm_attn2_x = nn.LayerNorm(dim)
        self.attn2 = _attention(dim, heads, dim_head)
        if n_conds == 2:
            self.norm_attn3_l = nn.LayerNorm(dim)
            self.norm_attn3_y = nn.LayerNorm(dim)
            self.attn3 = _attention(dim, heads, dim_head)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=ff_mult, activation_fn="gelu")

    def forward(self, latents: torch.Tensor, x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
        latents = latents + self.attn1(self.norm_attn1(latents))
        if x is not None:
            latents = latents + self.attn2(self.norm_attn2_l(latents), encoder_hidden_states=self.norm_attn2_x(x))
        if y is not None:
            latents = latents + self.attn3(self.norm_attn3_l(latents), encoder_hidden_states=self.norm_attn3_y(y))
        return latents + self.ff(self.norm_ff(latents))


def normalize_coefficients(coefficients: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`norm_out` of the release: every K-dim coefficient vector scaled to unit L2 norm."""
    return coefficients * torch.rsqrt(coefficients.pow(2).sum(-1, keepdim=True) + eps)


class Resampler(nn.Module):
    """Perceiver Resampler: contexts -> [batch, num_queries, output_dim] unit-norm coefficients.

    With n_conds == 2, `x` enters through `proj_in` and `y` through `proj_in_2` (the release feeds
    ArcFace tokens as x and CLIP tokens as y). With n_conds == 1 the single context is `x`. Either
    context may be left out (None): its cross-attention is skipped, which is the identity on the
    residual stream; training stage 2 uses this to run the full model on CLIP features alone.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_queries: int,
        output_dim: int,
        depth: int = 4,
        heads: int = 12,
        dim_head: int = 64,
        ff_mult: int = 4,
        n_conds: int = 2,
    ):
        super().__init__()
        if n_conds not in (1, 2):
            raise ValueError(f"n_conds must be 1 or 2, got {n_conds}")
        self.n_conds = n_conds
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(dim, dim)
        if n_conds == 2:
            self.proj_in_2 = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(
            PerceiverAttentionBlock(dim=dim, heads=heads, dim_head=dim_head, ff_mult=ff_mult, n_conds=n_conds)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, output_dim)

    @property
    def num_queries(self) -> int:
        return self.latents.shape[1]

    def forward(
        self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, *, num_refs: int = 1
    ) -> torch.Tensor:
        """x, y: [batch * num_refs, tokens, dim], grouped sample by sample (refs of a sample adjacent).

        Returns [batch, num_queries, output_dim]: the mean over each sample's references, then
        normalised (the release averages the whole batch, i.e. batch = 1, num_refs = N).
        """
        if x is None and y is None:
            raise ValueError("the resampler needs at least one context (x or y)")
        if y is not None and self.n_conds == 1:
            raise ValueError("this resampler has one condition: pass it as x")
        contexts = [c for c in (x, y) if c is not None]
        if len({c.shape[0] for c in contexts}) != 1:
            raise ValueError(f"x and y batch sizes differ: {[tuple(c.shape) for c in contexts]}")
        n = contexts[0].shape[0]
        if n % num_refs:
            raise ValueError(f"batch of {n} contexts is not a multiple of num_refs={num_refs}")
        x = self.proj_in(x) if x is not None else None
        y = self.proj_in_2(y) if y is not None else None
        latents = self.latents.expand(n, -1, -1)
        for layer in self.layers:
            latents = layer(latents, x, y)
        out = self.proj_out(latents)
        out = rearrange(out, "(b n) q k -> b n q k", n=num_refs).mean(dim=1)  # mean over references
        return normalize_coefficients(out)
