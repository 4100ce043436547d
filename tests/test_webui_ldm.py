"""The A1111 / Forge backend (erasure_core.backends.ldm) against contract fakes of ldm's CrossAttention and
Forge's unet patcher, on the same weights as erasure_core.injection's diffusers path (the same hooks)."""
import pytest
import torch
from unets import sd1_unet, toy_unet
from webui_fakes import (FakeLatentDiffusion, KModel, LdmUNet, UnetPatcher, block_of, checksum, hook_counts,
                         one_thread)

from erasure_core.backends.comfy import MemoryAttn2Patch, address_from_extra_options, comfy_address
from erasure_core.backends.ldm import LdmDenoiser, apply_forge, attach_hooks, attn2_modules, modules_fingerprint
from erasure_core.injection import attached
from erasure_core.layers import attn2_layers
from erasure_core.patch import ConceptMemory, ErasurePatch, PatchError, WeightDelta, model_fingerprint


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


class Case:
    """A diffusers UNet, its LDM view (same projection modules) and fixed inputs."""

    def __init__(self, unet, channels, size, tokens=5):
        self.unet = unet.eval().requires_grad_(False)
        self.ldm = LdmUNet(self.unet)  # routes the UNet's attn2 through ldm-style CrossAttention
        self.modules = attn2_modules(self.ldm)
        self.dim = unet.config.cross_attention_dim
        self.names = [layer.canonical for layer in attn2_layers(unet)]
        g = torch.Generator().manual_seed(3)
        self.inputs = (torch.randn(2, channels, size, size, generator=g), torch.tensor([10, 700]),
                       torch.randn(2, tokens, self.dim, generator=g))

    def run(self):
        with torch.no_grad():
            return self.unet(*self.inputs).sample

    def patch(self, layers, seed, m=3, deltas=()):
        g = torch.Generator().manual_seed(seed)
        patch = ErasurePatch(layers=layers, memory=ConceptMemory(torch.randn(m, self.dim, generator=g),
                                                                 torch.randn(m, self.dim, generator=g)))
        for i, module in enumerate(deltas):
            shape = self.unet.get_submodule(self._diffusers(module)).weight.shape
            if i % 2:
                patch.deltas[module] = WeightDelta(down=0.3 * torch.randn(2, shape[1], generator=g),
                                                   up=0.3 * torch.randn(shape[0], 2, generator=g), alpha=1.0)
            else:
                patch.deltas[module] = WeightDelta(full=0.1 * torch.randn(*shape, generator=g))
        return patch

    def _diffusers(self, module):
        layer, proj = module.split(".attn2.")
        entry = next(e for e in attn2_layers(self.unet) if e.canonical == layer + ".attn2")
        return f"{entry.diffusers}.{proj}"


@pytest.fixture(scope="module", params=["sd1", "toy"])
def case(request):
    return Case(sd1_unet(), 4, 8) if request.param == "sd1" else Case(toy_unet(), 3, 32)


def two_patches(case):
    first = case.patch(case.names, 1, deltas=[f"{case.names[0]}.to_k", f"{case.names[-1]}.to_v",
                                              f"{case.names[-1]}.to_q", f"{case.names[1]}.to_out.0"])
    second = case.patch([n for n in case.names if n.startswith("middle_block")], 2, m=2,
                        deltas=[f"{case.names[-1]}.to_v"])
    return [(first, 0.7), (second, 1.0)]


def test_hooks_match_the_diffusers_injection_on_the_same_weights(case):
    patches = two_patches(case)
    with attached(case.unet, patches):  # the diffusers path: hooks on the projections the bridges share
        expected = case.run()
    before = checksum(case.unet)
    handle = attach_hooks(case.modules, patches)
    assert hook_counts(case.ldm)[0] > 0 and hook_counts(case.ldm)[1] > 0
    got = case.run()
    handle.detach()
    assert (got - expected).abs().max() < 1e-5
    assert hook_counts(case.ldm) == (0, 0) and not handle.attached
    assert checksum(case.unet) == before


def test_strength_zero_and_detach_are_bit_identical(case):
    plain = case.run()
    with torch.no_grad():
        handle = attach_hooks(case.modules, [(p, 0.0) for p, _ in two_patches(case)])
        assert hook_counts(case.ldm) == (0, 0)  # nothing to do at strength 0
        assert torch.equal(case.run(), plain)
        handle.detach()
        handle = attach_hooks(case.modules, two_patches(case))
        assert not torch.equal(case.run(), plain)
        handle.detach()
        handle.detach()  # twice is harmless
    assert torch.equal(case.run(), plain) and hook_counts(case.ldm) == (0, 0)


