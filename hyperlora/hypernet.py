"""The hypernetwork: ID projector, resamplers and basis banks -> per-layer LoRA matrices.

For each target linear l and each branch (id, base), with unit-norm coefficients c_d, c_u in R^K
(facts §1.4):
    lora_down A_l = (sum_k c_d[k] * D_l[k])^T   in R^{r x in},   D_l: [K, in, r]
    lora_up   B_l = (sum_k c_u[k] * U_l[k])^T   in R^{out x r},  U_l: [K, r, out]
and the applied update is dW = scale * (alpha / r) * B_l @ A_l with alpha = r / 2.

Token layout: the resampler's queries are split into consecutive groups of 8 per target module
(in module order); each group is (q, k, v, out) pairs, and each pair is (down, up).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TOKENS_PER_MODULE, HyperLoRAConfig
from .lora import LoRAWeights
from .resampler import Resampler
from .targets import LAYER_KEYS, TargetModule

BRANCHES = ("id", "base")


def _like(features: torch.Tensor | None, parameter: torch.Tensor) -> torch.Tensor | None:
    """Features cast to a part's dtype and device at the boundary (float32 CLIP tokens into an fp16 checkpoint)."""
    return None if features is None else features.to(parameter.device, parameter.dtype)


class Reshape(nn.Module):
    """[N, num_tokens * dim] -> [N, num_tokens, dim] (step 1 of the ID projector, no parameters)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def id_projector(config: HyperLoRAConfig) -> nn.Sequential:
    """ArcFace embedding [N, 512] -> ID tokens [N, 16, dim]; keys 0.* and 2.* as in the release."""
    return nn.Sequential(
        nn.Linear(config.id_embed_dim, config.dim * config.num_id_tokens),
        Reshape(config.num_id_tokens, config.dim),
        nn.LayerNorm(config.dim),
    )


class HyperLoRALayer(nn.Module):
    """The basis banks of one linear layer: id_{down,up}_basis and, optionally, base_{down,up}_basis."""

    def __init__(self, *, hyper_dim: int, in_features: int, out_features: int, rank: int, base_rank: int | None):
        super().__init__()
        self.id_down_basis = nn.Parameter(torch.empty(hyper_dim, in_features, rank))
        self.id_up_basis = nn.Parameter(torch.empty(hyper_dim, rank, out_features))
        if base_rank:
            self.base_down_basis = nn.Parameter(torch.empty(hyper_dim, in_features, base_rank))
            self.base_up_basis = nn.Parameter(torch.empty(hyper_dim, base_rank, out_features))

    def reset_parameters(self, init_std: float) -> None:
        """Down bases random, up bases zero: a fresh hypernetwork generates a zero update (LoRA init)."""
        for name, param in self.named_parameters():
            if "down" in name:
                nn.init.normal_(param, std=init_std / param.shape[1] ** 0.5)
            else:
                nn.init.zeros_(param)

    def assemble(self, c_down: torch.Tensor, c_up: torch.Tensor, branch: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients [B, K] -> (down [B, r, in], up [B, out, r])."""
        down_basis = getattr(self, f"{branch}_down_basis")
        up_basis = getattr(self, f"{branch}_up_basis")
        down = torch.einsum("bk,kir->bri", c_down.to(down_basis.dtype), down_basis)
        up = torch.einsum("bk,kro->bor", c_up.to(up_basis.dtype), up_basis)
        return down, up


class HyperLoRAModule(nn.Module):
    """Four HyperLoRALayers for one attention module: to_q, to_k, to_v, to_out."""

    def __init__(self, target: TargetModule, config: HyperLoRAConfig):
        super().__init__()
        base_rank = config.base_rank if config.has_base_lora else None
        for key in LAYER_KEYS:
            layer = HyperLoRALayer(
                hyper_dim=config.hyper_dim,
                in_features=target.in_features(key),
                out_features=target.out_features(key),
                rank=config.rank,
                base_rank=base_rank,
            )
            self.add_module(key, layer)


