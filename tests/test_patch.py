"""The patch file: round trip, size, and refusal of bad or hostile files."""
import json
import pickle
import re
import struct

import pytest
import torch
from safetensors.torch import save_file
from unets import sd1_unet

from erasure_core.layers import attn2_layers
from erasure_core.patch import (ConceptMemory, ErasurePatch, PatchError, WeightDelta, check_compatible,
                                fingerprint_of, load_patch, model_fingerprint, save_patch)

LAYER = "middle_block.1.transformer_blocks.0.attn2"
LAYERS = ["input_blocks.1.1.transformer_blocks.0.attn2", LAYER]


def make_patch(d=32, m=4, lora=True):
    g = torch.Generator().manual_seed(0)
    deltas = {f"{LAYER}.to_k": WeightDelta(full=torch.randn(16, d, generator=g))}
    if lora:
        deltas[f"{LAYER}.to_v"] = WeightDelta(down=torch.randn(2, d, generator=g), up=torch.randn(16, 2, generator=g),
                                              alpha=1.0)
    memory = ConceptMemory(torch.randn(m, d, generator=g), torch.randn(m, d, generator=g))
    return ErasurePatch(layers=LAYERS, memory=memory,
                        deltas=deltas, method="memory", concepts=["circle"], alternative="square",
                        preserve=["stripes", "dots"], base_model="toy", base_fingerprint="abc123",
                        training={"steps": 10, "lr": 1e-3}, seed=7, metrics={"ua": 0.99})


def test_save_then_load_is_exact(tmp_path):
    patch = make_patch()
    path = save_patch(patch, tmp_path / "p.safetensors")
    back = load_patch(path)
    assert torch.equal(back.memory.k, patch.memory.k) and torch.equal(back.memory.v, patch.memory.v)
    assert set(back.deltas) == set(patch.deltas)
    for name, delta in patch.deltas.items():
        assert torch.equal(back.deltas[name].weight(), delta.weight())
    assert back.metadata() == patch.metadata()
    assert (back.concepts, back.alternative, back.preserve, back.seed, back.metrics) == \
        (["circle"], "square", ["stripes", "dots"], 7, {"ua": 0.99})


