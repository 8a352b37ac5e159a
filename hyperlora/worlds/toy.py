"""The toy world for users: the shipped miniature models under data/toy, and where its HyperLoRA lives.

- data/toy/sdxl/: the base model (a StableDiffusionXLPipeline folder, DPM++ 2M Karras, v-prediction)
- data/toy/clip/: the toy CLIP, the hypernetwork's image encoder (width 192)
- data/toy/faces/: the toy detector + ArcFace (antelopev2's role, 128-d embeddings)
- data/toy/hyperlora/: the trained toy HyperLoRA in the official layout, with its model card (`shipped_checkpoint`)
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..toy.pipeline import DEFAULT_TOY_DIR, TOY_GUIDANCE

DEFAULT_CHECKPOINT = DEFAULT_TOY_DIR / "hyperlora"
TRAIN_COMMAND = "python -m hyperlora.train --preset toy --stages 1,2,3 --out runs/train/x"
TOY_MIN_FACE_SIZE = 8.0  # px: toy faces are ~30 px wide in 64 px images
TOY_SIZE = 64  # px: the toy base model's image size


class MissingCheckpointError(FileNotFoundError):
    """No HyperLoRA checkpoint where one was expected; the message says how to get one."""


def missing_checkpoint_message(folder: Path) -> str:
    return (f"no trained toy HyperLoRA at {folder} (the repository ships one there). Train one with `{TRAIN_COMMAND}` "
            "(the full toy schedule takes hours on a CPU), then pass --checkpoint runs/train/x/stage3/hyperlora "
            "(Python: checkpoint='runs/train/x/stage3/hyperlora')")  # fmt: skip


def shipped_checkpoint() -> Path | None:
    """data/toy/hyperlora when a trained HyperLoRA is shipped there (its hyper_lora_modules.json), else None: the
    notebooks' default, falling back to a labelled UNTRAINED one where it is missing."""
    return DEFAULT_CHECKPOINT if (DEFAULT_CHECKPOINT / "hyper_lora_modules.json").is_file() else None


def toy_checkpoint(checkpoint: str | Path | None) -> Path:
    """The checkpoint folder to load: the one given, else data/toy/hyperlora; a clear error if it is absent."""
    folder = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    if not folder.is_dir():
        if checkpoint:
            raise MissingCheckpointError(f"--checkpoint {folder}: no such folder (a HyperLoRA checkpoint folder "
                                         "holds hyper_lora_modules.json and *.safetensors)")  # fmt: skip
        raise MissingCheckpointError(missing_checkpoint_message(folder))
    return folder


def load_toy_parts(*, pipeline=None, clip=None, toy_dir=None, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", det_threshold: float = 0.5):  # fmt: skip
    """(pipeline, CLIP image encoder, face analyser) of the toy world, from data/toy unless told otherwise."""
    from ..conditioning.backends import make_face_analyzer
    from ..conditioning.clip_features import ClipImageEncoder
    from ..toy.pipeline import load_toy_pipeline

    toy_dir = Path(toy_dir) if toy_dir else DEFAULT_TOY_DIR
    pipe = load_toy_pipeline(Path(pipeline) if pipeline else toy_dir / "sdxl", dtype=dtype).to(device)
    encoder = ClipImageEncoder(Path(clip) if clip else toy_dir / "clip", world="toy", device=device, dtype=dtype)
    analyzer = make_face_analyzer("toy", model_dir=toy_dir / "faces", det_threshold=det_threshold)
    return pipe, encoder, analyzer


# The toy base model's sampling: no negative prompt (its unconditional branch was trained on ""), its own guidance.
TOY_SAMPLING = {"steps": 20, "guidance": TOY_GUIDANCE, "negative_prompt": None, "size": TOY_SIZE}


UNTRAINED_LABEL = "UNTRAINED random init: its LoRAs change the images, but not towards anyone"


def write_untrained_checkpoint(folder, *, seed: int = 0, pipeline=None) -> Path:
    """A small random HyperLoRA for the toy UNet (toy CLIP 192 wide, toy ArcFace 128-d, a Base branch), labelled
    UNTRAINED, for running the toy world's code before a trained checkpoint exists. Random up bases, so its LoRAs
    are not zero. Returns the folder."""
    from diffusers import UNet2DConditionModel

    from ..checkpoint import save_checkpoint
    from ..config import preset
    from ..hypernet import HyperLoRA
    from ..targets import find_targets

    unet_dir = (Path(pipeline) if pipeline else DEFAULT_TOY_DIR / "sdxl") / "unet"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir))
    torch.manual_seed(seed)
    config = preset("tiny", dim=192, id_embed_dim=128, heads=2, dim_head=32, depth=1)
    model = HyperLoRA(config, find_targets(unet)).randomize_up_bases(0.5, seed)
    return save_checkpoint(model, folder, extra={"label": UNTRAINED_LABEL})
