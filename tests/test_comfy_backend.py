"""The ComfyUI backend against contract fakes of ComfyUI (tests/comfy_fakes), compared with the diffusers backend.

Random tiny UNets in SD1.x layout (16 attn2 layers) and the toy model; everything fp32 on CPU."""
import copy
import hashlib

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from unets import sd1_unet, toy_unet

from comfy_fakes.host import one_thread  # noqa: F401  (autouse fixture)
from comfy_fakes import (BasicTransformerBlock as ComfyBlock, FakeModelPatcher, ModelManagement, build_comfy_model,
                         calc_cond_batch)
from conftest import random_patch
from erasure_core.backends.comfy import (ComfyDenoiser, MemoryAttn2Patch, address_from_extra_options, apply_patches,
                                         attn2_modules, comfy_address)
from erasure_core.injection import InjectionPlan, LayerInjection, attach_plan, attached
from erasure_core.layers import attn2_layers, select_layers, to_diffusers
from erasure_core.padding import padding_repeats
from erasure_core.patch import ConceptMemory, ErasurePatch, PatchError, WeightDelta, model_fingerprint


def checksum(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def make_patch(unet, layers, seed, m=3, deltas=None, fingerprint=""):
    """Memory on `layers`; deltas {projection module: "full" | "lowrank"}."""
    names = attn2_layers(unet)
    return random_patch(layers, unet.config.cross_attention_dim, seed, m, deltas, fingerprint=fingerprint,
                        weight_shape=lambda module: unet.get_submodule(to_diffusers(module, names)).weight.shape)


@pytest.fixture(scope="module")
def sd1():
    unet = sd1_unet().eval().requires_grad_(False)
    names = [layer.canonical for layer in attn2_layers(unet)]
    return unet, names


def sd1_inputs(unet, n=2, tokens=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    ctx = torch.randn(n, tokens, unet.config.cross_attention_dim, generator=g)
    return x, ctx


# -- the fakes themselves --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [sd1_unet, toy_unet], ids=["sd1", "toy"])
def test_fake_comfy_unet_equals_the_diffusers_unet(make):
    unet = make().eval().requires_grad_(False)
    model = build_comfy_model(unet)
    assert all(p.is_inference() for p in model.parameters())  # as ComfyUI loads them
    size, channels = unet.config.sample_size, unet.config.in_channels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, size, size, generator=g)
    ctx = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        assert torch.allclose(model.diffusion_model(x, t, context=ctx, transformer_options={}), unet(x, t, ctx).sample,
                              atol=1e-6)
    expected = [layer.canonical for layer in attn2_layers(unet)]
    assert list(attn2_modules(model.diffusion_model)) == expected


def test_fake_reproduces_the_inference_mode_pitfall(sd1):
    unet, names = sd1
    model = build_comfy_model(unet)
    x, ctx = sd1_inputs(unet, n=1)
    sigma = torch.tensor([2.0])
    with torch.inference_mode():  # as a node runs: nothing requires grad
        out = model.apply_model(x, sigma, c_crossattn=ctx, transformer_options={})
        with pytest.raises(RuntimeError, match="does not require grad"):
            out.mean().backward()
    memory = torch.zeros(2, ctx.shape[-1], requires_grad=True)
    with torch.inference_mode(False):  # leaving inference mode is not enough: the weights are inference tensors
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            model.apply_model(x, sigma, c_crossattn=torch.cat([ctx, memory[None]], 1), transformer_options={})


# -- applying a patch ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{}, {"cond_or_uncond": [0, 1], "sigmas": torch.tensor([1.0, 1.0])}],
                         ids=["node-call", "sampling"])
