"""Layer names against UNets with the real block structure of SD1.x, SD2.x and SDXL (reduced widths)."""
import pytest

from unets import SD1_INPUT, SD1_OUTPUT, sd1_unet, sd2_unet, sdxl_unet


from erasure_core.layers import (attn2_layers, comfy_weight_key, from_kohya_prefix, kohya_prefix,
                                 select_layers)



def sd1_names():
    names = [f"input_blocks.{i}.1.transformer_blocks.0.attn2" for i in SD1_INPUT]
    names.append("middle_block.1.transformer_blocks.0.attn2")
    names += [f"output_blocks.{i}.1.transformer_blocks.0.attn2" for i in SD1_OUTPUT]
    return names


@pytest.mark.parametrize("build", [sd1_unet, sd2_unet], ids=["sd1", "sd2"])
def test_sd1_and_sd2_have_the_16_ldm_layers(build):
    layers = attn2_layers(build())
    assert [layer.canonical for layer in layers] == sd1_names()
    assert layers[0].diffusers == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert layers[6].diffusers == "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert layers[-1].diffusers == "up_blocks.3.attentions.2.transformer_blocks.0.attn2"
    assert [layer.comfy_block for layer in layers][5:8] == [("input", 8), ("middle", 0), ("output", 3)]


def test_sdxl_has_70_layers_in_ldm_order():
    layers = attn2_layers(sdxl_unet())
    assert len(layers) == 70
    names = [layer.canonical for layer in layers]
    expected = [f"input_blocks.{i}.1.transformer_blocks.{k}.attn2" for i in (4, 5) for k in range(2)]
    expected += [f"input_blocks.{i}.1.transformer_blocks.{k}.attn2" for i in (7, 8) for k in range(10)]
    expected += [f"middle_block.1.transformer_blocks.{k}.attn2" for k in range(10)]
    expected += [f"output_blocks.{i}.1.transformer_blocks.{k}.attn2" for i in (0, 1, 2) for k in range(10)]
    expected += [f"output_blocks.{i}.1.transformer_blocks.{k}.attn2" for i in (3, 4, 5) for k in range(2)]
    assert names == expected
    by_name = {layer.canonical: layer for layer in layers}
    assert by_name["output_blocks.4.1.transformer_blocks.1.attn2"].diffusers == \
        "up_blocks.1.attentions.1.transformer_blocks.1.attn2"
    assert by_name["output_blocks.4.1.transformer_blocks.1.attn2"].transformer_index == 1


def test_toy_layout(toy_model):
    names = toy_model.layer_names()
    assert names == ["input_blocks.5.1.transformer_blocks.0.attn2", "middle_block.1.transformer_blocks.0.attn2",
                     "output_blocks.0.1.transformer_blocks.0.attn2", "output_blocks.1.1.transformer_blocks.0.attn2"]


def test_selection_modes():
    names = sd1_names()
    assert select_layers(names, "mid") == ["middle_block.1.transformer_blocks.0.attn2"]
    assert len(select_layers(names, "midout")) == 10
    assert select_layers(names, "all") == names
    assert select_layers(names, [names[3], names[0]]) == [names[0], names[3]]
    with pytest.raises(ValueError, match="no cross-attention layer"):
        select_layers(names, ["input_blocks.3.1.transformer_blocks.0.attn2"])
    with pytest.raises(ValueError, match="unknown layer selection"):
        select_layers(names, "middle")


def test_kohya_and_comfy_keys_round_trip():
    for name in sd1_names():
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            module = f"{name}.{proj}"
            assert from_kohya_prefix(kohya_prefix(module)) == module
    assert kohya_prefix("input_blocks.1.1.transformer_blocks.0.attn2.to_k") == \
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    assert comfy_weight_key("input_blocks.1.1.transformer_blocks.0.attn2.to_k") == \
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(ValueError):
        from_kohya_prefix("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_k")
