"""Layer names against UNets with the real block structure of SD1.x, SD2.x, SDXL and the toy model."""
import time

import pytest
import torch
from unets import SD1_INPUT, SD1_OUTPUT, sd1_unet, sd2_unet, sdxl_unet, toy_unet

from erasure_core.layers import (PROJECTIONS, attn2_layers, attn2_layers_from_config, comfy_weight_key,
                                 from_comfy_weight_key, from_kohya_module, is_canonical_layer, kohya_prefix, layer_of,
                                 select_layers, to_canonical, to_diffusers)


def sd1_names():
    names = [f"input_blocks.{i}.1.transformer_blocks.0.attn2" for i in SD1_INPUT]
    names.append("middle_block.1.transformer_blocks.0.attn2")
    names += [f"output_blocks.{i}.1.transformer_blocks.0.attn2" for i in SD1_OUTPUT]
    return names


def sd1_diffusers_names():
    names = [f"down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2" for i in range(3) for j in range(2)]
    names.append("mid_block.attentions.0.transformer_blocks.0.attn2")
    names += [f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2" for i in (1, 2, 3) for j in range(3)]
    return names


def sdxl_names():
    names = [f"input_blocks.{i}.1.transformer_blocks.{k}.attn2" for i in (4, 5) for k in range(2)]
    names += [f"input_blocks.{i}.1.transformer_blocks.{k}.attn2" for i in (7, 8) for k in range(10)]
    names += [f"middle_block.1.transformer_blocks.{k}.attn2" for k in range(10)]
    names += [f"output_blocks.{i}.1.transformer_blocks.{k}.attn2" for i in (0, 1, 2) for k in range(10)]
    names += [f"output_blocks.{i}.1.transformer_blocks.{k}.attn2" for i in (3, 4, 5) for k in range(2)]
    return names


@pytest.fixture(scope="module")
def built():
    """Each layout built once; SDXL's 70 transformer blocks at tiny width must stay cheap to build."""
    start = time.perf_counter()
    unets = {"sd1": sd1_unet(), "sd2": sd2_unet(), "sdxl": sdxl_unet(), "toy": toy_unet()}
    assert time.perf_counter() - start < 10
    return unets


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_sd1_and_sd2_have_the_16_ldm_layers(built, arch):
    layers = attn2_layers(built[arch])
    assert len(layers) == 16
    assert [layer.canonical for layer in layers] == sd1_names()
    assert [layer.diffusers for layer in layers] == sd1_diffusers_names()
    blocks = [layer.comfy_block for layer in layers]
    assert blocks == [("input", i) for i in SD1_INPUT] + [("middle", 0)] + [("output", i) for i in SD1_OUTPUT]
    assert {layer.transformer_index for layer in layers} == {0}


def test_sd2_context_is_1024_wide(built):
    unet = built["sd2"]
    assert unet.config.cross_attention_dim == 1024
    assert unet.get_submodule(attn2_layers(unet)[0].diffusers).to_k.weight.shape[1] == 1024


def test_sdxl_has_70_layers_in_ldm_order(built):
    layers = attn2_layers(built["sdxl"])
    assert len(layers) == 70
    assert [layer.canonical for layer in layers] == sdxl_names()
    by_name = {layer.canonical: layer for layer in layers}
    assert by_name["input_blocks.4.1.transformer_blocks.0.attn2"].diffusers == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert by_name["input_blocks.8.1.transformer_blocks.9.attn2"].diffusers == \
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2"
    assert by_name["middle_block.1.transformer_blocks.9.attn2"].diffusers == \
        "mid_block.attentions.0.transformer_blocks.9.attn2"
    assert by_name["output_blocks.2.1.transformer_blocks.3.attn2"].diffusers == \
        "up_blocks.0.attentions.2.transformer_blocks.3.attn2"
    layer = by_name["output_blocks.4.1.transformer_blocks.1.attn2"]
    assert layer.diffusers == "up_blocks.1.attentions.1.transformer_blocks.1.attn2"
    assert (layer.comfy_block, layer.transformer_index) == (("output", 4), 1)
    assert len(select_layers([layer.canonical for layer in layers], "mid")) == 10
    assert len(select_layers([layer.canonical for layer in layers], "midout")) == 46


TOY_NAMES = ["input_blocks.5.1.transformer_blocks.0.attn2", "middle_block.1.transformer_blocks.0.attn2",
             "output_blocks.0.1.transformer_blocks.0.attn2", "output_blocks.1.1.transformer_blocks.0.attn2"]


def test_toy_layout(built):
    from erasure_core.toy.model import UNET_CONFIG

    layers = attn2_layers(built["toy"])
    assert [layer.canonical for layer in layers] == TOY_NAMES
    assert [layer.diffusers for layer in layers] == [
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2", "mid_block.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2", "up_blocks.0.attentions.1.transformer_blocks.0.attn2"]
    assert attn2_layers_from_config(UNET_CONFIG) == layers  # from the plain config dict, no model needed


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl", "toy"])
def test_diffusers_and_canonical_paths_round_trip(built, arch):
    unet = built[arch]
    layers = attn2_layers(unet)
    for layer in layers:
        assert is_canonical_layer(layer.canonical)
        assert to_diffusers(layer.canonical, layers) == layer.diffusers
        assert to_canonical(layer.diffusers, layers) == layer.canonical
        for proj in PROJECTIONS:
            module = to_diffusers(f"{layer.canonical}.{proj}", layers)
            assert module == f"{layer.diffusers}.{proj}"
            assert isinstance(unet.get_submodule(module), torch.nn.Linear)
            assert to_canonical(module, layers) == f"{layer.canonical}.{proj}"
            assert layer_of(f"{layer.canonical}.{proj}") == layer.canonical
    with pytest.raises(ValueError, match="no cross-attention layer"):
        to_diffusers("input_blocks.3.1.transformer_blocks.0.attn2", layers)
    with pytest.raises(ValueError, match="no cross-attention layer"):
        to_canonical("down_blocks.9.attentions.0.transformer_blocks.0.attn2.to_k", layers)
    with pytest.raises(ValueError, match="attn2"):
        to_diffusers("middle_block.1.transformer_blocks.0.attn1", layers)


def test_selection_modes():
    names = sd1_names()
    assert select_layers(names, "mid") == ["middle_block.1.transformer_blocks.0.attn2"]
    assert select_layers(names, "midout") == names[6:]
    assert select_layers(names, "all") == names
    assert select_layers(names, [names[3], names[0], names[3]]) == [names[0], names[3]]
    with pytest.raises(ValueError, match="no cross-attention layer") as info:
        select_layers(names, ["input_blocks.3.1.transformer_blocks.0.attn2"])
    assert all(name in str(info.value) for name in names)  # the message lists the valid names
    with pytest.raises(ValueError, match="unknown layer selection"):
        select_layers(names, "middle")
    with pytest.raises(ValueError, match="empty"):
        select_layers(names, [])


@pytest.mark.parametrize("names", [sd1_names(), sdxl_names(), TOY_NAMES], ids=["sd1", "sdxl", "toy"])
def test_kohya_and_comfy_keys_round_trip(names):
    for name in names:
        for proj in PROJECTIONS:
            module = f"{name}.{proj}"
            assert from_kohya_module(kohya_prefix(module)) == module
            assert from_comfy_weight_key(comfy_weight_key(module)) == module


def test_key_spellings():
    module = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    assert kohya_prefix(module) == "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    assert kohya_prefix("output_blocks.11.1.transformer_blocks.0.attn2.to_out.0") == \
        "lora_unet_output_blocks_11_1_transformer_blocks_0_attn2_to_out_0"
    assert from_kohya_module("lora_unet_middle_block_1_transformer_blocks_9_attn2_to_v") == \
        "middle_block.1.transformer_blocks.9.attn2.to_v"
    assert comfy_weight_key(module) == "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    for bad in ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn3_to_k",
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                "lora_te_text_model_encoder_layers_0_self_attn_k_proj"):
        with pytest.raises(ValueError):
            from_kohya_module(bad)
    for bad in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"):
        with pytest.raises(ValueError):
            from_comfy_weight_key(bad)
    assert not is_canonical_layer("down_blocks.0.attentions.0.transformer_blocks.0.attn2")


def sd15_ldm_weights() -> set[str]:
    """The linear and conv layers of the SD1.5 checkpoint (model.diffusion_model.*), written out from its keys."""
    resnet = ("in_layers.2", "emb_layers.1", "out_layers.3")
    transformer = ["proj_in", "proj_out"] + [f"transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2")
                                             for p in PROJECTIONS] + ["transformer_blocks.0.ff.net.0.proj",
                                                                      "transformer_blocks.0.ff.net.2"]
    names = {"input_blocks.0.0", "time_embed.0", "time_embed.2", "out.2"}
    names |= {f"input_blocks.{i}.0.{leaf}" for i in (1, 2, 4, 5, 7, 8, 10, 11) for leaf in resnet}
    names |= {"input_blocks.4.0.skip_connection", "input_blocks.7.0.skip_connection"}
    names |= {f"input_blocks.{i}.1.{leaf}" for i in SD1_INPUT for leaf in transformer}
    names |= {f"input_blocks.{i}.0.op" for i in (3, 6, 9)}
    names |= {f"middle_block.{i}.{leaf}" for i in (0, 2) for leaf in resnet}
    names |= {f"middle_block.1.{leaf}" for leaf in transformer}
    names |= {f"output_blocks.{i}.0.{leaf}" for i in range(12) for leaf in resnet + ("skip_connection",)}
    names |= {f"output_blocks.{i}.1.{leaf}" for i in SD1_OUTPUT for leaf in transformer}
    names |= {"output_blocks.2.1.conv", "output_blocks.5.2.conv", "output_blocks.8.2.conv"}
    return names