def test_block_patch_loop_gives_the_diffusers_processor_output(extra):
    """Acceptance: a BasicTransformerBlock running ComfyUI's attn2_patch loop, with our patch chained after
    another pack's patch, equals diffusers' block with the diffusers backend's hooks (fp32, 1e-5)."""
    torch.manual_seed(0)
    block = BasicTransformerBlock(64, 4, 16, cross_attention_dim=32).eval().requires_grad_(False)
    comfy_block = ComfyBlock.from_diffusers(block)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 16, 64, generator=g), torch.randn(2, 7, 32, generator=g)
    k1, v1, k2, v2 = (torch.randn(n, 32, generator=g) for n in (3, 3, 2, 2))
    layer = "input_blocks.4.1.transformer_blocks.1.attn2"
    first = ErasurePatch(layers=[layer], memory=ConceptMemory(k1, v1))
    second = ErasurePatch(layers=[layer], memory=ConceptMemory(k2, v2))
    calls = []

    def other_pack(n, context, value, extra_options):  # a foreign attn2_patch earlier in the list
        calls.append((context is value, sorted(extra_options)))
        return n, context, value

    ours = MemoryAttn2Patch.from_patches([(first, 0.6), (second, 1.3)])
    options = {"block": ("input", 4), "block_index": 1, "transformer_index": 3,
               "patches": {"attn2_patch": [other_pack, ours]},
               **extra}
    with torch.no_grad():
        got = comfy_block(x, context=ctx, transformer_options=options)
        injection = LayerInjection(memories=[(k1, v1, 0.6), (k2, v2, 1.3)])
        hooks = attach_plan(InjectionPlan({"attn2": injection}, {}, []), {"attn2": block.attn2})
        want = block(x, encoder_hidden_states=ctx)
        hooks.detach()
        plain = comfy_block(x, context=ctx, transformer_options={"block": ("input", 4), "block_index": 1})
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the memory did something
    assert calls and calls[0][0]  # on entry value is context
    assert {"n_heads", "dim_head", "block", "block_index"} <= set(calls[0][1])


def run_both(unet, names, patches_for_diffusers, comfy_patcher, ctx_cond, ctx_uncond, t=(400, 700)):
    """ε from the diffusers backend (attached patches) and from ComfyUI sampling's cond batch (fake)."""
    model = comfy_patcher.model
    g = torch.Generator().manual_seed(5)
    x_t = torch.randn(len(t), 4, 8, 8, generator=g)
    tt = torch.tensor(t)
    sigma = model.model_sampling.sigmas[tt]
    x_in = x_t * (sigma ** 2 + 1).sqrt().view(-1, 1, 1, 1)
    management = ModelManagement()
    with torch.no_grad():
        with attached(unet, patches_for_diffusers):
            want = [unet(x_t, tt, c).sample for c in (ctx_cond, ctx_uncond)]
        out = calc_cond_batch(comfy_patcher, [ctx_cond, ctx_uncond], x_in, sigma, management)
        got = [(x_in - d) / sigma.view(-1, 1, 1, 1) for d in out]
    management.unload_all_models()
    return got, want


def test_applied_model_matches_the_diffusers_backend(sd1):
    """Acceptance: memory in every layer plus full and low-rank deltas, two patches chained through two Apply
    calls, sampled the way ComfyUI batches cond and uncond: the same ε as the diffusers backend (1e-5)."""
    unet, names = sd1
    first = make_patch(unet, names, seed=1, deltas={f"{names[0]}.to_k": "full", f"{names[6]}.to_v": "lowrank",
                                                    f"{names[-1]}.to_out.0": "full"})
    second = make_patch(unet, select_layers(names, "midout"), seed=2, m=2, deltas={f"{names[6]}.to_v": "full"})
    patcher = FakeModelPatcher(build_comfy_model(unet))
    once, _ = apply_patches(patcher, [(first, 0.8)])
    twice, _ = apply_patches(once, [(second, 1.2)])
    _, ctx = sd1_inputs(unet)
    got, want = run_both(unet, names, [(first, 0.8), (second, 1.2)], twice, ctx, torch.zeros_like(ctx))
    for g_, w_ in zip(got, want):
        assert torch.allclose(g_, w_, atol=1e-5), (g_ - w_).abs().max()
    plain, _ = run_both(unet, names, [], patcher, ctx, torch.zeros_like(ctx))
    assert (plain[0] - got[0]).abs().max() > 1e-2
    memory_patches = twice.model_options["transformer_options"]["patches"]["attn2_patch"]
    assert len(memory_patches) == 1  # chained memories merge into one patch


