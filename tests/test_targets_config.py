import json

import pytest

from hyperlora import HyperLoRAConfig, find_targets, preset
from hyperlora.config import list_presets
from hyperlora.info import info
from hyperlora.targets import diffusers_to_ldm, ldm_to_diffusers, resolve_module_name
from hyperlora.worlds.sdxl import build_unet


def test_sdxl_has_140_target_modules_in_data_flow_order():
    targets = find_targets(build_unet("sdxl", device="meta"))
    assert len(targets) == 140
    sections = [t.name.split(".")[0] for t in targets]
    assert sections == ["down_blocks"] * 48 + ["mid_block"] * 20 + ["up_blocks"] * 72
    assert {t.hidden_size for t in targets} == {640, 1280}
    assert {t.cross_attention_dim for t in targets if t.name.endswith("attn2")} == {2048}
    assert all(t.cross_attention_dim is None for t in targets if t.name.endswith("attn1"))
    names = [t.name for t in targets]
    assert names.index("down_blocks.1.attentions.0.transformer_blocks.0.attn1") < names.index(
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    )


def test_tiny_unet_has_24_target_modules():
    assert len(find_targets(build_unet("tiny"))) == 24


@pytest.mark.parametrize(
    "ldm, diffusers",
    [
        ("input_blocks_4_1", "down_blocks.1.attentions.0"),
        ("input_blocks_5_1", "down_blocks.1.attentions.1"),
        ("input_blocks_7_1", "down_blocks.2.attentions.0"),
        ("input_blocks_8_1", "down_blocks.2.attentions.1"),
        ("middle_block_1", "mid_block.attentions.0"),
        ("output_blocks_0_1", "up_blocks.0.attentions.0"),
        ("output_blocks_2_1", "up_blocks.0.attentions.2"),
        ("output_blocks_3_1", "up_blocks.1.attentions.0"),
        ("output_blocks_5_1", "up_blocks.1.attentions.2"),
    ],
)
def test_ldm_mapping_matches_the_sdxl_table(ldm, diffusers):
    assert ldm_to_diffusers(ldm) == diffusers
    path = f"{diffusers}.transformer_blocks.3.attn2"
    assert diffusers_to_ldm(path) == f"{ldm}_transformer_blocks_3_attn2"


def test_all_three_spellings_resolve_to_the_same_module():
    for target in find_targets(build_unet("sdxl", device="meta")):
        assert resolve_module_name(target.name) == target.name
        assert resolve_module_name(target.kohya_name) == target.name
        assert resolve_module_name("lora_unet_" + diffusers_to_ldm(target.name)) == target.name


def test_unparseable_module_name_is_named_in_the_error():
    with pytest.raises(ValueError, match="lora_unet_foo_attn1"):
        resolve_module_name("lora_unet_foo_attn1")


def test_sdxl_info_gives_the_released_sizes():
    values = info("sdxl")
    assert values["modules"] == 140
    assert values["basis_parameters"] == 1_486_356_480
    assert values["resampler_parameters"] == 74_750_080
    assert values["id_projector_parameters"] == 8_407_040
    assert values["equivalent_lora_parameters"] == 11_612_160
    assert values["coefficients"] == 143_360


def test_presets_and_json_round_trip(tmp_path):
    assert {"sdxl_v1", "tiny"} <= set(list_presets())
    assert preset("sdxl_v1") == HyperLoRAConfig()
    config = preset("tiny", rank=6)
    assert config.base_rank == 3 and config.rank == 6
    config.save(tmp_path / "c.json")
    assert HyperLoRAConfig.load(tmp_path / "c.json") == config


def test_unknown_config_keys_and_bad_values_raise(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"hyper_dims": 3}))
    with pytest.raises(ValueError, match="hyper_dims"):
        HyperLoRAConfig.load(tmp_path / "c.json")
    with pytest.raises(ValueError, match="rank"):
        HyperLoRAConfig(rank=5)
    with pytest.raises(ValueError, match="encoder_types"):
        HyperLoRAConfig(encoder_types=("dino",))
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")