def test_a_bad_patch_attaches_nothing(case):
    good = case.patch(case.names, 1)
    bad = ErasurePatch(layers=case.names, memory=ConceptMemory(torch.zeros(2, case.dim + 1),
                                                               torch.zeros(2, case.dim + 1)))
    with pytest.raises(PatchError, match="text context"):
        attach_hooks(case.modules, [(good, 1.0), (bad, 1.0)])
    with pytest.raises(PatchError, match="finite"):
        attach_hooks(case.modules, [(good, float("nan"))])
    assert hook_counts(case.ldm) == (0, 0)


def test_memory_keeps_its_share_when_the_context_is_repeated_in_77_token_chunks():
    case = Case(sd1_unet(), 4, 8, tokens=77)
    patches = [(case.patch(case.names, 4, m=4), 1.0)]
    single = case.run()
    handle = attach_hooks(case.modules, patches)
    once = case.run()
    x, t, c = case.inputs
    case.inputs = (x, t, c.repeat(1, 2, 1))  # what Forge / ComfyUI do to batch a shorter cond with a longer one
    twice = case.run()
    handle.detach()
    assert torch.allclose(once, twice, atol=1e-5) and not torch.allclose(once, single, atol=1e-3)


def test_forge_extra_options_name_every_layer():
    """The fake's extra_options (Forge's: block, block_index = the block inside its spatial transformer) address
    each layer the way the memory patch reads them."""
    for unet in (sd1_unet(), toy_unet()):
        for name in (layer.canonical for layer in attn2_layers(unet)):
            block, block_index = block_of(name)
            extra = {"block": block, "block_index": block_index, "transformer_index": 3}
            assert address_from_extra_options(extra) == comfy_address(name)


def test_forge_patcher_path_matches_the_diffusers_injection(case):
    patches = two_patches(case)
    with attached(case.unet, patches):
        expected = case.run()
    patcher = UnetPatcher(KModel(case.ldm))
    before = checksum(case.unet)
    clone = apply_forge(patcher, patches)
    assert patcher.model_options == {"transformer_options": {}} and patcher.lora_patches == {}
    clone = clone.clone()  # Forge clones again; the patch must survive the deep copy
    with torch.no_grad():
        got = clone.apply_model(*case.inputs)
        plain = patcher.apply_model(*case.inputs)
    assert (got - expected).abs().max() < 1e-5
    assert torch.equal(plain, case.run())
    assert checksum(case.unet) == before and hook_counts(case.ldm) == (0, 0)


def test_forge_patcher_carrying_erasure_memory_gets_one_merged_patch(case):
    """Forge takes the ComfyUI backend's path: a second apply_forge merges into the memory patch already there
    (next to another extension's attn2 patch), and deltas at the same strength keep separate entries."""
    first, second = (patch for patch, _ in two_patches(case))
    with attached(case.unet, [(first, 0.7), (second, 0.7)]):
        expected = case.run()
    seen = []

    def other_extension(n, context, value, extra_options):
        seen.append(context.shape[1])
        return n, context, value

    patcher = UnetPatcher(KModel(case.ldm))
    patcher.set_model_attn2_patch(other_extension)
    once = apply_forge(patcher, [(first, 0.7)])
    twice = apply_forge(once, [(second, 0.7)])
    listed = twice.model_options["transformer_options"]["patches"]["attn2_patch"]
    assert len(listed) == 2 and listed[0] is other_extension and isinstance(listed[1], MemoryAttn2Patch)
    assert len(once.model_options["transformer_options"]["patches"]["attn2_patch"]) == 2  # once is untouched
    assert len(twice.lora_patches) == 2 and len(once.lora_patches) == 1  # no entry replaced another
    with torch.no_grad():
        got = twice.clone().apply_model(*case.inputs)
        plain = patcher.apply_model(*case.inputs)
        zero = apply_forge(patcher, [(first, 0.0), (second, 0.0)]).clone().apply_model(*case.inputs)
    assert (got - expected).abs().max() < 1e-5
    assert seen and set(seen) == {case.inputs[2].shape[1]}  # the other extension sees the plain text context
    assert torch.equal(zero, plain) and torch.equal(plain, case.run())


