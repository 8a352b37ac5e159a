"""The sdxl world: published architecture values, and tiny random stand-ins of the same architecture.

No SDXL weights can be fetched on the project's machines, so the real shapes are built on the
`meta` device (`sdxl_unet(device="meta")`) and behaviour is tested on tiny UNets that keep the
SDXL structure (text_time conditioning, two text encoders' worth of cross-attention width). The second
half loads the real stack from local folders (`load_sdxl_parts`) and writes stand-ins of those folders
(`write_standins`) so the same code runs without the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the values that differ from diffusers' defaults).
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)

# The UNet of diffusers' own SDXL pipeline tests (tests/pipelines/stable_diffusion_xl), widened
# to (32, 64) as in its LoRA tests: 24 target modules. Cross-attention 64 = two encoders x 32.
TINY_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=2,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=64,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + 32 pooled
    norm_num_groups=32,
)

# A mid-size SDXL-layout UNet (three levels, 1/2/4 transformer layers) for benchmarks: 68 modules, 50 M parameters.
MID_UNET_CONFIG = dict(
    TINY_UNET_CONFIG,
    sample_size=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(64, 128, 256),
    attention_head_dim=(2, 4, 8),
    transformer_layers_per_block=(1, 2, 4),
    cross_attention_dim=256,
    addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=6 * 32 + 128,
)

UNET_CONFIGS = {"sdxl": SDXL_UNET_CONFIG, "tiny": TINY_UNET_CONFIG, "mid": MID_UNET_CONFIG}

# Sampling settings of the official workflows (facts §3.2).
TRIGGER_WORDS = "fcsks fxhks fhyks"
NEGATIVE_PROMPT = (
    "big breast, nsfw, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
    "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry, bad feet"
)
CLIP_VISION_HIDDEN = 1024  # openai/clip-vit-large-patch14; the resampler width equals it


def build_unet(name: str = "tiny", *, device: str | torch.device = "cpu", seed: int = 0) -> UNet2DConditionModel:
    """A randomly initialised UNet of one of `UNET_CONFIGS`; on `meta` it allocates nothing."""
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet {name!r}; known: {sorted(UNET_CONFIGS)}")
    with torch.device(device):
        if str(device) != "meta":
            torch.manual_seed(seed)
        return UNet2DConditionModel(**UNET_CONFIGS[name]).eval()


def unet_inputs(unet: UNet2DConditionModel, batch: int = 2, *, seed: int = 0, dtype=torch.float32) -> dict:
    """Seeded random inputs for one UNet call: latents, timestep, text states and SDXL added conditions."""
    config = unet.config
    g = torch.Generator().manual_seed(seed)
    size = config.sample_size
    time_dim = config.addition_time_embed_dim
    pooled = config.projection_class_embeddings_input_dim - 6 * time_dim
    return dict(
        sample=torch.randn(batch, config.in_channels, size, size, generator=g, dtype=dtype),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(batch, 7, config.cross_attention_dim, generator=g, dtype=dtype),
        added_cond_kwargs=dict(
            text_embeds=torch.randn(batch, pooled, generator=g, dtype=dtype),
            time_ids=torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]], dtype=dtype).repeat(batch, 1),
        ),
    )


def tiny_pipeline(tokenizer_dir, *, seed: int = 0):
    """A random tiny StableDiffusionXLPipeline (diffusers' test components, the real CLIP tokenizer)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=5, vocab_size=49408, hidden_act="gelu", projection_dim=32,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )  # fmt: skip
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=CLIPTextModel(text_config).eval(),
        text_encoder_2=CLIPTextModelWithProjection(text_config).eval(),
        tokenizer=clip_tokenizer(tokenizer_dir),
        tokenizer_2=clip_tokenizer(tokenizer_dir, pad_token="!"),
        unet=build_unet("tiny", seed=seed),
        scheduler=scheduler,
    )


# --- loading the real (or stand-in) SDXL stack from local folders ---------------------------------

# The official workflows' sampling (facts §3.2): 20 steps of DPM++ 2M Karras at CFG 5, the release's negative
# prompt; size None: the pipeline's own (1024 px for SDXL).
SDXL_SAMPLING = {"steps": 20, "guidance": 5.0, "negative_prompt": NEGATIVE_PROMPT, "size": None}


def same_architecture(config, reference: dict) -> bool:
    """Whether a diffusers config has every value of `reference` but sample_size (a default image size, not
    architecture); lists and tuples compare equal."""

    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    return all(plain(config.get(k)) == plain(v) for k, v in reference.items() if k != "sample_size")