def test_deltas_outside_cross_attention_match_the_diffusers_backend(sd1):
    """ESD-u's deltas (conv_in, attn1, the FFN, proj_in) go through add_patches under their LDM keys."""
    from erasure_core.layers import unet_modules

    unet, names = sd1
    paths = unet_modules(unet)
    picked = ["input_blocks.0.0", f"{names[0][:-len('attn2')]}attn1.to_k", f"{names[6][:-len('attn2')]}ff.net.2",
              "middle_block.1.proj_in"]
    g = torch.Generator().manual_seed(8)
    patch = ErasurePatch(layers=[], method="esd-u", deltas={
        n: WeightDelta(full=0.05 * torch.randn(*unet.get_submodule(paths[n]).weight.shape, generator=g))
        for n in picked})
    patcher = FakeModelPatcher(build_comfy_model(unet))
    applied, _ = apply_patches(patcher, [(patch, 0.7)])
    assert sorted(applied.patches) == sorted(f"diffusion_model.{n}.weight" for n in picked)
    _, ctx = sd1_inputs(unet)
    got, want = run_both(unet, names, [(patch, 0.7)], applied, ctx, torch.zeros_like(ctx))
    plain, _ = run_both(unet, names, [], patcher, ctx, torch.zeros_like(ctx))
    for g_, w_ in zip(got, want):
        assert torch.allclose(g_, w_, atol=1e-5), (g_ - w_).abs().max()
    assert (plain[0] - got[0]).abs().max() > 1e-3


def test_strength_zero_is_identity_and_the_input_model_is_untouched(sd1):
    unet, names = sd1
    patch = make_patch(unet, names, seed=1, deltas={f"{names[2]}.to_k": "full"})
    patcher = FakeModelPatcher(build_comfy_model(unet))
    before_weights = checksum(patcher.model)
    before_options = copy.deepcopy(patcher.model_options)
    zero, _ = apply_patches(patcher, [(patch, 0.0)])
    _, ctx = sd1_inputs(unet)
    plain, _ = run_both(unet, names, [], patcher, ctx, ctx.flip(0))
    got, _ = run_both(unet, names, [], zero, ctx, ctx.flip(0))
    assert all(torch.equal(a, b) for a, b in zip(plain, got))  # bit-identical
    applied, _ = apply_patches(patcher, [(patch, 1.0)])
    run_both(unet, names, [], applied, ctx, ctx.flip(0))  # loads (bakes the delta), samples, unloads
    assert checksum(patcher.model) == before_weights
    assert patcher.model_options == before_options and patcher.patches == {}
    again, _ = run_both(unet, names, [], patcher, ctx, ctx.flip(0))
    assert all(torch.equal(a, b) for a, b in zip(plain, again))


def test_the_model_holds_detached_copies_that_survive_clone(sd1):
    unet, names = sd1
    patch = make_patch(unet, names[:2], seed=1)
    live_k = torch.nn.Parameter(patch.memory.k.clone())
    patch.memory = ConceptMemory(live_k * 1.0, patch.memory.v)  # a non-leaf tensor that requires grad
    applied, _ = apply_patches(FakeModelPatcher(build_comfy_model(unet)), [(patch, 1.0)])
    clone = applied.clone()  # deep-copies model_options: would raise on a non-leaf requiring grad
    ours = clone.model_options["transformer_options"]["patches"]["attn2_patch"][0]
    k, v, s = ours.memories[comfy_address(names[0])][0]
    assert not k.requires_grad and torch.equal(k, live_k.detach())
    with torch.no_grad():
        live_k.add_(1.0)  # training goes on: the applied MODEL keeps what it was given
    assert torch.equal(k, ours.memories[comfy_address(names[0])][0][0])
    assert ours.to(torch.float16) is ours and ours.memories[comfy_address(names[0])][0][0].dtype == torch.float32