def esd_u_patch(case, seed=4):
    """Deltas outside cross-attention (ESD-u): a conv of a ResBlock, the upsampler's conv, attn1 and the FFN."""
    from erasure_core.layers import unet_modules

    paths = unet_modules(case.unet)
    names = [next(n for n in paths if n.endswith("in_layers.2")), next(n for n in paths if n.endswith(".conv")),
             next(n for n in paths if n.endswith("attn1.to_k")), next(n for n in paths if n.endswith("ff.net.2"))]
    g = torch.Generator().manual_seed(seed)
    return ErasurePatch(layers=[], method="esd-u", deltas={
        n: WeightDelta(full=0.05 * torch.randn(*case.unet.get_submodule(paths[n]).weight.shape, generator=g))
        for n in names})


def test_deltas_outside_cross_attention_match_diffusers_in_a1111_and_forge(case):
    from erasure_core.layers import weight_modules

    patches = [(esd_u_patch(case), 0.8), two_patches(case)[0]]
    with attached(case.unet, patches):
        expected = case.run()
    plain, before = case.run(), checksum(case.unet)
    weights = weight_modules(case.ldm)
    handle = attach_hooks(case.modules, patches, weights=weights)
    got = case.run()
    handle.detach()
    assert (got - expected).abs().max() < 1e-5 and (got - plain).abs().max() > 1e-3
    assert torch.equal(case.run(), plain) and checksum(case.unet) == before
    with pytest.raises(PatchError, match="lacks"):  # without the other layers, such deltas cannot be placed
        attach_hooks(case.modules, patches)
    assert torch.equal(case.run(), plain)
    patcher = UnetPatcher(KModel(case.ldm))
    with torch.no_grad():
        forge = apply_forge(patcher, patches).clone().apply_model(*case.inputs)
    assert (forge - expected).abs().max() < 1e-5
    assert checksum(case.unet) == before


def test_forge_dropped_delta_keys_are_an_error(case):
    class Dropping(UnetPatcher):
        def add_patches(self, *, filename, patches, **kwargs):
            return set()

        def clone(self):
            return Dropping(self.model)

    patch = case.patch(case.names, 1, deltas=[f"{case.names[0]}.to_k"])
    with pytest.raises(PatchError, match="did not take"):
        apply_forge(Dropping(KModel(case.ldm)), [(patch, 1.0)])


@pytest.fixture(scope="module")
def toy_pair():
    from erasure_core.toy.model import load_toy_model

    toy = load_toy_model()  # its own copy: the fake re-routes its attention
    return toy, FakeLatentDiffusion(toy)


def test_ldm_denoiser_is_the_same_model_behind_the_protocol(toy_pair):
    toy, sd_model = toy_pair
    model = LdmDenoiser(sd_model, resolution=32, latent_scale=1)
    assert model.layer_names() == [layer.canonical for layer in attn2_layers(toy.unet)]
    assert model.fingerprint() == model_fingerprint(toy.unet) == modules_fingerprint(model.modules)
    assert model.context_dim == 128 and model.sample_shape == (3, 32, 32) and model.name == "toy"
    assert model.prompt_length("a red circle with stripes") == toy.prompt_length("a red circle with stripes")
    cond = model.encode(["a circle", ""])
    assert not cond.context.is_inference()
    assert torch.allclose(cond.context, toy.encode(["a circle", ""]).context)
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([50, 900])
    with torch.no_grad():
        assert torch.allclose(model.predict_noise(x, t, cond), toy.predict_noise(x, t, cond), atol=1e-5)
    a, b = model.scheduler(), toy.scheduler()
    assert torch.allclose(a.alphas_cumprod, b.alphas_cumprod, atol=1e-6)
    weights = model.projection_weights()
    assert len(weights) == 4 * len(model.layer_names()) and all(not w.is_inference() for w in weights.values())


