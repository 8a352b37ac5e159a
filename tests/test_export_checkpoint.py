import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hyperlora import functional_lora
from hyperlora.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hyperlora.export import hash_images, kohya_state_dict, lora_from_kohya, save_lora
from hyperlora.targets import diffusers_to_ldm

from .conftest import random_hyperlora, reference_features


@pytest.fixture
def model(unet):
    return random_hyperlora(unet)


@pytest.fixture
def lora(model):
    with torch.no_grad():
        return model.generate(**reference_features(model, 1))["id"]


def test_kohya_layout_is_the_official_one(lora):
    state = kohya_state_dict(lora)
    assert len(state) == 3 * 4 * 24
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert state[f"{key}.alpha"].dtype == torch.float32 and state[f"{key}.alpha"].ndim == 0
    assert float(state[f"{key}.alpha"]) == lora.rank / 2
    assert state[f"{key}.lora_down.weight"].shape == (lora.rank, 64)  # in = cross_attention_dim
    assert state[f"{key}.lora_up.weight"].dtype == torch.float16
    assert f"lora_unet_up_blocks_0_attentions_2_transformer_blocks_1_attn1_to_out_0.lora_up.weight" in state


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_exported_files_load_in_diffusers_and_match_the_functional_lora(format, lora, pipe, tmp_path):
    path = save_lora(tmp_path / f"id_{format}.safetensors", lora, format=format, dtype=torch.float32,
                     config={"rank": lora.rank}, source_images_sha256=hash_images([b"x"]), seed=7)  # fmt: skip
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["hyperlora_format"] == format and metadata["hyperlora_seed"] == "7"
    assert json.loads(metadata["hyperlora_config"]) == {"rank": lora.rank}

    def generate():
        return pipe("a portrait", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images

    with functional_lora(pipe.unet, [lora], [0.75]):
        expected = generate()
    pipe.load_lora_weights(str(path), adapter_name="file")
    pipe.set_adapters(["file"], [0.75])
    torch.testing.assert_close(generate(), expected, rtol=1e-3, atol=1e-4)


def test_kohya_file_round_trips(lora, tmp_path):
    path = save_lora(tmp_path / "id.safetensors", lora, dtype=torch.float32)
    back = lora_from_kohya(load_file(str(path)))
    assert back.rank == lora.rank and back.alpha == lora.alpha and back.layers.keys() == lora.layers.keys()
    for key, (down, up) in lora.layers.items():
        torch.testing.assert_close(back.layers[key][0], down)
        torch.testing.assert_close(back.layers[key][1], up)


def test_bad_export_arguments_raise(lora, tmp_path):
    with pytest.raises(ValueError, match="format"):
        save_lora(tmp_path / "x.safetensors", lora, format="ckpt")
    with pytest.raises(ValueError, match="safetensors"):
        save_lora(tmp_path / "x.pt", lora)


def _generate(model, seed=3):
    with torch.no_grad():
        features = reference_features(model, 2, seed=seed)
        blurred = features["clip"] if model.config.has_base_lora else None
        return model.generate(**features, clip_blurred=blurred, num_refs=2)


def test_checkpoint_round_trips_to_an_identical_lora(model, unet, tmp_path):
    folder = save_checkpoint(model, tmp_path / "ckpt", extra={"seed": 0})
    assert {p.name for p in folder.iterdir()} == {
        "hyper_lora_modules.json", "hyper_lora_modules.safetensors", "resampler.safetensors",
        "id_projector.safetensors", "base_resampler.safetensors", "config.json",
    }  # fmt: skip
    modules = json.loads((folder / "hyper_lora_modules.json").read_text())
    assert list(modules)[0] == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1"
    assert set(load_file(str(folder / "id_projector.safetensors"))) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    loaded = load_checkpoint(folder, unet=unet)
    for branch, lora in _generate(model).items():
        other = _generate(loaded)[branch]
        for key, (down, up) in lora.layers.items():
            torch.testing.assert_close(other.layers[key][0], down, rtol=0, atol=0)
            torch.testing.assert_close(other.layers[key][1], up, rtol=0, atol=0)


def _official_copy(model, tmp_path, ldm_names=False):
    """Our checkpoint made to look like a release folder: no config.json, no order metadata."""
    folder = save_checkpoint(model, tmp_path / "official")
    (folder / "config.json").unlink()
    (folder / "base_resampler.safetensors").unlink(missing_ok=True)
    state = load_file(str(folder / "hyper_lora_modules.safetensors"))
    save_file({k: v for k, v in state.items() if ".id_" in k}, str(folder / "hyper_lora_modules.safetensors"))
    if ldm_names:
        modules = json.loads((folder / "hyper_lora_modules.json").read_text())
        renamed = {"lora_unet_" + diffusers_to_ldm(model.targets[i].name): v for i, v in enumerate(modules.values())}
        (folder / "hyper_lora_modules.json").write_text(json.dumps(renamed, indent=2))
    return folder


@pytest.mark.parametrize("ldm_names", [False, True])
def test_official_layout_without_config_is_inferred(unet, tmp_path, ldm_names):
    model = random_hyperlora(unet, has_base_lora=False, heads=1, dim_head=64)
    loaded = load_checkpoint(_official_copy(model, tmp_path, ldm_names), unet=unet)
    assert loaded.config == model.config
    assert [t.name for t in loaded.targets] == [t.name for t in model.targets]
    lora, other = _generate(model)["id"], _generate(loaded)["id"]
    for key in lora.layers:
        torch.testing.assert_close(other.layers[key][1], lora.layers[key][1])


def _corrupt_shape(folder):
    state = load_file(str(folder / "resampler.safetensors"))
    state["proj_out.weight"] = state["proj_out.weight"][:, :-1].contiguous()
    save_file(state, str(folder / "resampler.safetensors"))


def _drop_key(folder):
    state = load_file(str(folder / "id_projector.safetensors"))
    del state["2.bias"]
    save_file(state, str(folder / "id_projector.safetensors"))


def _drop_module(folder):
    modules = json.loads((folder / "hyper_lora_modules.json").read_text())
    modules.pop(next(iter(modules)))
    (folder / "hyper_lora_modules.json").write_text(json.dumps(modules))


def _reorder(folder):
    modules = list(json.loads((folder / "hyper_lora_modules.json").read_text()).items())
    modules[0], modules[2] = modules[2], modules[0]
    (folder / "hyper_lora_modules.json").write_text(json.dumps(dict(modules)))


def _truncate(folder):
    path = folder / "hyper_lora_modules.safetensors"
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_corrupt_shape, r"resampler.safetensors: .*shape mismatch: proj_out.weight: expected \[8, 32\], found \[8, 31\]"),
        (_drop_key, r"id_projector.safetensors: missing keys \['2.bias'\]"),
        (_drop_module, r"wrong module count: it lists 23 modules, the UNet has 24"),
        (_reorder, r"module order differs"),
        (_truncate, r"hyper_lora_modules.safetensors: not a readable safetensors file"),
    ],
)
def test_corrupted_checkpoints_fail_with_a_message_naming_the_problem(model, unet, tmp_path, corrupt, message):
    folder = save_checkpoint(model, tmp_path / "ckpt")
    corrupt(folder)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder, unet=unet)


def test_reordered_official_json_is_caught_by_shape(tmp_path):
    """Without our order metadata, a reorder shows where shapes differ (attn1 vs attn2 to_k here)."""
    from hyperlora.worlds.sdxl import build_unet

    unet = build_unet("mid")
    model = random_hyperlora(unet, has_base_lora=False, heads=1, dim_head=64)
    folder = _official_copy(model, tmp_path)
    modules = list(json.loads((folder / "hyper_lora_modules.json").read_text()).items())
    modules[0], modules[1] = modules[1], modules[0]  # attn1 <-> attn2 of the first transformer block
    (folder / "hyper_lora_modules.json").write_text(json.dumps(dict(modules)))
    with pytest.raises(CheckpointError, match=r"0.to_k.id_down_basis: expected \[8, 256, 4\], found \[8, 128, 4\].*reordered"):
        load_checkpoint(folder, unet=unet)


def test_missing_files_are_listed(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing .*hyper_lora_modules.json"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