def test_file_holds_kohya_keys_and_every_tensor_bit_exactly(tmp_path):
    from safetensors import safe_open

    patch = make_patch()
    patch.memory = ConceptMemory(patch.memory.k.bfloat16(), patch.memory.v.bfloat16())
    path = save_patch(patch, tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert keys == {"erasure.memory.k", "erasure.memory.v",
                    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.diff",
                    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.lora_down.weight",
                    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.lora_up.weight",
                    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.alpha"}
    back = load_patch(path)
    for key, tensor in patch.tensors().items():
        stored = back.tensors()[key]
        assert stored.dtype == tensor.dtype and torch.equal(stored, tensor), key
    assert back.metadata() == patch.metadata()


def test_delta_only_patch_round_trip(tmp_path):
    g = torch.Generator().manual_seed(2)
    patch = ErasurePatch(layers=[], method="uce",
                         deltas={f"{LAYER}.to_q": WeightDelta(full=torch.randn(16, 16, generator=g))})
    back = load_patch(save_patch(patch, tmp_path / "p.safetensors"))
    assert back.memory is None and torch.equal(back.deltas[f"{LAYER}.to_q"].full, patch.deltas[f"{LAYER}.to_q"].full)
    assert back.metadata() == patch.metadata()
    assert back.metadata()["erasure.context_dim"] == ""


def test_deltas_outside_cross_attention_round_trip(tmp_path):
    """ESD-u's patches: conv and linear deltas anywhere in the UNet, full or low rank (kohya's conv factors)."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(3)
    conv = WeightDelta(down=torch.randn(2, 4, 3, 3, generator=g), up=torch.randn(8, 2, 1, 1, generator=g), alpha=1.0)
    patch = ErasurePatch(layers=[], method="esd-u", deltas={
        "input_blocks.1.0.in_layers.2": conv,
        "output_blocks.2.1.conv": WeightDelta(full=torch.randn(8, 8, 3, 3, generator=g)),
        "middle_block.1.transformer_blocks.0.attn1.to_k": WeightDelta(full=torch.randn(8, 8, generator=g))})
    path = save_patch(patch, tmp_path / "u.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert "lora_unet_output_blocks_2_1_conv.diff" in f.keys()
        assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_k.diff" in f.keys()
    back = load_patch(path)
    assert set(back.deltas) == set(patch.deltas) and back.context_dim is None  # attn1's to_k is not the context's
    expected = (conv.up.flatten(1) @ conv.down.flatten(1)).view(8, 4, 3, 3) * 0.5
    assert torch.allclose(back.deltas["input_blocks.1.0.in_layers.2"].weight(), expected)
    assert back.deltas["input_blocks.1.0.in_layers.2"].shape == (8, 4, 3, 3)
    with pytest.raises(PatchError, match="lacks"):  # a model without these weights refuses the patch
        check_compatible(back, 768, LAYERS, weight_shapes={"out.2": (4, 8, 3, 3)})
    with pytest.raises(PatchError, match="the model's weight is"):
        check_compatible(back, 768, LAYERS, weight_shapes={k: (1, 1) for k in back.deltas})


def test_per_layer_memory_round_trip(tmp_path):
    g = torch.Generator().manual_seed(1)
    mem = {n: ConceptMemory(torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)) for n in LAYERS}
    back = load_patch(save_patch(ErasurePatch(layers=LAYERS, memory=mem), tmp_path / "p.safetensors"))
    for n in LAYERS:
        assert torch.equal(back.memory_for(n).k, mem[n].k)


def test_memory_only_patch_at_sd15_size_is_small(tmp_path):
    mem = ConceptMemory(torch.randn(16, 768).half(), torch.randn(16, 768).half())
    path = save_patch(ErasurePatch(layers=[LAYER], memory=mem, concepts=["Van Gogh"]), tmp_path / "p.safetensors")
    assert path.stat().st_size <= 100 * 1024
    assert load_patch(path).metadata()["modelspec.architecture"] == "stable-diffusion-v1/concept-erasure"


def _write_header(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


META = {"erasure.format_version": "1", "erasure.layers": json.dumps([LAYER])}


@pytest.mark.parametrize("case, message", [
    ("text", "not a safetensors file"),
    ("pickle", "pickle"),
    ("torch_zip", "pickle"),
    ("truncated", "truncated"),
    ("huge_header", "header claims"),
    ("int_dtype", "dtype"),
    ("nan", "NaN or Inf"),
    ("unknown_key", "unknown key"),
    ("no_metadata", "not an erasure patch"),
    ("newer_format", "format 9"),
    ("mismatched_kv", "tokens x dim"),
    ("lora_ranks", "inconsistent lora_up / lora_down"),
    ("layer_level_delta", "unknown key"),
    ("norm_level_delta", "unknown key"),
    ("three_d_delta", "must be a linear or conv weight"),
    ("conv_lora_up_not_1x1", "inconsistent lora_up / lora_down"),
    ("diffusers_layer_names", "not a cross-attention layer name"),
    ("bad_seed", "erasure.seed should be an integer"),
    ("bad_layers_json", "erasure.layers is not valid JSON"),
    ("tokens_disagree", "erasure.tokens says 5"),
    ("missing", "no patch file"),
])
def test_bad_files_are_refused_with_one_line(tmp_path, case, message):
    path = tmp_path / "bad.safetensors"
    good = tmp_path / "good.safetensors"
    save_patch(make_patch(), good)
    if case == "text":
        path.write_text("hello, I am not a patch\n" * 10)
    elif case == "pickle":
        path.write_bytes(pickle.dumps({"erasure.memory.k": [1, 2, 3]}))
    elif case == "torch_zip":
        torch.save({"k": torch.zeros(2)}, path)
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[:-100])
    elif case == "huge_header":
        path.write_bytes(struct.pack("<Q", 5 * 2**30) + b"{}")
    elif case == "int_dtype":
        save_file({"erasure.memory.k": torch.zeros(2, 4, dtype=torch.int64),
                   "erasure.memory.v": torch.zeros(2, 4, dtype=torch.int64)}, str(path), metadata=META)
    elif case == "nan":
        k = torch.zeros(2, 4)
        k[0, 1] = float("nan")
        save_file({"erasure.memory.k": k, "erasure.memory.v": torch.zeros(2, 4)}, str(path), metadata=META)
    elif case == "unknown_key":
        save_file({"erasure.memory.k": torch.zeros(2, 4), "erasure.memory.v": torch.zeros(2, 4),
                   "model.diffusion_model.evil": torch.zeros(1)}, str(path), metadata=META)
    elif case == "no_metadata":
        save_file({"erasure.memory.k": torch.zeros(2, 4), "erasure.memory.v": torch.zeros(2, 4)}, str(path))
    elif case == "newer_format":
        save_file({"erasure.memory.k": torch.zeros(2, 4), "erasure.memory.v": torch.zeros(2, 4)}, str(path),
                  metadata={**META, "erasure.format_version": "9"})
    elif case == "mismatched_kv":
        save_file({"erasure.memory.k": torch.zeros(2, 4), "erasure.memory.v": torch.zeros(3, 4)}, str(path),
                  metadata=META)
    elif case == "lora_ranks":
        prefix = "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k"
        save_file({f"{prefix}.lora_down.weight": torch.zeros(2, 4), f"{prefix}.lora_up.weight": torch.zeros(16, 3)},
                  str(path), metadata=META)
    elif case == "layer_level_delta":
        save_file({"lora_unet_middle_block_1_transformer_blocks_0_attn2.diff": torch.zeros(4, 4)}, str(path),
                  metadata=META)
    elif case == "norm_level_delta":  # time_embed.1 is the SiLU: no weight, no key
        save_file({"lora_unet_time_embed_1.diff": torch.zeros(4, 4)}, str(path), metadata=META)
    elif case == "three_d_delta":
        save_file({"lora_unet_input_blocks_1_0_in_layers_2.diff": torch.zeros(4, 4, 3)}, str(path), metadata=META)
    elif case == "conv_lora_up_not_1x1":
        prefix = "lora_unet_input_blocks_1_0_in_layers_2"
        save_file({f"{prefix}.lora_down.weight": torch.zeros(2, 4, 3, 3),
                   f"{prefix}.lora_up.weight": torch.zeros(8, 2, 3, 3)}, str(path), metadata=META)
    elif case == "diffusers_layer_names":
        save_file({"erasure.memory.k": torch.zeros(2, 4), "erasure.memory.v": torch.zeros(2, 4)}, str(path),
                  metadata={**META, "erasure.layers": '["mid_block.attentions.0.transformer_blocks.0.attn2"]'})
    elif case in ("bad_seed", "bad_layers_json", "tokens_disagree"):
        edit = {"bad_seed": {"erasure.seed": "seven"}, "bad_layers_json": {"erasure.layers": "[middle_block"},
                "tokens_disagree": {"erasure.tokens": "5"}}[case]
        save_file({"erasure.memory.k": torch.zeros(2, 4), "erasure.memory.v": torch.zeros(2, 4)}, str(path),
                  metadata={**META, **edit})
    elif case == "missing":
        path = tmp_path / "nope.safetensors"
    with pytest.raises(PatchError, match=message) as info:
        load_patch(path)
    assert "\n" not in str(info.value)


def test_compatibility_dimension_layers_and_fingerprint():
    patch = make_patch(d=768)
    with pytest.raises(PatchError, match="768-d text context .stable-diffusion-v1.; this model has 1024"):
        check_compatible(patch, 1024, LAYERS)
    with pytest.raises(PatchError, match="layers this model lacks"):
        check_compatible(patch, 768, [LAYER])
    assert check_compatible(patch, 768, LAYERS, fingerprint="abc123") == []
    warnings = check_compatible(patch, 768, LAYERS, fingerprint="fff000")
    assert len(warnings) == 1 and "fingerprint" in warnings[0]


def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path):
    """0x80 is also the first byte of a header of 128 (mod 256) bytes; only real pickles are called pickles."""
    patch = make_patch()
    for pad in range(256):
        patch.description = "x" * pad
        path = save_patch(patch, tmp_path / "p.safetensors")
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length ending in 0x80")
    assert load_patch(path).description == patch.description


def test_writing_refuses_what_loading_would_refuse(tmp_path):
    bad = ErasurePatch(layers=[LAYER], memory=ConceptMemory(torch.zeros(2, 4, dtype=torch.float64),
                                                            torch.zeros(2, 4, dtype=torch.float64)))
    with pytest.raises(PatchError, match="unsupported dtype"):
        save_patch(bad, tmp_path / "p.safetensors")
    wrong_width = make_patch(d=32)
    wrong_width.deltas[f"{LAYER}.to_k"] = WeightDelta(full=torch.zeros(16, 64))
    with pytest.raises(PatchError, match="64-d context"):
        save_patch(wrong_width, tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()


def test_fingerprint_is_short_stable_and_host_independent():
    unet = sd1_unet()
    fingerprint = model_fingerprint(unet)
    assert re.fullmatch("[0-9a-f]{16}", fingerprint)
    assert model_fingerprint(sd1_unet()) == fingerprint
    # what a ComfyUI or A1111 adapter computes from LDM-named weights
    ldm_weights = [(f"{layer.canonical}.{proj}.weight", unet.get_submodule(f"{layer.diffusers}.{proj}").weight)
                   for layer in attn2_layers(unet) for proj in ("to_k", "to_v")]
    assert fingerprint_of(ldm_weights) == fingerprint
    assert fingerprint_of((name, w.half().float()) for name, w in ldm_weights) != fingerprint
    with torch.no_grad():
        unet.get_submodule(attn2_layers(unet)[0].diffusers).to_v.weight[0, 0] += 1
    assert model_fingerprint(unet) != fingerprint