def test_refused_weight_keys_are_an_error_and_leave_the_model_alone(sd1):
    unet, names = sd1
    patch = make_patch(unet, names, seed=1, deltas={f"{names[3]}.to_v": "full"})

    class RenamingPatcher(FakeModelPatcher):  # a host whose keys differ: ComfyUI drops them and returns []
        def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
            return super().add_patches({"model." + k: v for k, v in patches.items()}, strength_patch, strength_model)

        def clone(self):
            n = RenamingPatcher(self.model)
            n.model_options = copy.deepcopy(self.model_options)
            return n

    patcher = RenamingPatcher(build_comfy_model(unet))
    with pytest.raises(PatchError, match="did not apply the weight delta"):
        apply_patches(patcher, [(patch, 1.0)])
    assert patcher.model_options == {"transformer_options": {}} and patcher.patches == {}
    ok, _ = apply_patches(FakeModelPatcher(patcher.model), [(patch, 1.0)])
    assert list(ok.patches) == [f"diffusion_model.{names[3]}.to_v.weight"]


def test_validation_refuses_other_architectures_and_warns_on_fingerprints(sd1):
    unet, names = sd1
    patcher = FakeModelPatcher(build_comfy_model(unet))
    wide = ErasurePatch(layers=names[:1], memory=ConceptMemory(torch.zeros(2, 768), torch.zeros(2, 768)))
    with pytest.raises(PatchError, match="768-d text context"):
        apply_patches(patcher, [(wide, 1.0)])
    foreign = make_patch(unet, ["input_blocks.1.1.transformer_blocks.5.attn2"], seed=1)
    with pytest.raises(PatchError, match="layers this model lacks"):
        apply_patches(patcher, [(foreign, 1.0)])
    with pytest.raises(PatchError, match="finite"):
        apply_patches(patcher, [(make_patch(unet, names[:1], seed=1), float("nan"))])
    other = make_patch(unet, names[:1], seed=1, fingerprint="0123456789abcdef")
    _, warnings = apply_patches(patcher, [(other, 1.0)])
    assert len(warnings) == 1 and "fingerprint" in warnings[0]
    same = make_patch(unet, names[:1], seed=1, fingerprint=model_fingerprint(unet))
    assert apply_patches(patcher, [(same, 1.0)])[1] == []
    assert patcher.model_options == {"transformer_options": {}}


def test_the_patch_leaves_other_layers_and_unknown_callers_alone():
    k = torch.ones(2, 8)
    patch = MemoryAttn2Patch.from_patches([(ErasurePatch(layers=["middle_block.1.transformer_blocks.0.attn2"],
                                                         memory=ConceptMemory(k, k)), 1.0)])
    n, ctx = torch.zeros(1, 4, 16), torch.zeros(1, 5, 8)
    for extra in ({}, {"block": ("input", 1), "block_index": 0}, {"block": ("middle", 0), "block_index": 1}):
        out = patch(n, ctx, ctx, extra)
        assert out[1] is ctx and out[2] is ctx
    out = patch(n, ctx, ctx, {"block": ("middle", 0), "block_index": 0, "transformer_index": 6})
    assert out[1].shape == (1, 7, 8) and out[2].shape == (1, 7, 8)
    assert address_from_extra_options({"block": ("output", 4), "block_index": 1}) == \
        comfy_address("output_blocks.4.1.transformer_blocks.1.attn2") == ("output", 4, 1)


