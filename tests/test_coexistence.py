"""Erasure patches next to what else a user has on the model: a LoRA loaded with diffusers' `load_lora_weights`
(peft wrappers around the projections), a custom attention processor (IP-Adapter's kind), an attention mask.

The toy model's weights, its own copy per module (loading a LoRA changes the UNet's modules); references are
written by hand: a deep copy whose weights have the LoRA and the deltas merged in, and whose to_k / to_v append
the memory to their input before the plain Linear."""
import copy
import os

import pytest
import torch
import torch.nn as nn

from erasure_core.injection import attached
from erasure_core.layers import attn2_layers, base_layer, unet_modules
from erasure_core.patch import ConceptMemory, ErasurePatch, WeightDelta, model_fingerprint

pytest.importorskip("peft")

RANK = 4


def toy():
    from erasure_core.toy.model import load_toy_model

    return load_toy_model()


def inputs(unet, seed=3):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    return (torch.randn(2, unet.config.in_channels, size, size, generator=g), torch.tensor([40, 650]),
            torch.randn(2, 16, unet.config.cross_attention_dim, generator=g))


def run(unet, x, t, c, **kwargs):
    with torch.no_grad():
        return unet(x, t, c, **kwargs).sample


def trained_looking_patch(unet, seed=1, m=3):
    """Memory on every attn2 layer and deltas on projections (some of them LoRA'd too) and outside attention."""
    layers = attn2_layers(unet)
    names = [layer.canonical for layer in layers]
    dim = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(seed)
    patch = ErasurePatch(layers=names, memory=ConceptMemory(torch.randn(m, dim, generator=g),
                                                            torch.randn(m, dim, generator=g)))
    paths = unet_modules(unet)
    picked = [f"{names[0]}.to_k", f"{names[-1]}.to_v", f"{names[1]}.to_out.0",
              next(n for n in paths if n.endswith("attn1.to_k")), next(n for n in paths if n.endswith("in_layers.2"))]
    for name in picked:
        shape = base_layer(unet.get_submodule(paths[name])).weight.shape
        patch.deltas[name] = WeightDelta(full=0.05 * torch.randn(*shape, generator=g))
    return patch


def lora_state_dict(unet, seed=7):
    """A LoRA in diffusers' peft format on attn1's and attn2's to_k / to_v and attn2's to_q, nonzero A and B."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v", "attn2.to_q")):
            sd[f"unet.{name}.lora_A.weight"] = 0.2 * torch.randn(RANK, module.in_features, generator=g)
            sd[f"unet.{name}.lora_B.weight"] = 0.2 * torch.randn(module.out_features, RANK, generator=g)
    return sd


class AppendingLinear(nn.Module):
    """Reference for a memory-carrying projection: linear([x ; memory])."""

    def __init__(self, linear: nn.Linear, memory: torch.Tensor) -> None:
        super().__init__()
        self.linear, self.memory = linear, memory

    def forward(self, x):
        return self.linear(torch.cat([x, self.memory.expand(x.shape[0], -1, -1)], dim=1))


def reference_unet(base, patches, lora=None):
    """A deep copy of the plain UNet: LoRA (B·A, scaling 1: no alphas) and s·ΔW merged into the weights, and every
    attn2's to_k / to_v replaced by AppendingLinear with the memories concatenated (values scaled by s)."""
    ref = copy.deepcopy(base)
    paths = unet_modules(ref)
    with torch.no_grad():
        for key, a in (lora or {}).items():
            if key.endswith("lora_A.weight"):
                name = key[len("unet."):-len(".lora_A.weight")]
                ref.get_submodule(name).weight += lora[key.replace("lora_A", "lora_B")] @ a
        for patch, s in patches:
            for name, delta in patch.deltas.items():
                ref.get_submodule(paths[name]).weight += s * delta.weight()
    for layer in attn2_layers(ref):
        ks = [patch.memory_for(layer.canonical) for patch, _ in patches]
        if not any(mem is not None for mem in ks):
            continue
        k = torch.cat([mem.k for mem in ks if mem is not None])
        v = torch.cat([s * mem.v for (_, s), mem in zip(patches, ks) if mem is not None])
        attn = ref.get_submodule(layer.diffusers)
        attn.to_k, attn.to_v = AppendingLinear(attn.to_k, k), AppendingLinear(attn.to_v, v)
    return ref