def test_every_weight_of_an_sd15_layout_gets_its_checkpoint_path():
    from erasure_core.layers import is_canonical_module, unet_modules

    unet = sd1_unet(block_out_channels=(8, 16, 32, 32))  # channel changes, so skip connections exist as in SD1.5
    paths = unet_modules(unet)
    assert set(paths) == sd15_ldm_weights()
    assert paths["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert paths["input_blocks.4.0.skip_connection"] == "down_blocks.1.resnets.0.conv_shortcut"
    assert paths["middle_block.2.out_layers.3"] == "mid_block.resnets.1.conv2"
    for ldm, diffusers in paths.items():
        assert is_canonical_module(ldm) and from_kohya_module(kohya_prefix(ldm)) == ldm
        assert unet.get_submodule(diffusers).weight.dim() in (2, 4)


@pytest.mark.parametrize("arch", ["sd2", "sdxl", "toy"])
def test_unet_modules_agree_with_the_attn2_layers(built, arch):
    from erasure_core.layers import unet_modules

    paths = unet_modules(built[arch])
    for layer in attn2_layers(built[arch]):
        for proj in PROJECTIONS:
            assert paths[f"{layer.canonical}.{proj}"] == f"{layer.diffusers}.{proj}"
    if arch == "sdxl":
        assert paths["label_emb.0.0"] == "add_embedding.linear_1"


def test_peft_wrappers_are_seen_through():
    """A LoRA loaded with peft wraps to_k etc. (a module with base_layer, lora_A, lora_B children): the wrapper
    keeps the wrapped layer's LDM path, its weight is the base weight, and peft's internals are no layers."""
    LoraConfig = pytest.importorskip("peft").LoraConfig
    from webui_fakes import LdmUNet

    from erasure_core.layers import base_layer, outer_modules, unet_modules, weight_modules
    from erasure_core.patch import model_fingerprint

    plain, wrapped = sd1_unet(), sd1_unet()  # same seed, same weights
    wrapped.add_adapter(LoraConfig(r=2, target_modules=["to_k", "to_v", "conv1", "proj_in"], init_lora_weights=False))
    to_k = wrapped.get_submodule(f"{attn2_layers(wrapped)[0].diffusers}.to_k")
    assert "base_layer" in to_k._modules and "lora_A" in to_k._modules
    assert base_layer(to_k) is to_k._modules["base_layer"] and base_layer(plain.conv_in) is plain.conv_in
    assert attn2_layers(wrapped) == attn2_layers(plain)
    assert unet_modules(wrapped) == unet_modules(plain)
    assert not any(".base_layer" in name or ".lora_" in name for name, _ in outer_modules(wrapped))
    assert model_fingerprint(wrapped) == model_fingerprint(plain)
    ldm_plain, ldm_wrapped = weight_modules(LdmUNet(plain)), weight_modules(LdmUNet(wrapped))
    assert list(ldm_wrapped) == list(ldm_plain)  # LDM layout: no peft internals listed
    wrappers = [name for name, module in ldm_wrapped.items() if "base_layer" in module._modules]
    assert any(name.endswith("attn2.to_k") for name in wrappers) and any(name.endswith("in_layers.2")
                                                                         for name in wrappers)