def test_padding_repeats_counts_whole_copies_of_chunks():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 3, generator=g), torch.randn(1, 8, 3, generator=g)
    assert padding_repeats(a, chunk=4) == 1
    assert padding_repeats(a.repeat(1, 2, 1), chunk=4) == 2
    assert padding_repeats(torch.cat([a.repeat(1, 2, 1), b]), chunk=4) == 1  # the unpadded row sets it
    c = torch.randn(1, 12, 3, generator=g)
    assert padding_repeats(torch.cat([b.repeat(1, 3, 1), c.repeat(1, 2, 1)]), chunk=4) == 2
    assert padding_repeats(torch.zeros(1, 77, 3)) == 1  # a 77-token context is never taken for padding


@pytest.mark.parametrize("lengths", [(10, 5), (15, 10)], ids=["2T+T", "3T+2T"])
def test_memory_keeps_its_share_in_the_least_padded_rows(sd1, lengths):
    """Conds of different lengths are padded by repetition (to 10 and 30 tokens here, chunk 5): for the rows padded
    least, the patched output equals the unpadded one, memory share included."""
    unet, names = sd1
    patch = make_patch(unet, names, seed=4, m=3)
    patcher = FakeModelPatcher(build_comfy_model(unet))
    applied, _ = apply_patches(patcher, [(patch, 1.0)], chunk=5)
    g = torch.Generator().manual_seed(9)
    long_ctx, short_ctx = (torch.randn(2, n, 32, generator=g) for n in lengths)
    got, want = run_both(unet, names, [(patch, 1.0)], applied, long_ctx, short_ctx)
    assert torch.allclose(got[0], want[0], atol=1e-5)  # the longer cond: padded least
    naive = MemoryAttn2Patch.from_patches([(patch, 1.0)], chunk=10 ** 6)  # appends the memory once, always
    plain = FakeModelPatcher(patcher.model)
    plain.set_model_attn2_patch(naive)
    got_naive, _ = run_both(unet, names, [], plain, long_ctx, short_ctx)
    if lengths == (15, 10):  # both padded (to 30): appending once would have halved the memory of the 15-token row
        assert (got_naive[0] - want[0]).abs().max() > 1e-3
    else:
        assert torch.allclose(got_naive[0], want[0], atol=1e-5)


# -- the denoiser protocol -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_pair(toy_model):
    from comfy_fakes.host import FakeCLIP
    from erasure_core.toy.model import train_scheduler

    betas = train_scheduler().betas
    model = build_comfy_model(toy_model.unet, betas=betas)
    clip = FakeCLIP(toy_model.tokenizer, toy_model.text_encoders[0])
    return toy_model, ComfyDenoiser(FakeModelPatcher(model), clip, width=32, height=32, downscale=1, chunk=16)


def test_comfy_denoiser_predicts_what_the_diffusers_denoiser_predicts(toy_pair):
    toy, comfy = toy_pair
    names = toy.layer_names()
    assert comfy.layer_names() == names and comfy.context_dim == 128 and comfy.sample_shape == (3, 32, 32)
    assert comfy.fingerprint() == toy.fingerprint()
    assert comfy.prompt_length("a red circle") == toy.prompt_length("a red circle")
    assert torch.allclose(comfy.scheduler().alphas_cumprod, toy.scheduler().alphas_cumprod, atol=1e-6)
    cond = comfy.encode(["a red circle", ""])
    assert torch.allclose(cond.context, toy.encode(["a red circle", ""]).context, atol=1e-5)
    patch = make_patch(toy.unet, names, seed=2, deltas={f"{names[1]}.to_k": "full", f"{names[3]}.to_q": "lowrank"})
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([150, 800])
    with torch.no_grad():
        assert torch.allclose(comfy.predict_noise(x, t, cond), toy.predict_noise(x, t, cond), atol=1e-5)
        with attached(toy.unet, [(patch, 0.7)]):
            want = toy.predict_noise(x, t, cond)
        handle = comfy.attach([(patch, 0.7)])
        got = comfy.predict_noise(x, t, cond)
        handle.detach()
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - comfy.predict_noise(x, t, cond)).abs().max() > 1e-3  # detached again