class HyperLoRA(nn.Module):
    """Face features -> coefficients -> LoRA weights for every target module of one UNet."""

    def __init__(self, config: HyperLoRAConfig, targets: list[TargetModule]):
        super().__init__()
        if not targets:
            raise ValueError("HyperLoRA needs at least one target module")
        self.config = config
        self.targets = list(targets)
        num_queries = TOKENS_PER_MODULE * len(self.targets)
        resampler_kwargs = dict(
            dim=config.dim, num_queries=num_queries, output_dim=config.hyper_dim, depth=config.depth,
            heads=config.heads, dim_head=config.dim_head, ff_mult=config.ff_mult,
        )  # fmt: skip
        if "arcface" in config.encoder_types:
            self.id_projector = id_projector(config)
        self.resampler = Resampler(n_conds=config.n_conds, **resampler_kwargs)
        self.lora_modules = nn.ModuleList(HyperLoRAModule(t, config) for t in self.targets)
        if config.has_base_lora:
            self.base_resampler = Resampler(n_conds=1, **resampler_kwargs)
        self.reset_basis()

    def reset_basis(self) -> None:
        for layer in self.lora_modules.modules():
            if isinstance(layer, HyperLoRALayer):
                layer.reset_parameters(self.config.init_std)

    @torch.no_grad()
    def randomize_up_bases(self, std: float = 0.5, seed: int = 0) -> "HyperLoRA":
        """Random up bases, so an untrained model's LoRAs are non-zero: for demos and tests only."""
        generator = torch.Generator().manual_seed(seed)
        for name, param in self.lora_modules.named_parameters():
            if "up_basis" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
        return self

    # --- coefficients -------------------------------------------------------------------------

    def id_coefficients(
        self, *, arcface: torch.Tensor | None = None, clip: torch.Tensor | None = None, num_refs: int = 1
    ) -> torch.Tensor:
        """ArcFace embeddings [N, id_embed_dim] and/or CLIP tokens [N, T, dim] -> [N / num_refs, Q, K].

        Which inputs are used follows `config.encoder_types`; an input the config has is optional
        (stage 2 trains from CLIP alone), an input it lacks is an error.
        """
        types = self.config.encoder_types
        if arcface is not None and "arcface" not in types:
            raise ValueError(f"arcface embedding given but encoder_types={types}")
        if clip is not None and "clip" not in types:
            raise ValueError(f"CLIP features given but encoder_types={types}")
        id_tokens = None
        if arcface is not None:
            if arcface.ndim == 3:  # the release passes [N, 1, 512]
                arcface = arcface.squeeze(1)
            id_tokens = self.id_projector(_like(arcface, self.id_projector[0].weight))
        clip = _like(clip, self.resampler.latents)
        id_tokens = _like(id_tokens, self.resampler.latents)
        if self.config.n_conds == 2:
            return self.resampler(x=id_tokens, y=clip, num_refs=num_refs)
        return self.resampler(x=id_tokens if id_tokens is not None else clip, num_refs=num_refs)

    def base_coefficients(self, clip_blurred: torch.Tensor, *, num_refs: int = 1) -> torch.Tensor:
        """CLIP tokens of the face-blurred image [N, T, dim] -> Base coefficients [N / num_refs, Q, K]."""
        if not self.config.has_base_lora:
            raise ValueError("this HyperLoRA has no Base-LoRA branch (config.has_base_lora is False)")
        return self.base_resampler(x=_like(clip_blurred, self.base_resampler.latents), num_refs=num_refs)

    # --- assembly -----------------------------------------------------------------------------

    def assemble(self, coefficients: torch.Tensor, branch: str = "id") -> LoRAWeights:
        """Coefficients [B, Q, K] -> LoRA weights of `branch` for every target linear (batch kept)."""
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
        if branch == "base" and not self.config.has_base_lora:
            raise ValueError("this HyperLoRA has no Base-LoRA branch (config.has_base_lora is False)")
        expected = (TOKENS_PER_MODULE * len(self.targets), self.config.hyper_dim)
        if coefficients.ndim != 3 or tuple(coefficients.shape[1:]) != expected:
            raise ValueError(f"coefficients must be [B, {expected[0]}, {expected[1]}], got {tuple(coefficients.shape)}")
        rank = self.config.rank if branch == "id" else self.config.base_rank
        per_module = coefficients.chunk(len(self.targets), dim=1)  # each [B, 8, K]
        layers = {}
        for target, module, tokens in zip(self.targets, self.lora_modules, per_module):
            for key, pair in zip(LAYER_KEYS, tokens.chunk(len(LAYER_KEYS), dim=1)):  # pair [B, 2, K]
                layers[target.linear_path(key)] = getattr(module, key).assemble(pair[:, 0], pair[:, 1], branch)
        return LoRAWeights(layers=layers, rank=rank, alpha=HyperLoRAConfig.alpha(rank))

    def coefficients(
        self,
        *,
        arcface: torch.Tensor | None = None,
        clip: torch.Tensor | None = None,
        clip_blurred: torch.Tensor | None = None,
        num_refs: int = 1,
    ) -> dict[str, torch.Tensor]:
        """Features of the reference images -> {"id": [B, Q, K], "base": [B, Q, K] (if given)}, unit-norm tokens."""
        out = {"id": self.id_coefficients(arcface=arcface, clip=clip, num_refs=num_refs)}
        if clip_blurred is not None:
            out["base"] = self.base_coefficients(clip_blurred, num_refs=num_refs)
        return out

    def generate(
        self,
        *,
        arcface: torch.Tensor | None = None,
        clip: torch.Tensor | None = None,
        clip_blurred: torch.Tensor | None = None,
        num_refs: int = 1,
    ) -> dict[str, LoRAWeights]:
        """Features of the reference images -> {"id": LoRAWeights, "base": LoRAWeights (if given)}."""
        coefficients = self.coefficients(arcface=arcface, clip=clip, clip_blurred=clip_blurred, num_refs=num_refs)
        return {branch: self.assemble(c, branch) for branch, c in coefficients.items()}

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts of the parts, named as the official files are."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        counts = {
            "hyper_lora_modules": count(self.lora_modules),
            "resampler": count(self.resampler),
            "id_projector": count(self.id_projector) if hasattr(self, "id_projector") else 0,
        }
        if self.config.has_base_lora:
            counts["base_resampler"] = count(self.base_resampler)
        return counts
