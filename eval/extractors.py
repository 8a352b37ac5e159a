"""Feature extractors for evaluation: one interface, three implementations.

`FeatureExtractor` is what metrics.py consumes: `extractor(images) -> features` and a `name` that
tables print beside the numbers.

- `ClipExtractor(model_path)`: a transformers CLIPModel read from a local folder (the toy CLIP, or
  ViT-L/14 for SDXL); L2-normalised image embeds from `__call__`, text embeds from `embed_text`.
- `FaceEmbeddingExtractor(analyzer)`: identity embeddings from a `FaceAnalyzer` backend; None for
  an image where no face was detected (metrics.id_similarity scores it 0 and counts the failure).
- `LPIPSModel(net)`: LPIPS (Zhang et al. 2018). With torchvision's ImageNet trunk weights in the
  torch hub cache it is the real metric; without them (our machines cannot download) the trunk is
  random, `real` is False, a `RandomTrunkWarning` is raised and every LPIPS result carries the flag,
  so a table can mark the column as a plumbing check. Nothing here ever downloads.

Images cross this boundary as a list of PIL images, a uint8 array [N, H, W, 3] (toy renders), a
list of uint8 [H, W, 3] arrays, or a float tensor [N, 3, H, W] in [0, 1]; anything else is refused.
"""

from __future__ import annotations

import abc
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hyperlora.conditioning.faces import FaceAnalyzer, choose_face

# ---------------------------------------------------------------------------------------------
# Images at the boundary


def rgb_list(images) -> list[np.ndarray]:
    """Any accepted image batch -> list of uint8 [H, W, 3] arrays (sizes may differ)."""
    if isinstance(images, torch.Tensor):
        array = (_checked_tensor(images).cpu().permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
        return list(array)
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"an array batch must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
        images = list(images)
    out = []
    for i, image in enumerate(images):
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            raise ValueError(f"image {i}: expected a PIL image or uint8 [H, W, 3], got {type(image).__name__} "
                             f"{getattr(image, 'dtype', '')} {list(getattr(image, 'shape', []))}")  # fmt: skip
        out.append(image)
    if not out:
        raise ValueError("empty image batch")
    return out


def image_batch(images) -> torch.Tensor:
    """Any accepted image batch of one size -> float32 [N, 3, H, W] in [0, 1] (float tensors pass unquantised)."""
    if isinstance(images, torch.Tensor):
        return _checked_tensor(images).float().cpu()
    arrays = rgb_list(images)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images in one batch must share a size, got {sorted(shapes)}")
    # contiguous: see hyperlora.toy.face_recognizer.to_pixels (channels-last batches crashed oneDNN on AVX2)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().float() / 255.0


def _checked_tensor(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point() or len(images) == 0:
        raise ValueError(f"a tensor batch must be float [N, 3, H, W] in [0, 1], got {images.dtype} {list(images.shape)}")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"a tensor batch must lie in [0, 1], got [{low:.3g}, {high:.3g}] (a VAE decodes to [-1, 1])")
    return images.detach()


# ---------------------------------------------------------------------------------------------
# The interface


class FeatureExtractor(abc.ABC):
    """Images in, features out. `name` identifies the extractor (and its weights) in result tables."""

    name: str

    @abc.abstractmethod
    def __call__(self, images) -> Any:
        """Features of a batch of images, one row (or entry) per image, in input order."""


# ---------------------------------------------------------------------------------------------
# CLIP


class ClipExtractor(FeatureExtractor):
    """CLIP image and text embeddings (L2-normalised) from a local transformers CLIPModel folder."""

    def __init__(self, model_path: str | Path, *, device: str = "cpu", batch_size: int = 64) -> None:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP model folder at {path.resolve()} (expected config.json, weights, "
                                    "tokenizer files and preprocessor_config.json)")  # fmt: skip
        self.name = f"clip:{path.name}"
        self.device, self.batch_size = device, batch_size
        self.model = CLIPModel.from_pretrained(path, dtype=torch.float32, local_files_only=True).to(device).eval()
        self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        """Image embeds [N, D], unit norm."""
        arrays, out = rgb_list(images), []
        for i in range(0, len(arrays), self.batch_size):
            pixels = self.processor(images=arrays[i : i + self.batch_size], return_tensors="pt").pixel_values
            out.append(_pooled(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return F.normalize(torch.cat(out).float().cpu(), dim=-1)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """Text embeds [N, D], unit norm; prompts longer than the context are truncated, as in SDXL."""
        if isinstance(texts, str):
            raise TypeError("embed_text takes a list of prompts, got a single string")
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i : i + self.batch_size]), padding="max_length",
                                    max_length=self.max_length, truncation=True, return_tensors="pt")  # fmt: skip
            out.append(_pooled(self.model.get_text_features(**tokens.to(self.device))))
        return F.normalize(torch.cat(out).float().cpu(), dim=-1)