def test_gradients_reach_the_patch_and_never_the_model(toy_pair):
    toy, comfy = toy_pair
    names = toy.layer_names()
    before = checksum(comfy.base)
    flags = [p.requires_grad for p in comfy.base.parameters()]
    k = torch.nn.Parameter(0.1 * torch.randn(4, 128))
    v = torch.nn.Parameter(torch.zeros(4, 128))
    delta = torch.nn.Parameter(torch.zeros(128, 128))
    live = ErasurePatch(layers=names, memory=ConceptMemory(k, v), deltas={f"{names[0]}.to_v": WeightDelta(full=delta)})
    with torch.inference_mode():  # where a node starts
        cond = comfy.encode(["a circle"])
        with torch.inference_mode(False), torch.enable_grad():
            handle = comfy.attach([(live, 1.0)])
            eps = comfy.predict_noise(torch.randn(1, 3, 32, 32), torch.tensor([500]), cond)
            handle.detach()
            eps.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (k, v, delta))
    assert checksum(comfy.base) == before
    assert [p.requires_grad for p in comfy.base.parameters()] == flags
    assert all(p.grad is None for p in comfy.base.parameters())
    comfy.release()


def test_training_on_inference_weights_aliases_them_instead_of_copying(toy_model):
    """ComfyUI builds and loads its model under inference mode, and autograd refuses to save inference tensors.
    The trainer runs on ordinary tensors over the same memory: gradients reach the patch, no weight is copied."""
    from comfy_fakes.host import FakeCLIP
    from erasure_core.toy.model import train_scheduler

    with torch.inference_mode():  # as ComfyUI's checkpoint loader runs
        model = build_comfy_model(toy_model.unet, betas=train_scheduler().betas)
    assert all(p.is_inference() for p in model.parameters())
    comfy = ComfyDenoiser(FakeModelPatcher(model), FakeCLIP(toy_model.tokenizer, toy_model.text_encoders[0]),
                          width=32, height=32, downscale=1, chunk=16)
    names = comfy.layer_names()
    before = checksum(model)
    k = torch.nn.Parameter(0.1 * torch.randn(4, 128))
    delta = torch.nn.Parameter(torch.zeros(128, 128))
    live = ErasurePatch(layers=names, memory=ConceptMemory(k, torch.nn.Parameter(torch.zeros(4, 128))),
                        deltas={f"{names[0]}.to_v": WeightDelta(full=delta)})
    with torch.inference_mode():
        cond = comfy.encode(["a circle"])
        with torch.inference_mode(False), torch.enable_grad():
            handle = comfy.attach([(live, 1.0)])
            comfy.predict_noise(torch.randn(1, 3, 32, 32), torch.tensor([500]), cond).square().mean().backward()
            handle.detach()
    assert k.grad.abs().sum() > 0 and delta.grad.abs().sum() > 0
    own = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert {t.data_ptr() for t in comfy._aliases.values()} <= own  # the same memory: nothing copied
    assert checksum(model) == before
    comfy.release()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_x0_from_apply_model_becomes_the_same_epsilon_as_diffusers(sd1, prediction):
    """ComfyUI's apply_model returns x0 for every parameterisation; predict_noise must give diffusers' ε."""
    from comfy_fakes.ldm import scaled_linear_betas
    from erasure_core.backends.diffusers_backend import DiffusersDenoiser

    unet, names = sd1
    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "prediction_type": "epsilon" if prediction == "eps" else "v_prediction", "clip_sample": False}
    reference = DiffusersDenoiser(copy.deepcopy(unet), None, None, config)
    comfy = ComfyDenoiser(FakeModelPatcher(build_comfy_model(unet, betas=scaled_linear_betas(), prediction=prediction)))
    assert comfy.sample_shape == (4, 64, 64)  # 512 px over the latent format's 8
    x, ctx = sd1_inputs(unet)
    t = torch.tensor([50, 900])
    from erasure_core.denoiser import Conditioning

    with torch.no_grad():
        got, want = comfy.predict_noise(x, t, Conditioning(ctx)), reference.predict_noise(x, t, Conditioning(ctx))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_fingerprint_is_the_checkpoint_s_while_weight_patches_are_baked_in(sd1):
    unet, names = sd1
    patcher = FakeModelPatcher(build_comfy_model(unet))
    delta_patch = make_patch(unet, names, seed=1, deltas={f"{names[0]}.to_k": "full"})
    with_delta, _ = apply_patches(patcher, [(delta_patch, 1.0)])
    management = ModelManagement()
    management.load_models_gpu([with_delta])  # the shared to_k weight now holds W + ΔW
    assert checksum(patcher.model) != checksum(build_comfy_model(unet))
    second = make_patch(unet, names[:1], seed=2, fingerprint=model_fingerprint(unet))
    assert apply_patches(patcher, [(second, 1.0)])[1] == []  # no false "other checkpoint" warning
    assert ComfyDenoiser(patcher).fingerprint() == model_fingerprint(unet)
    management.unload_all_models()


