"""The patch file: round trip, size, and refusal of bad or hostile files."""
import importlib.util
import json
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from unets import sd1_unet

from erasure_core.layers import attn2_layers
from erasure_core.patch import (FORMAT_VERSION, KNOWN_FEATURES, ConceptMemory, ErasurePatch, PatchError, WeightDelta,
                                check_compatible, fingerprint_of, load_patch, model_fingerprint, register_feature,
                                save_patch, unregister_feature)

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


def test_patch_files_get_the_process_default_mode_so_another_user_can_read_them(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = save_patch(make_patch(), tmp_path / "p.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # safetensors alone writes 0600


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
    ("strength_card_not_a_dict", "strength must hold ua and erases_from"),
    ("strength_card_bad_rate", "strength ua has a bad entry"),
    ("strength_card_bad_start", "erases_from must be a strength"),
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
    elif case.startswith("strength_card"):  # a host prints this card beside its slider: nothing odd may pass
        card = {"strength_card_not_a_dict": "erases fully", "strength_card_bad_rate": {
            "ua": {"0.5": 7.0}, "erases_from": 0.5}, "strength_card_bad_start": {"ua": {}, "erases_from": "1e999"}}
        save_file({"erasure.memory.k": torch.zeros(2, 4), "erasure.memory.v": torch.zeros(2, 4)}, str(path),
                  metadata={**META, "erasure.metrics": json.dumps({"strength": card[case]})})
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


# --- format 2: erasure.requires, features, and format-1 files --------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"
V1_FIXTURE = FIXTURES / "patch_v1.safetensors"


def _file_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_the_writer_records_the_features_the_content_needs(tmp_path):
    assert FORMAT_VERSION == "2" and list(KNOWN_FEATURES)[:2] == ["memory", "deltas"]
    both = make_patch()
    memory_only = ErasurePatch(layers=[LAYER], memory=both.memory)
    deltas_only = ErasurePatch(layers=[], deltas=both.deltas)
    for patch, requires in ((both, "memory,deltas"), (memory_only, "memory"), (deltas_only, "deltas")):
        meta = _file_metadata(save_patch(patch, tmp_path / "p.safetensors"))
        assert (meta["erasure.format_version"], meta["erasure.requires"]) == ("2", requires)
        assert load_patch(tmp_path / "p.safetensors").required_features() == requires.split(",")


V2 = {"erasure.format_version": "2", "erasure.layers": json.dumps([LAYER])}
MEMORY = {"erasure.memory.k": torch.zeros(2, 4), "erasure.memory.v": torch.zeros(2, 4)}


def test_a_file_needing_an_unknown_feature_is_refused_naming_it(tmp_path):
    path = tmp_path / "new.safetensors"
    save_file({**MEMORY, "erasure.steer.middle_block.1.transformer_blocks.0.attn2.dir": torch.zeros(1, 4)},
              str(path), metadata={**V2, "erasure.format_version": "3", "erasure.requires": "memory, steer,halo"})
    with pytest.raises(PatchError) as info:
        load_patch(path)
    assert str(info.value) == ("new.safetensors needs features the installed concept-erasure does not know: "
                               "steer, halo; update concept-erasure to load it")
    # a hostile feature name still gives one short line
    save_file(MEMORY, str(path), metadata={**V2, "erasure.requires": "memory,evil\nname" + "x" * 10_000})
    with pytest.raises(PatchError, match=r"does not know: 'evil\\nname") as info:
        load_patch(path)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


@pytest.mark.parametrize("version, requires, message", [
    ("2", None, "format 2 without erasure.requires"),
    ("10", None, "format 10 without erasure.requires"),
    ("two", "memory", "is not a format number"),
    ("0", "memory", "is not a format number"),
])
def test_format_versions_after_1_must_declare_their_features(tmp_path, version, requires, message):
    path = tmp_path / "p.safetensors"
    meta = {**V2, "erasure.format_version": version}
    if requires is not None:
        meta["erasure.requires"] = requires
    save_file(MEMORY, str(path), metadata=meta)
    with pytest.raises(PatchError, match=message):
        load_patch(path)


def test_a_later_version_with_known_features_loads(tmp_path):
    path = tmp_path / "p.safetensors"
    save_file(MEMORY, str(path), metadata={**V2, "erasure.format_version": "7", "erasure.requires": "memory"})
    assert load_patch(path).memory.tokens == 2


@pytest.mark.parametrize("keys, requires", [
    ({"erasure.steer.x": torch.zeros(1)}, "memory"),  # belongs to no known feature
    ({"model.diffusion_model.evil": torch.zeros(1)}, "memory,deltas"),
    ({"lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.diff": torch.zeros(16, 4)}, "memory"),  # undeclared
])
def test_tensor_keys_outside_the_declared_features_are_refused(tmp_path, keys, requires):
    path = tmp_path / "p.safetensors"
    save_file({**MEMORY, **keys}, str(path), metadata={**V2, "erasure.requires": requires})
    with pytest.raises(PatchError, match="unknown key") as info:
        load_patch(path)
    assert repr(next(iter(keys))) in str(info.value)


def _fixture_maker():
    spec = importlib.util.spec_from_file_location("make_patch_v1", FIXTURES / "make_patch_v1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_format_1_file_still_loads_and_applies(tmp_path, toy_model):
    import erasure_core.patch as current

    assert V1_FIXTURE.stat().st_size < 8 * 1024
    stored = _file_metadata(V1_FIXTURE)
    assert stored["erasure.format_version"] == "1" and "erasure.requires" not in stored
    patch = load_patch(V1_FIXTURE)
    expected = _fixture_maker().v1_patch(current)  # what the fixture was written from, built with today's classes
    assert patch.tensors().keys() == expected.tensors().keys()
    for key, tensor in expected.tensors().items():
        assert patch.tensors()[key].dtype == tensor.dtype and torch.equal(patch.tensors()[key], tensor), key
    assert patch.required_features() == ["memory", "deltas"]
    rewritten = patch.metadata()
    assert (rewritten.pop("erasure.format_version"), rewritten.pop("erasure.requires")) == ("2", "memory,deltas")
    assert rewritten == {k: v for k, v in stored.items() if k != "erasure.format_version"}
    assert (patch.concepts, patch.seed, patch.deltas[f"{LAYER}.to_v"].alpha) == (["circle"], 3, 2.0)
    # saved again, it becomes a format-2 file with the same content
    again = load_patch(save_patch(patch, tmp_path / "v2.safetensors"))
    assert _file_metadata(tmp_path / "v2.safetensors")["erasure.requires"] == "memory,deltas"
    assert all(torch.equal(again.tensors()[k], t) for k, t in patch.tensors().items())
    # and it still applies to the toy model it was made for
    check_compatible(patch, toy_model.context_dim, toy_model.layer_names(), weight_shapes=toy_model.weight_shapes())
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, *toy_model.sample_shape, generator=g), torch.tensor([500])
    cond = toy_model.encode(["a red circle"])
    with torch.no_grad():
        plain = toy_model.predict_noise(x, t, cond)
        handle = toy_model.attach([(patch, 1.0)])
        try:
            patched = toy_model.predict_noise(x, t, cond)
        finally:
            handle.detach()
        assert torch.equal(toy_model.predict_noise(x, t, cond), plain)
    assert (patched - plain).abs().max() > 1e-3


STEER_KEY = "erasure.steer.middle_block.1.transformer_blocks.0.attn2.dir"


def _check_steer(tensors, patch, name):
    for key, t in tensors.items():
        if t.dim() != 2 or t.shape[1] != (patch.context_dim or t.shape[1]):
            raise PatchError(f"{name}: {key} must be (n x {patch.context_dim})")


@pytest.fixture
def steer_feature():
    """A throwaway feature, the way a later method would add one: its key grammar and its validation."""
    feature = register_feature("steer", r"erasure\.steer\.(.+attn2)\.dir", _check_steer)
    try:
        yield feature
    finally:
        unregister_feature("steer")
    assert "steer" not in KNOWN_FEATURES


def test_a_registered_feature_loads_files_that_need_it(tmp_path, steer_feature):
    patch = make_patch()
    patch.extra = {"steer": {STEER_KEY: torch.randn(3, 32)}}
    path = save_patch(patch, tmp_path / "steer.safetensors")
    assert _file_metadata(path)["erasure.requires"] == "memory,deltas,steer"
    back = load_patch(path)
    assert back.extra.keys() == {"steer"}
    assert torch.equal(back.extra["steer"][STEER_KEY], patch.extra["steer"][STEER_KEY])
    assert torch.equal(back.memory.k, patch.memory.k) and back.metadata() == patch.metadata()
    # its validation runs on save and on load
    patch.extra = {"steer": {STEER_KEY: torch.randn(3, 8)}}
    with pytest.raises(PatchError, match="must be .n x 32."):
        save_patch(patch, tmp_path / "bad.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({**patch.tensors(), STEER_KEY: torch.randn(3, 8)}, str(bad), metadata=patch.metadata())
    with pytest.raises(PatchError, match="must be .n x 32."):
        load_patch(bad)
    patch.extra = {"steer": {"erasure.steer.oops": torch.randn(3, 32)}}  # outside its key grammar
    with pytest.raises(PatchError, match="not a tensor key of feature steer"):
        save_patch(patch, tmp_path / "bad.safetensors")
    # a patch may be only that feature
    alone = load_patch(save_patch(ErasurePatch(layers=[], extra={"steer": {STEER_KEY: torch.randn(1, 16)}}),
                                  tmp_path / "alone.safetensors"))
    assert (alone.memory, alone.deltas, alone.required_features()) == (None, {}, ["steer"])
    # once unregistered, the same file is refused as needing an unknown feature
    unregister_feature("steer")
    with pytest.raises(PatchError, match="does not know: steer; update concept-erasure"):
        load_patch(path)
    register_feature("steer", r"erasure\.steer\.(.+attn2)\.dir", _check_steer)


def test_feature_registration_rules(steer_feature):
    with pytest.raises(ValueError, match="already known"):
        register_feature("steer", r"erasure\.steer\..+")
    with pytest.raises(ValueError, match="part of the format"):
        unregister_feature("memory")
    with pytest.raises(ValueError, match="feature name"):
        register_feature("Bad Name", r"x")
    with pytest.raises(PatchError, match="not a registered feature"):
        save_patch(ErasurePatch(layers=[], extra={"halo": {}}), "unused.safetensors")


def test_a_validator_that_crashes_on_a_hostile_file_gives_a_one_line_reason(tmp_path):
    def fragile(tensors, patch, name):
        next(iter(tensors.values()))[5]  # IndexError on a tensor shorter than it expects

    register_feature("fragile", r"erasure\.fragile\.x", fragile)
    try:
        path = tmp_path / "f.safetensors"
        save_file({**MEMORY, "erasure.fragile.x": torch.zeros(2)}, str(path),
                  metadata={**V2, "erasure.requires": "memory,fragile"})
        with pytest.raises(PatchError, match="fragile tensors are invalid") as info:
            load_patch(path)
        assert "\n" not in str(info.value)
    finally:
        unregister_feature("fragile")