def load_sdxl_pipeline(path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A diffusers SDXL pipeline folder, offline, sampling with DPM++ 2M Karras on its own noise schedule."""
    from diffusers import StableDiffusionXLPipeline

    from ..schedulers import DEFAULT_SCHEDULER, set_scheduler

    if not path:
        raise ValueError("the sdxl world needs a diffusers SDXL pipeline folder (--pipeline DIR, as "
                         "StableDiffusionXLPipeline.save_pretrained writes it)")  # fmt: skip
    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(f"no diffusers SDXL pipeline at {path} (no model_index.json): expected a folder "
                                "StableDiffusionXLPipeline.from_pretrained reads (unet/, vae/, text_encoder*/, ...)")  # fmt: skip
    pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True, dtype=dtype)
    pipe.to(device)
    set_scheduler(pipe, DEFAULT_SCHEDULER)
    return pipe


def load_sdxl_parts(*, pipeline, clip, insightface_root=None, face_backend: str = "antelopev2",
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):  # fmt: skip
    """(pipeline, CLIP image encoder, face analyser) of the sdxl world from local folders; clear errors otherwise."""
    from ..conditioning.backends import make_face_analyzer
    from ..conditioning.clip_features import ClipImageEncoder

    if not clip:
        raise ValueError("the sdxl world needs a CLIP ViT-L/14 folder (--clip DIR: openai/clip-vit-large-patch14 "
                         "with config.json, model.safetensors, preprocessor_config.json)")  # fmt: skip
    kwargs = {}
    if face_backend == "antelopev2":
        if not insightface_root:
            raise ValueError("face backend antelopev2 needs --insightface-root DIR (the folder holding "
                             "models/antelopev2/*.onnx)")  # fmt: skip
        kwargs["root"] = str(insightface_root)
    pipe = load_sdxl_pipeline(pipeline, dtype=dtype, device=device)
    encoder = ClipImageEncoder(clip, world="sdxl", device=device, dtype=dtype)
    return pipe, encoder, make_face_analyzer(face_backend, **kwargs)


def weights_label(pipe, clip_hidden_size: int) -> str:
    """Whether the weights can be real (a UNet of SDXL's architecture and a ViT-L/14-wide CLIP) or are stand-ins."""
    problems = []
    if not same_architecture(pipe.unet.config, SDXL_UNET_CONFIG):
        problems.append("the UNet is not SDXL's architecture")
    if clip_hidden_size != CLIP_VISION_HIDDEN:
        problems.append(f"the CLIP is {clip_hidden_size} wide, not ViT-L/14's {CLIP_VISION_HIDDEN}")
    if not problems:
        return "SDXL-architecture UNet and ViT-L/14 CLIP (taken as pretrained)"
    return f"RANDOM or unknown stand-in weights ({'; '.join(problems)}): the images are NOISE, a plumbing check"


STANDIN_LABEL = "UNTRAINED random stand-in (tiny SDXL-layout pipeline, tiny CLIP): the images are NOISE"


def write_standins(folder, *, seed: int = 0) -> dict[str, Path]:
    """Tiny random stand-ins of the sdxl world's folders, for running its code without the real weights:
    sdxl/ (`tiny_pipeline`), clip/ (a 32-wide CLIP vision tower) and hyperlora/ (a random checkpoint for dlib's
    128-d embeddings, labelled UNTRAINED). Returns {"pipeline", "clip", "checkpoint"} -> folder."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from ..checkpoint import save_checkpoint
    from ..config import preset
    from ..hypernet import HyperLoRA
    from ..targets import find_targets

    folder = Path(folder)
    paths = {"pipeline": folder / "sdxl", "clip": folder / "clip", "checkpoint": folder / "hyperlora"}
    pipe = tiny_pipeline(folder / "tokenizer", seed=seed)
    pipe.save_pretrained(paths["pipeline"])
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, image_size=224, projection_dim=32, intermediate_size=37,
                              num_attention_heads=4, num_hidden_layers=5, patch_size=14)  # fmt: skip
    CLIPVisionModelWithProjection(vision).save_pretrained(paths["clip"])
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    processor.save_pretrained(paths["clip"])
    model = HyperLoRA(preset("tiny", dim=32, id_embed_dim=128), find_targets(pipe.unet)).randomize_up_bases(0.5, seed)
    save_checkpoint(model, paths["checkpoint"], extra={"label": STANDIN_LABEL})
    return paths
