"""Tuning one person's ID coefficients over the hypernetwork's frozen basis banks: what the bases can express.

A HyperLoRA's ID-LoRA is sum_k c_k * M_k with unit-norm coefficient tokens predicted by the resampler. Fitting
those tokens directly to one person's references (the diffusion loss, the basis banks and the UNet frozen)
gives the best ID-LoRA the trained bases can make for that person: if it carries the person and the generated
one does not, the resampler's mapping is the link that limits; if it does not either, the bases are (and a
free LoRA of the same rank, `LoRAFinetuner` from zero, says what any rank-r LoRA could do).

    tuner = CoefficientFinetuner(unet, noise_scheduler(pipe), batch, hyperlora, id_coefficients(hyperlora, features),
                                 config)
    tuner.train(200)
    tuner.lora  # LoRAWeights, as LoRAFinetuner's

The tokens stay on the unit sphere (the raw tensor trains, `F.normalize` of it is used), as the resampler's
output is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .finetune import FinetuneConfig, LoRAFinetuner, frozen
from .lora import LoRAWeights


@torch.no_grad()
def id_coefficients(hyperlora, features) -> torch.Tensor:
    """The ID coefficient tokens [1, Q, K] a HyperLoRA predicts from one person's `ReferenceFeatures`."""
    return hyperlora.coefficients(**features.generate_kwargs() | {"clip_blurred": None})["id"]


class CoefficientFinetuner(LoRAFinetuner):
    """AdamW on one identity's ID coefficient tokens [1, Q, K] (float32) under frozen bases and a frozen UNet."""

    def __init__(self, unet, noise_scheduler, batch: dict, hyperlora, coefficients: torch.Tensor,
                 config: FinetuneConfig, *, fixed: Sequence[tuple[LoRAWeights, float]] = (),
                 branch: str = "id"):  # fmt: skip
        if coefficients.ndim != 3 or coefficients.shape[0] != 1:
            raise ValueError(f"coefficients must be one identity's [1, Q, K], got {tuple(coefficients.shape)}")
        self.hyperlora, self.branch = hyperlora, branch
        self.coefficients = coefficients.detach().to(unet.device, torch.float32).clone()
        with torch.no_grad():
            start = hyperlora.assemble(self.coefficients, branch)  # checks the shape against the model
        super().__init__(unet, noise_scheduler, batch, start, config, fixed=fixed)

    def start_trainable(self, start: LoRAWeights, device: torch.device) -> None:
        self.coefficients.requires_grad_()

    def parameters(self) -> list[torch.Tensor]:
        return [self.coefficients]

    def current(self) -> LoRAWeights:
        tokens = F.normalize(self.coefficients, dim=-1)
        lora = self.hyperlora.assemble(tokens, self.branch)
        return LoRAWeights({p: (d.float(), u.float()) for p, (d, u) in lora.layers.items()}, lora.rank, lora.alpha)

    @property
    def unit_coefficients(self) -> torch.Tensor:
        """The current tokens, unit-norm, detached: [1, Q, K]."""
        return F.normalize(self.coefficients.detach(), dim=-1)

    def train(self, steps: int, *, progress: bool = True) -> list[float]:
        with frozen(self.hyperlora):  # the bases give gradients to the tokens, never take a step
            return super().train(steps, progress=progress)