def test_the_noise_schedule_follows_object_patches(sd1):
    """A ModelSamplingDiscrete node replaces model_sampling through an object patch; the denoiser follows it."""
    from comfy_fakes.ldm import FakeModelSampling, scaled_linear_betas

    unet, _ = sd1
    patcher = FakeModelPatcher(build_comfy_model(unet))
    linear = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
    patcher.object_patches["model_sampling"] = FakeModelSampling(linear)
    want = torch.cumprod(1 - linear, 0).float()
    assert torch.allclose(ComfyDenoiser(patcher).scheduler().alphas_cumprod, want, atol=1e-6)
    plain = torch.cumprod(1 - scaled_linear_betas(), 0).float()
    assert torch.allclose(ComfyDenoiser(FakeModelPatcher(patcher.model)).scheduler().alphas_cumprod, plain, atol=1e-6)


def test_a_saeuron_patch_edits_its_block_as_the_diffusers_backend_does(sd1):
    """SAeUron patches reach ComfyUI as a DIFFUSION_MODEL wrapper on the clone: sampled the way ComfyUI samples
    (sigmas in, the model's timesteps at the UNet), the same ε as the diffusers backend; stacked on a memory
    patch and chained through a second Apply; strength 0 adds nothing and the input MODEL is untouched."""
    from conftest import random_sae_patch

    unet, names = sd1
    sae_patch = random_sae_patch(32, "output_blocks.4.1", seed=4)
    other = random_sae_patch(32, "output_blocks.7.1", seed=5)
    memory = make_patch(unet, names, seed=1)
    patcher = FakeModelPatcher(build_comfy_model(unet))
    before = copy.deepcopy(patcher.model_options)
    once, _ = apply_patches(patcher, [(memory, 1.0), (sae_patch, 0.8)])
    twice, _ = apply_patches(once, [(other, 1.0)])
    _, ctx = sd1_inputs(unet)
    patches = [(memory, 1.0), (sae_patch, 0.8), (other, 1.0)]
    got, want = run_both(unet, names, patches, twice, ctx, torch.zeros_like(ctx), t=(450, 750))
    for g_, w_ in zip(got, want):
        assert torch.allclose(g_, w_, atol=1e-5), (g_ - w_).abs().max()
    without, _ = run_both(unet, names, [(memory, 1.0)], patcher, ctx, torch.zeros_like(ctx), t=(450, 750))
    assert (without[0] - got[0]).abs().max() > 1e-3  # the edit shows
    zero, _ = apply_patches(patcher, [(sae_patch, 0.0)])
    assert "wrappers" not in zero.model_options["transformer_options"]
    assert patcher.model_options == before
    with pytest.raises(PatchError, match="lacks"):
        apply_patches(FakeModelPatcher(build_comfy_model(toy_unet())), [(sae_patch, 1.0)])


