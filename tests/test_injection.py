"""Concept-memory injection in diffusers UNets, against a hand-written reference."""
import hashlib

import pytest
import torch
from unets import sd1_unet

from erasure_core.injection import attach, attached
from erasure_core.layers import attn2_layers, select_layers
from erasure_core.patch import ConceptMemory, ErasurePatch, PatchError, WeightDelta

D = 32


def checksum(module):
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def unet():
    return sd1_unet(cross_dim=D).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, D, generator=g)


def make_patch(layers, seed, m=3, deltas=None):
    g = torch.Generator().manual_seed(seed)
    patch = ErasurePatch(layers=layers, memory=ConceptMemory(torch.randn(m, D, generator=g), torch.randn(m, D, generator=g)))
    for module, kind in (deltas or {}).items():
        out_dim = 32
        if kind == "full":
            patch.deltas[module] = WeightDelta(full=0.1 * torch.randn(out_dim, D, generator=g))
        else:
            patch.deltas[module] = WeightDelta(down=0.3 * torch.randn(2, D, generator=g),
                                               up=0.3 * torch.randn(out_dim, 2, generator=g), alpha=1.0)
    return patch


class ReferenceProcessor:
    """K = W_k·[c ; P_k], V = W_v·[c ; s·P_v], written with explicit softmax, per head."""

    def __init__(self, mem_k, mem_v, deltas):
        self.mem_k, self.mem_v, self.deltas = mem_k, mem_v, deltas

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        def lin(mod, name, x):
            return x @ (mod.weight + self.deltas.get(name, 0)).T + (mod.bias if mod.bias is not None else 0)

        b = hidden_states.shape[0]
        ck = torch.cat([encoder_hidden_states, self.mem_k.expand(b, -1, -1)], 1)
        cv = torch.cat([encoder_hidden_states, self.mem_v.expand(b, -1, -1)], 1)
        q, k, v = lin(attn.to_q, "to_q", hidden_states), lin(attn.to_k, "to_k", ck), lin(attn.to_v, "to_v", cv)
        h = attn.heads
        split = lambda t: t.reshape(b, t.shape[1], h, -1).permute(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        w = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
        o = (w @ v).permute(0, 2, 1, 3).reshape(b, -1, q.shape[-1] * h)
        return lin(attn.to_out[0], "to_out.0", o)


def reference_output(unet, inputs, patches):
    """UNet output with reference processors built from the patches (memories concatenated, deltas summed)."""
    layers = {layer.canonical: layer.diffusers for layer in attn2_layers(unet)}
    modules = dict(unet.named_modules())
    originals = {}
    for canonical, name in layers.items():
        ks, vs, deltas = [], [], {}
        for patch, s in patches:
            mem = patch.memory_for(canonical)
            if mem is not None:
                ks.append(mem.k)
                vs.append(s * mem.v)
            for module, delta in patch.deltas.items():
                if module.startswith(canonical + "."):
                    proj = module[len(canonical) + 1:]
                    deltas[proj] = deltas.get(proj, 0) + s * delta.weight()
        if ks or deltas:
            originals[name] = modules[name].processor
            empty = torch.zeros(0, D)
            modules[name].set_processor(ReferenceProcessor(torch.cat(ks) if ks else empty,
                                                           torch.cat(vs) if vs else empty, deltas))
    try:
        return unet(*inputs).sample
    finally:
        for name, proc in originals.items():
            modules[name].set_processor(proc)


MODES = ["mid", "midout", "all"]


@pytest.mark.parametrize("mode", MODES)
def test_zero_strength_and_detach_are_bit_identical(unet, inputs, mode):
    names = [layer.canonical for layer in attn2_layers(unet)]
    patch = make_patch(select_layers(names, mode), seed=1, deltas={f"{names[-1]}.to_k": "full"})
    before = unet(*inputs).sample
    sums = checksum(unet)
    with attached(unet, [(patch, 0.0)]):
        assert torch.equal(unet(*inputs).sample, before)
    with attached(unet, [(patch, 1.0)]):
        assert not torch.allclose(unet(*inputs).sample, before)
    assert torch.equal(unet(*inputs).sample, before)
    assert checksum(unet) == sums


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("delta_kind", [None, "full", "lora"])
def test_injection_matches_the_reference(unet, inputs, mode, delta_kind):
    names = [layer.canonical for layer in attn2_layers(unet)]
    chosen = select_layers(names, mode)
    deltas = {f"{chosen[-1]}.{p}": delta_kind for p in ("to_k", "to_v", "to_out.0")} if delta_kind else None
    patch = make_patch(chosen, seed=2, deltas=deltas)
    for strength in (1.0, 0.5):
        with attached(unet, [(patch, strength)]):
            ours = unet(*inputs).sample
        ref = reference_output(unet, inputs, [(patch, strength)])
        assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_two_stacked_patches_concatenate_memory_and_add_deltas(unet, inputs):
    names = [layer.canonical for layer in attn2_layers(unet)]
    a = make_patch(select_layers(names, "midout"), seed=4, m=2, deltas={f"{names[6]}.to_k": "full"})
    b = make_patch(select_layers(names, "all"), seed=5, m=5, deltas={f"{names[6]}.to_k": "lora"})
    with attached(unet, [(a, 1.0), (b, 0.7)]):
        ours = unet(*inputs).sample
    ref = reference_output(unet, inputs, [(a, 1.0), (b, 0.7)])
    assert torch.allclose(ours, ref, atol=1e-5)
    with attached(unet, [(a, 1.0)]):
        only_a = unet(*inputs).sample
    assert not torch.allclose(ours, only_a, atol=1e-4)


def test_bad_patch_leaves_nothing_attached(unet, inputs):
    names = [layer.canonical for layer in attn2_layers(unet)]
    good = make_patch(names[:2], seed=6)
    wrong_dim = ErasurePatch(layers=names[:1], memory=ConceptMemory(torch.zeros(2, 768), torch.zeros(2, 768)))
    wrong_layer = make_patch(["output_blocks.0.1.transformer_blocks.0.attn2"], seed=7)
    processors = dict(unet.attn_processors)
    for bad, msg in ((wrong_dim, "768-d"), (wrong_layer, "lacks")):
        with pytest.raises(PatchError, match=msg):
            attach(unet, [(good, 1.0), (bad, 1.0)])
        assert unet.attn_processors == processors


def test_gradients_reach_trainable_memory(unet, inputs):
    names = [layer.canonical for layer in attn2_layers(unet)]
    k = torch.zeros(2, D, requires_grad=True)
    v = torch.randn(2, D, requires_grad=True)
    patch = ErasurePatch(layers=select_layers(names, "mid"), memory=ConceptMemory(k, v))
    with attached(unet, [(patch, 1.0)]):
        unet(*inputs).sample.square().mean().backward()
    assert k.grad is not None and k.grad.abs().sum() > 0 and v.grad.abs().sum() > 0
