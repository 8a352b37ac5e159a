"""CLIP image features as the release uses them: `hidden_states[-2]` of the vision tower (facts §2.1).

The sdxl world loads `openai/clip-vit-large-patch14` (ViT-L/14: [N, 257, 1024]) from a local folder;
the toy world loads the toy CLIP the project trains. Both are a transformers
`CLIPVisionModelWithProjection` with its `CLIPImageProcessor`, so one class serves both.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
from transformers.utils import logging as transformers_logging

from .faces import ModelFilesMissingError

REQUIRED_FILES = ("config.json", "preprocessor_config.json")
HOW_TO_GET = {
    "sdxl": "download openai/clip-vit-large-patch14 (model.safetensors, config.json, preprocessor_config.json) "
    "into a folder and pass its path",
    "toy": "run `python -m hyperlora.toy build --only clip`",
}


@contextlib.contextmanager
def quiet_transformers():
    """Within: no transformers load report (unused-key tables) and no 'Loading weights' bar; errors still raise."""
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


class ClipImageEncoder:
    """Images -> penultimate-layer CLIP tokens [N, tokens, hidden], with the model's own preprocessing."""

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, world: str = "sdxl"):
        path = Path(path)
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        if not list(path.glob("*.safetensors")):
            missing.append("*.safetensors (the weights; .bin files are not unpickled)")
        if missing:
            raise ModelFilesMissingError(
                f"CLIP image encoder: missing {missing} in {path.resolve()}; to get them: {HOW_TO_GET.get(world, HOW_TO_GET['sdxl'])}"
            )
        self.path = path
        self.processor = CLIPImageProcessor.from_pretrained(path)
        with quiet_transformers():  # a full CLIPModel folder's text-tower keys are expected extras, not news
            self.model, info = CLIPVisionModelWithProjection.from_pretrained(
                path, use_safetensors=True, dtype=dtype, output_loading_info=True
            )
        if info.get("missing_keys"):
            raise ModelFilesMissingError(f"CLIP image encoder at {path}: weights missing for {sorted(info['missing_keys'])[:5]} ...")
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """The CLIP processor's resize, centre crop and normalisation (grayscale crops become RGB)."""
        images = [image.convert("RGB") for image in images]
        return self.processor(images=images, return_tensors="pt").pixel_values

    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Already-processed pixels -> hidden_states[-2] (differentiable if the model is trainable)."""
        out = self.model(pixel_values=pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states[-2]

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        if not images:
            raise ValueError("no images to encode")
        return self.encode_pixels(self.pixel_values(images))