def test_the_comfy_denoiser_applies_attached_saeuron_patches_like_the_diffusers_one(toy_pair):
    """What a node that trains or previews through ComfyDenoiser sees: the attached SAE edit, and the plain model
    again, bit for bit, once it is detached."""
    from conftest import random_sae_patch

    toy, comfy = toy_pair
    patch = random_sae_patch(128, "output_blocks.1.1", seed=6)
    cond = comfy.encode(["a red circle", ""])
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([450, 850])
    with torch.no_grad():
        plain = comfy.predict_noise(x, t, cond)
        with attached(toy.unet, [(patch, 1.0)]):
            want = toy.predict_noise(x, t, cond)
        handle = comfy.attach([(patch, 1.0)])
        got = comfy.predict_noise(x, t, cond)
        handle.detach()
        assert torch.equal(comfy.predict_noise(x, t, cond), plain)
    assert torch.allclose(got, want, atol=1e-5) and (got - plain).abs().max() > 1e-3


def test_a_dumo_patch_adds_its_branch_as_the_diffusers_backend_does(sd1):
    """DuMo patches reach ComfyUI as a DIFFUSION_MODEL wrapper that runs the branch on the call's inputs and adds
    its residuals to the skip connections: the same ε as the diffusers backend, stacked on a memory patch; strength
    0 adds nothing and the input MODEL is untouched; a model of another layout is refused."""
    from conftest import random_branch_patch

    unet, names = sd1
    branch = random_branch_patch(unet, seed=4)
    memory = make_patch(unet, names, seed=1)
    patcher = FakeModelPatcher(build_comfy_model(unet))
    before = copy.deepcopy(patcher.model_options)
    applied, _ = apply_patches(patcher, [(memory, 1.0), (branch, 0.7)])
    _, ctx = sd1_inputs(unet)
    got, want = run_both(unet, names, [(memory, 1.0), (branch, 0.7)], applied, ctx, torch.zeros_like(ctx),
                         t=(450, 750))
    for g_, w_ in zip(got, want):
        assert torch.allclose(g_, w_, atol=1e-5), (g_ - w_).abs().max()
    without, _ = run_both(unet, names, [(memory, 1.0)], patcher, ctx, torch.zeros_like(ctx), t=(450, 750))
    assert (without[0] - got[0]).abs().max() > 1e-3  # the branch shows
    zero, _ = apply_patches(patcher, [(branch, 0.0)])
    assert "wrappers" not in zero.model_options["transformer_options"]
    assert patcher.model_options == before
    with pytest.raises(PatchError, match="another architecture"):
        apply_patches(FakeModelPatcher(build_comfy_model(toy_unet())), [(branch, 1.0)])


def test_the_comfy_denoiser_runs_and_trains_an_attached_dumo_branch_like_the_diffusers_one(toy_pair):
    """A node that trains DuMo in ComfyUI: the attached branch gives the diffusers backend's ε, gradients reach
    its tensors through ComfyUI's inference weights, and detaching gives the plain model bit for bit."""
    from conftest import random_branch_patch

    toy, comfy = toy_pair
    patch = random_branch_patch(toy.unet, seed=6)
    cond = comfy.encode(["a red circle", ""])
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([450, 850])
    with torch.no_grad():
        plain = comfy.predict_noise(x, t, cond)
        with attached(toy.unet, [(patch, 1.0)]):
            want = toy.predict_noise(x, t, cond)
        handle = comfy.attach([(patch, 1.0)])
        got = comfy.predict_noise(x, t, cond)
        handle.detach()
        assert torch.equal(comfy.predict_noise(x, t, cond), plain)
    assert torch.allclose(got, want, atol=1e-5) and (got - plain).abs().max() > 1e-3
    out = patch.extra["branch"]["erasure.branch.out.0.weight"].requires_grad_(True)
    handle = comfy.attach([(patch, 1.0)])
    comfy.predict_noise(x, t, cond).square().mean().backward()
    handle.detach()
    assert out.grad is not None and out.grad.abs().max() > 0