def _pooled(output) -> torch.Tensor:
    """The projected embeds: transformers 5 returns an output whose pooler_output holds them, 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ---------------------------------------------------------------------------------------------
# Faces


class FaceEmbeddingExtractor(FeatureExtractor):
    """Identity embeddings of the largest detected face per image; None where no face is found."""

    def __init__(self, analyzer: FaceAnalyzer, *, min_face_size: float = 0.0) -> None:
        """min_face_size: faces whose shorter bbox side is below this (px) count as not detected."""
        self.analyzer, self.min_face_size = analyzer, float(min_face_size)
        self.name = f"face:{analyzer.name}"

    def __call__(self, images) -> list[np.ndarray | None]:
        out = []
        for array in rgb_list(images):
            image = Image.fromarray(array)
            faces = self.analyzer.detect(image)
            if not faces:
                out.append(None)
                continue
            face, _ = choose_face(faces, "largest", "generated image")
            if min(face.width, face.height) < self.min_face_size:
                out.append(None)
                continue
            out.append(face.embedding if face.embedding is not None else self.analyzer.embed(image, face))
        return out


# ---------------------------------------------------------------------------------------------
# LPIPS


class RandomTrunkWarning(UserWarning):
    """LPIPS is running with a random trunk: its values check plumbing, they are not the metric."""


def trunk_weights_path(net: str) -> Path:
    """Where torchvision caches the ImageNet weights of LPIPS' trunk `net` (it would download them there)."""
    from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights

    weights = {"alex": AlexNet_Weights, "vgg": VGG16_Weights, "squeeze": SqueezeNet1_1_Weights}
    if net not in weights:
        raise ValueError(f"net must be one of {sorted(weights)}, got {net!r}")
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights[net].IMAGENET1K_V1.url)


def _load_trunk(trunk: torch.nn.Module, path: Path) -> None:
    """Copy torchvision's `features.<i>.*` weights into lpips' slices, whose children keep the index <i>."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    for k in range(1, trunk.N_slices + 1):
        for index, module in getattr(trunk, f"slice{k}").named_children():
            own = {key.split(".", 1)[1]: v for key, v in features.items() if key.split(".", 1)[0] == index}
            try:
                module.load_state_dict(own)
            except RuntimeError as err:
                raise RuntimeError(f"{path}: features.{index} does not fit LPIPS' trunk: {err}") from err


class LPIPSModel(FeatureExtractor):
    """LPIPS v0.1 (Zhang et al. 2018) with lpips' shipped linear heads; `real` says whether the trunk is ImageNet's.

    `__call__` gives the unit-normalised trunk activations per layer (what LPIPS compares);
    `distance` gives LPIPS itself, per pair or as a spatial map at the input size.
    """

    def __init__(self, net: str = "alex", *, device: str = "cpu", seed: int = 0) -> None:
        """seed: initialises the random trunk (when the real one is absent), so results repeat run to run."""
        import lpips

        heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
        if not heads.is_file():
            raise FileNotFoundError(f"lpips' linear heads for net={net!r} are missing at {heads}; reinstall lpips==0.1.4")
        path = trunk_weights_path(net)
        self.real, self.net_name, self.device = path.is_file(), net, device
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(seed)
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
            # pnet_rand: torchvision builds the trunk with weights=None, so nothing is ever fetched
            self.model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
        if self.real:
            _load_trunk(self.model.net, path)
        else:
            warnings.warn(
                f"LPIPS({net}): torchvision's ImageNet weights are not at {path}, so the trunk is RANDOM "
                "(seeded; lpips' linear heads are real). LPIPS values are a plumbing check, NOT the metric; "
                f"copy {path.name} there for the real LPIPS.", RandomTrunkWarning, stacklevel=2,
            )  # fmt: skip
        self.model.to(device).eval().requires_grad_(False)
        self.name = f"lpips:{net}" + ("" if self.real else ":random-trunk")

    @torch.no_grad()
    def __call__(self, images) -> list[torch.Tensor]:
        """Per-layer trunk activations, unit-normalised over channels: [N, C_l, H_l, W_l] per layer."""
        import lpips

        x = self.model.scaling_layer(image_batch(images).to(self.device) * 2 - 1)
        return [lpips.normalize_tensor(f) for f in self.model.net.forward(x)]

    @torch.no_grad()
    def distance(self, a, b, *, spatial: bool = False) -> torch.Tensor:
        """LPIPS between paired images: [N], or the spatial map [N, H, W] at the input size (lpips' spatial mode)."""
        x, y = image_batch(a), image_batch(b)
        if x.shape != y.shape:
            raise ValueError(f"LPIPS compares paired images of one size, got {list(x.shape)} and {list(y.shape)}")
        self.model.spatial = spatial  # lpips reads this flag in forward; restored below
        try:
            out = self.model(x.to(self.device), y.to(self.device), normalize=True)  # normalize: [0, 1] -> [-1, 1]
        finally:
            self.model.spatial = False
        return out[:, 0].cpu() if spatial else out.flatten().cpu()