def test_training_through_the_ldm_backend_leaves_the_model_bit_identical(toy_pair):
    from erasure_core.denoiser import patched
    from erasure_core.engine import TrainConfig
    from erasure_core.methods import train_patch

    toy, sd_model = toy_pair
    model = LdmDenoiser(sd_model, resolution=32, latent_scale=1)
    before = checksum(sd_model)
    grads = [p.requires_grad for p in sd_model.parameters()]
    assert any(grads)  # as in A1111: the UNet's parameters require grad
    seen = []
    config = TrainConfig(concept="a circle", method="memory", steps=4, tokens=2, batch=2, cache_seeds=1,
                         cache_steps=3, seed=0)
    with model.frozen():
        result = train_patch(model, config, progress=lambda *a, stage: seen.append((stage, hook_counts(sd_model))))
    assert len(result.losses) == 4 and [s for s, _ in seen].count("training") == 4
    assert checksum(sd_model) == before and [p.requires_grad for p in sd_model.parameters()] == grads
    assert all(p.grad is None for p in sd_model.parameters())
    assert hook_counts(sd_model) == (0, 0)
    patch = result.patch
    assert patch.base_fingerprint == model_fingerprint(toy.unet) and patch.memory.k.shape == (2, 128)
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([100, 600])
    cond = model.encode(["a circle", "a circle"])
    with torch.no_grad(), patched(model, [(patch, 1.0)]):
        through_hooks = model.predict_noise(x, t, cond)
    with torch.no_grad(), attached(toy.unet, [(patch, 1.0)]):
        through_diffusers = toy.predict_noise(x, t, cond)
    assert (through_hooks - through_diffusers).abs().max() < 1e-5
    assert checksum(sd_model) == before


def test_a1111_hooks_apply_a_saeuron_patch_as_the_diffusers_backend_does():
    """A1111's UNet has the LDM layout (the ComfyUI fake's UNetModel stands in for it, on the same weights): the
    block hook reads the timesteps the UNet is called with; strength 0 and detach leave it bit-identical; Forge's
    unet patcher, which cannot hook a block, refuses the patch in words."""
    from comfy_fakes import build_comfy_model
    from conftest import random_sae_patch

    from erasure_core.layers import weight_modules

    unet = sd1_unet().eval().requires_grad_(False)
    ldm_unet = build_comfy_model(unet).diffusion_model
    patch = random_sae_patch(32, "output_blocks.4.1", seed=4)
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([450, 750]), torch.randn(2, 5, 32, generator=g)
    modules, weights = attn2_modules(ldm_unet), weight_modules(ldm_unet)
    with torch.no_grad():
        plain = ldm_unet(x, t, context=ctx)
        with attached(unet, [(patch, 0.6)]):
            want = unet(x, t, ctx).sample
        handle = attach_hooks(modules, [(patch, 0.6)], weights=weights, unet=ldm_unet)
        got = ldm_unet(x, t, context=ctx)
        handle.detach()
        assert torch.equal(ldm_unet(x, t, context=ctx), plain)
        zero = attach_hooks(modules, [(patch, 0.0)], weights=weights, unet=ldm_unet)
        assert torch.equal(ldm_unet(x, t, context=ctx), plain)
        zero.detach()
    assert (got - want).abs().max() < 1e-5 and (got - plain).abs().max() > 1e-3
    with pytest.raises(PatchError, match="Forge's unet patcher cannot"):
        apply_forge(UnetPatcher(KModel(LdmUNet(unet))), [(patch, 1.0)])


def test_a1111_hooks_apply_a_dumo_patch_as_the_diffusers_backend_does():
    """The DuMo branch on A1111's LDM UNet (the ComfyUI fake's UNetModel on the same weights): the UNet's
    pre-hook reads x, timesteps and context as A1111 passes them; strength 0 and detach are bit-identical;
    Forge refuses in words."""
    from comfy_fakes import build_comfy_model
    from conftest import random_branch_patch

    from erasure_core.layers import weight_modules

    unet = sd1_unet().eval().requires_grad_(False)
    ldm_unet = build_comfy_model(unet).diffusion_model
    patch = random_branch_patch(unet, seed=4)
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([450, 750]), torch.randn(2, 5, 32, generator=g)
    modules, weights = attn2_modules(ldm_unet), weight_modules(ldm_unet)
    with torch.no_grad():
        plain = ldm_unet(x, t, context=ctx)
        with attached(unet, [(patch, 0.6)]):
            want = unet(x, t, ctx).sample
        handle = attach_hooks(modules, [(patch, 0.6)], weights=weights, unet=ldm_unet)
        got = ldm_unet(x, t, context=ctx)
        handle.detach()
        assert torch.equal(ldm_unet(x, t, context=ctx), plain)
        zero = attach_hooks(modules, [(patch, 0.0)], weights=weights, unet=ldm_unet)
        assert torch.equal(ldm_unet(x, t, context=ctx), plain)
        zero.detach()
    assert (got - want).abs().max() < 1e-5 and (got - plain).abs().max() > 1e-3
    with pytest.raises(PatchError, match="Forge's unet patcher cannot"):
        apply_forge(UnetPatcher(KModel(LdmUNet(unet))), [(patch, 1.0)])