@pytest.fixture(scope="module")
def lora_pipeline(tmp_path_factory):
    """A StableDiffusionPipeline over the toy model (a tiny random VAE), a LoRA loaded from a .safetensors file
    with pipe.load_lora_weights; also a plain copy of the UNet from before the LoRA."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model = toy()
    plain = copy.deepcopy(model.unet)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=8, sample_size=32)
    scheduler = DDIMScheduler.from_config(model.scheduler_config, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    lora = lora_state_dict(model.unet)
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(lora, str(path))
    pipe.load_lora_weights(str(path))
    wrapped = pipe.unet.get_submodule(f"{attn2_layers(pipe.unet)[0].diffusers}.to_k")
    assert "base_layer" in wrapped._modules and "lora_A" in wrapped._modules  # peft wrapped the projection
    return pipe, plain, lora


def test_a_loaded_lora_keeps_its_effect_while_a_patch_is_attached(lora_pipeline):
    pipe, plain, lora = lora_pipeline
    unet = pipe.unet
    x, t, c = inputs(unet)
    assert not torch.allclose(run(unet, x, t, c), run(plain, x, t, c), atol=1e-3)  # the LoRA does something
    assert torch.allclose(run(unet, x, t, c), run(reference_unet(plain, [], lora), x, t, c), atol=1e-5)
    patch = trained_looking_patch(unet)
    second = ErasurePatch(layers=[n.canonical for n in attn2_layers(unet)][1:3],
                          memory=ConceptMemory(0.5 * torch.ones(2, 128), -0.5 * torch.ones(2, 128)))
    for patches in ([(patch, 1.0)], [(patch, 0.6), (second, 1.0)]):
        with attached(unet, patches):
            got = run(unet, x, t, c)
        want = run(reference_unet(plain, patches, lora), x, t, c)
        without_lora = run(reference_unet(plain, patches), x, t, c)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
        assert (got - without_lora).abs().max() > 1e-3  # the LoRA saw the memory tokens and still acts


def test_strength_zero_and_detach_are_bit_identical_with_a_lora(lora_pipeline):
    pipe, _, _ = lora_pipeline
    unet = pipe.unet
    x, t, c = inputs(unet, seed=5)
    before = run(unet, x, t, c)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules())
    patch = trained_looking_patch(unet, seed=2)
    with attached(unet, [(patch, 0.0)]):
        assert torch.equal(run(unet, x, t, c), before)
    with attached(unet, [(patch, 1.0)]):
        assert not torch.allclose(run(unet, x, t, c), before, atol=1e-3)
    assert torch.equal(run(unet, x, t, c), before)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules()) == hooks
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())


def test_layers_and_fingerprint_see_through_the_lora(lora_pipeline):
    pipe, plain, _ = lora_pipeline
    unet = pipe.unet
    assert attn2_layers(unet) == attn2_layers(plain)
    assert list(unet_modules(unet).items()) == list(unet_modules(plain).items())
    assert not any(".base_layer" in path or ".lora_" in path for path in unet_modules(unet).values())
    assert model_fingerprint(unet) == model_fingerprint(plain)  # the LoRA is not the base model


class TemperatureProcessor:
    """A user's own processor (as IP-Adapter's is): attention with a temperature, by hand, counting its calls."""

    def __init__(self, temperature: float = 0.5) -> None:
        self.temperature, self.calls = temperature, 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        self.calls += 1
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        b, h = q.shape[0], attn.heads
        q, k, v = (z.view(b, -1, h, z.shape[-1] // h).transpose(1, 2) for z in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) * attn.scale / self.temperature, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, -1, q.shape[-1] * h)
        return attn.to_out[1](attn.to_out[0](out))


def test_a_custom_attention_processor_stays_and_sees_the_memory():
    model = toy()
    unet = model.unet
    names = [layer.diffusers for layer in attn2_layers(unet)]
    x, t, c = inputs(unet, seed=9)
    plain = run(unet, x, t, c)
    processors = {name: TemperatureProcessor() for name in names}
    for name, proc in processors.items():
        unet.get_submodule(name).set_processor(proc)
    custom = run(unet, x, t, c)
    assert (custom - plain).abs().max() > 1e-3  # the processor matters
    patch = trained_looking_patch(unet, seed=3)
    reference = reference_unet(unet, [(patch, 0.8)])  # deep copy: its processors are copies of the user's
    want = run(reference, x, t, c)
    calls = sum(p.calls for p in processors.values())
    with attached(unet, [(patch, 0.8)]):
        assert all(unet.get_submodule(name).processor is processors[name] for name in names)
        got = run(unet, x, t, c)
    assert sum(p.calls for p in processors.values()) == calls + len(names)  # called while attached
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert (got - custom).abs().max() > 1e-3
    assert all(unet.get_submodule(name).processor is processors[name] for name in names)  # still there
    assert torch.equal(run(unet, x, t, c), custom)


def test_an_encoder_attention_mask_keeps_the_memory_visible():
    """diffusers' encoder_attention_mask hides context tokens; the appended memory stays visible, so masking
    the last token equals dropping it."""
    model = toy()
    unet = model.unet
    x, t, c = inputs(unet, seed=11)
    mask = torch.ones(2, c.shape[1])
    mask[:, -3:] = 0
    patch = trained_looking_patch(unet, seed=4)
    with attached(unet, [(patch, 1.0)]):
        masked = run(unet, x, t, c, encoder_attention_mask=mask)
        dropped = run(unet, x, t, c[:, :-3])
        full = run(unet, x, t, c)
    assert torch.allclose(masked, dropped, atol=1e-5), (masked - dropped).abs().max()
    assert (masked - full).abs().max() > 1e-4
    assert torch.allclose(run(reference_unet(unet, [(patch, 1.0)]), x, t, c[:, :-3]), dropped, atol=1e-5)
    assert not any("prepare_attention_mask" in m.__dict__ for m in unet.modules())


def test_a_delta_on_a_lora_wrapped_conv_adds_to_the_wrapper():
    """ESD-u's deltas on layers a LoRA wraps (a conv here): ΔW·x is added to the wrapper's output with the base
    conv's stride and padding, the same as a copy whose base weight was edited."""
    from peft import LoraConfig

    model = toy()
    unet = model.unet
    unet.add_adapter(LoraConfig(r=2, target_modules=["conv1"], init_lora_weights=False))
    paths = unet_modules(unet)
    name = next(n for n in paths if n.endswith("in_layers.2"))
    wrapper = unet.get_submodule(paths[name])
    assert "base_layer" in wrapper._modules
    g = torch.Generator().manual_seed(12)
    delta = WeightDelta(full=0.05 * torch.randn(*base_layer(wrapper).weight.shape, generator=g))
    patch = ErasurePatch(layers=[], method="esd-u", deltas={name: delta})
    x, t, c = inputs(unet, seed=13)
    edited = copy.deepcopy(unet)
    with torch.no_grad():
        base_layer(edited.get_submodule(paths[name])).weight += 0.5 * delta.weight()
    with attached(unet, [(patch, 0.5)]):
        got = run(unet, x, t, c)
    want = run(edited, x, t, c)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert (got - run(unet, x, t, c)).abs().max() > 1e-4
