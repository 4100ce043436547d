"""Concept-memory injection in diffusers UNets, against hand-written references.

Two layouts, random weights: SD1.x's 16 attn2 layers at tiny width, and the toy model's 4 (UNET_CONFIG)."""
import hashlib
import math

import pytest
import torch
from diffusers.models.attention_processor import Attention
from unets import sd1_unet, toy_unet

from conftest import random_patch
from erasure_core.injection import InjectionPlan, LayerInjection, attach, attach_plan, attached
from erasure_core.layers import attn2_layers, select_layers, to_diffusers
from erasure_core.patch import ConceptMemory, ErasurePatch, PatchError, WeightDelta

MODES = ["mid", "midout", "all"]


def checksum(module):
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.numpy().tobytes())
    return h.hexdigest()


class Case:
    """A UNet with fixed inputs; `dim` is its text-context width."""

    def __init__(self, unet, channels, size):
        self.unet = unet.eval().requires_grad_(False)
        self.dim = unet.config.cross_attention_dim
        self.layers = attn2_layers(unet)
        self.names = [layer.canonical for layer in self.layers]
        g = torch.Generator().manual_seed(3)
        self.inputs = (torch.randn(2, channels, size, size, generator=g), torch.tensor([10, 700]),
                       torch.randn(2, 5, self.dim, generator=g))

    def run(self):
        return self.unet(*self.inputs).sample

    def weight_shape(self, module):
        return self.unet.get_submodule(to_diffusers(module, self.layers)).weight.shape

    def patch(self, layers, seed, m=3, deltas=None):
        return random_patch(layers, self.dim, seed, m, deltas, weight_shape=self.weight_shape)


@pytest.fixture(scope="module", params=["sd1", "toy"])
def case(request):
    return Case(sd1_unet(), 4, 8) if request.param == "sd1" else Case(toy_unet(), 3, 32)


class ReferenceProcessor:
    """softmax(Q K^T / sqrt(d_head)) V per head with K = W_k·[c ; P_k], V = W_v·[c ; P_v], deltas summed in."""

    def __init__(self, mem_k, mem_v, deltas):
        self.mem_k, self.mem_v, self.deltas = mem_k, mem_v, deltas

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        def linear(module, name, x):
            bias = module.bias if module.bias is not None else 0
            return x @ (module.weight + self.deltas.get(name, 0)).T + bias

        b = hidden_states.shape[0]
        ck = torch.cat([encoder_hidden_states, self.mem_k.expand(b, -1, -1)], 1)
        cv = torch.cat([encoder_hidden_states, self.mem_v.expand(b, -1, -1)], 1)
        q = linear(attn.to_q, "to_q", hidden_states)
        k, v = linear(attn.to_k, "to_k", ck), linear(attn.to_v, "to_v", cv)
        h = attn.heads
        d_head = q.shape[-1] // h
        heads_out = []
        for i in range(h):
            cols = slice(i * d_head, (i + 1) * d_head)
            weights = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(d_head), dim=-1)
            heads_out.append(weights @ v[..., cols])
        return linear(attn.to_out[0], "to_out.0", torch.cat(heads_out, dim=-1))


def reference_output(case, patches):
    """UNet output with reference processors built from the patches (memories concatenated, deltas summed)."""
    originals = {}
    for layer in case.layers:
        ks, vs, deltas = [], [], {}
        for patch, s in patches:
            mem = patch.memory_for(layer.canonical)
            if mem is not None:
                ks.append(mem.k)
                vs.append(s * mem.v)
            for module, delta in patch.deltas.items():
                if module.startswith(layer.canonical + "."):
                    proj = module[len(layer.canonical) + 1:]
                    deltas[proj] = deltas.get(proj, 0) + s * delta.weight()
        if ks or deltas:
            attn = case.unet.get_submodule(layer.diffusers)
            originals[layer.diffusers] = attn.processor
            empty = torch.zeros(0, case.dim)
            attn.set_processor(ReferenceProcessor(torch.cat(ks) if ks else empty, torch.cat(vs) if vs else empty,
                                                  deltas))
    try:
        return case.run()
    finally:
        for name, proc in originals.items():
            case.unet.get_submodule(name).set_processor(proc)


def test_the_reference_without_memory_is_the_plain_model(case):
    plain = case.run()
    empty = ErasurePatch(layers=case.names, memory=ConceptMemory(torch.zeros(0, case.dim), torch.zeros(0, case.dim)))
    assert torch.allclose(reference_output(case, [(empty, 1.0)]), plain, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_no_patch_zero_strength_and_detach_are_bit_identical(case, mode):
    chosen = select_layers(case.names, mode)
    patch = case.patch(chosen, seed=1, deltas={f"{chosen[-1]}.to_k": "full", f"{chosen[0]}.to_out.0": "lora"})
    processors = dict(case.unet.attn_processors)
    before = case.run()
    sums = checksum(case.unet)
    with attached(case.unet, []):
        assert torch.equal(case.run(), before)
    with attached(case.unet, [(patch, 0.0)]):
        assert torch.equal(case.run(), before)
    with attached(case.unet, [(patch, 1.0)]):
        assert not torch.allclose(case.run(), before)
        assert checksum(case.unet) == sums  # deltas are functional: weights untouched while attached
    assert torch.equal(case.run(), before)
    assert checksum(case.unet) == sums
    assert case.unet.attn_processors == processors


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("delta_kind", [None, "full", "lora"])
def test_injection_matches_the_reference(case, mode, delta_kind):
    chosen = select_layers(case.names, mode)
    projections = ("to_q", "to_k", "to_v", "to_out.0")
    deltas = {f"{layer}.{p}": delta_kind for layer in (chosen[0], chosen[-1]) for p in projections} \
        if delta_kind else None
    patch = case.patch(chosen, seed=2, deltas=deltas)
    for strength in (1.0, 0.5):
        with attached(case.unet, [(patch, strength)]):
            ours = case.run()
        reference = reference_output(case, [(patch, strength)])
        assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()


def test_two_stacked_patches_concatenate_memory_and_add_deltas(case):
    mid = select_layers(case.names, "mid")[0]
    a = case.patch(select_layers(case.names, "midout"), seed=4, m=2, deltas={f"{mid}.to_k": "full"})
    b = case.patch(select_layers(case.names, "all"), seed=5, m=5, deltas={f"{mid}.to_k": "lora", f"{mid}.to_v": "full"})
    with attached(case.unet, [(a, 1.0), (b, 0.7)]):
        ours = case.run()
    assert torch.allclose(ours, reference_output(case, [(a, 1.0), (b, 0.7)]), atol=1e-5)
    with attached(case.unet, [(a, 1.0)]):
        assert not torch.allclose(case.run(), ours, atol=1e-4)


def test_attaching_on_top_composes_and_detaches_in_reverse(case):
    a = case.patch(select_layers(case.names, "midout"), seed=4, m=2)
    b = case.patch(select_layers(case.names, "mid"), seed=5, m=3)
    before = case.run()
    with attached(case.unet, [(a, 1.0), (b, 0.5)]):
        together = case.run()
    with attached(case.unet, [(b, 0.5)]):
        inner_alone = case.run()
    outer = attach(case.unet, [(a, 1.0)])
    inner = attach(case.unet, [(b, 0.5)])
    assert torch.equal(case.run(), together)
    inner.detach()
    outer.detach()
    assert torch.equal(case.run(), before)
    # hooks, unlike swapped processors, come off in any order: what is left is exactly what stays attached
    outer = attach(case.unet, [(a, 1.0)])
    inner = attach(case.unet, [(b, 0.5)])
    outer.detach()
    assert torch.equal(case.run(), inner_alone)
    inner.detach()
    assert torch.equal(case.run(), before)


def test_bad_patch_leaves_nothing_attached(case):
    good = case.patch(case.names[:2], seed=6)
    wide = 1024 if case.dim != 1024 else 768
    wrong_dim = ErasurePatch(layers=case.names[:1], memory=ConceptMemory(torch.zeros(2, wide), torch.zeros(2, wide)))
    wrong_layer = case.patch(["output_blocks.99.1.transformer_blocks.0.attn2"], seed=7)
    wrong_shape = case.patch(case.names[:1], seed=8)
    wrong_shape.deltas[f"{case.names[0]}.to_q"] = WeightDelta(full=torch.zeros(3, 3))
    processors = dict(case.unet.attn_processors)
    for bad, message in ((wrong_dim, f"{wide}-d"), (wrong_layer, "lacks"), (wrong_shape, "the model's weight")):
        with pytest.raises(PatchError, match=message):
            attach(case.unet, [(good, 1.0), (bad, 1.0)])
        assert case.unet.attn_processors == processors


def test_gradients_reach_trainable_memory_and_deltas(case):
    mid = select_layers(case.names, "mid")[0]
    k = torch.zeros(2, case.dim, requires_grad=True)
    v = torch.randn(2, case.dim, requires_grad=True)
    down = torch.randn(2, case.dim, requires_grad=True)
    up = torch.zeros(case.weight_shape(f"{mid}.to_k")[0], 2, requires_grad=True)
    patch = ErasurePatch(layers=[mid], memory=ConceptMemory(k, v),
                         deltas={f"{mid}.to_k": WeightDelta(down=down, up=up, alpha=2.0)})
    with attached(case.unet, [(patch, 1.0)]):
        case.run().square().mean().backward()
    assert k.grad.abs().sum() > 0 and v.grad.abs().sum() > 0 and up.grad.abs().sum() > 0


def outside_deltas(case, seed):
    """ESD-u-style deltas: a full conv, a low-rank conv (kohya's factors), a linear of the time path, attn1."""
    from erasure_core.layers import unet_modules

    paths = unet_modules(case.unet)
    convs = [name for name in paths if name.endswith(("in_layers.2", "out_layers.3"))]
    picks = {convs[0]: "full", convs[-1]: "lora", next(n for n in paths if n.endswith("emb_layers.1")): "full",
             next(n for n in paths if n.endswith("attn1.to_v")): "lora"}
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, kind in picks.items():
        shape = case.unet.get_submodule(paths[name]).weight.shape
        if kind == "full":
            deltas[name] = WeightDelta(full=0.05 * torch.randn(*shape, generator=g))
        else:
            down_shape = (2, *shape[1:])
            up_shape = (shape[0], 2, *([1, 1] if len(shape) == 4 else []))
            deltas[name] = WeightDelta(down=0.2 * torch.randn(*down_shape, generator=g),
                                       up=0.2 * torch.randn(*up_shape, generator=g), alpha=1.0)
    return paths, deltas


def test_deltas_outside_cross_attention_equal_edited_weights(case):
    """A forward hook adds s·ΔW·x: the same output as a copy of the UNet whose weights were edited, with the
    user's weights never written, and strength 0 and detach bit-identical."""
    import copy

    paths, deltas = outside_deltas(case, seed=9)
    patch = ErasurePatch(layers=[], method="esd-u", deltas=deltas)
    before, sums = case.run(), checksum(case.unet)
    edited = copy.deepcopy(case.unet)
    with torch.no_grad():
        for name, delta in deltas.items():
            edited.get_submodule(paths[name]).weight += 0.5 * delta.weight()
    want = edited(*case.inputs).sample
    with attached(case.unet, [(patch, 0.5)]):
        got = case.run()
        assert checksum(case.unet) == sums
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert (got - before).abs().max() > 1e-3
    with attached(case.unet, [(patch, 0.0)]):
        assert torch.equal(case.run(), before)
    assert torch.equal(case.run(), before)
    wrong = ErasurePatch(layers=[], deltas={next(iter(deltas)): WeightDelta(full=torch.zeros(3, 3))})
    with pytest.raises(PatchError, match="the model's weight"):
        attach(case.unet, [(patch, 1.0), (wrong, 1.0)])
    assert torch.equal(case.run(), before)  # the refused pair left no hook behind


# One attention module by hand.

def hooked(attn, injection):
    """The injection's hooks on one attention module (what attach does for each selected layer)."""
    return attach_plan(InjectionPlan({"attn2": injection}, {}, []), {"attn2": attn})


def single_attention(dtype=torch.float32):
    torch.manual_seed(11)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8, out_bias=True)
    g = torch.Generator().manual_seed(12)
    x, c = torch.randn(2, 6, 32, generator=g), torch.randn(2, 5, 24, generator=g)
    mem_k, mem_v = torch.randn(3, 24, generator=g), torch.randn(3, 24, generator=g)
    return attn.to(dtype), x.to(dtype), c.to(dtype), mem_k, mem_v


def by_hand(attn, x, c, mem_k, mem_v, delta_k=0):
    """The formula, per head: softmax(Q_h K_h^T / sqrt(d_head)) V_h, heads concatenated, then to_out."""
    k_in = torch.cat([c, mem_k.expand(2, -1, -1)], 1)
    v_in = torch.cat([c, mem_v.expand(2, -1, -1)], 1)
    q = x @ attn.to_q.weight.T
    k = k_in @ (attn.to_k.weight + delta_k).T
    v = v_in @ attn.to_v.weight.T
    out = torch.zeros_like(q)
    for h in range(4):
        cols = slice(8 * h, 8 * h + 8)
        out[..., cols] = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(8), -1) @ v[..., cols]
    return out @ attn.to_out[0].weight.T + attn.to_out[0].bias


def test_one_module_matches_the_formula():
    attn, x, c, mem_k, mem_v = single_attention()
    delta = 0.1 * torch.randn(attn.to_k.weight.shape, generator=torch.Generator().manual_seed(13))
    injection = LayerInjection([(mem_k, mem_v, 1.0)], {"to_k": [(WeightDelta(full=delta), 1.0)]})
    handle = hooked(attn, injection)
    with torch.no_grad():
        assert torch.allclose(attn(x, encoder_hidden_states=c), by_hand(attn, x, c, mem_k, mem_v, delta), atol=1e-5)
        handle.detach()
        handle = hooked(attn, LayerInjection([(mem_k, mem_v, 0.25)]))
        assert torch.allclose(attn(x, encoder_hidden_states=c), by_hand(attn, x, c, mem_k, 0.25 * mem_v), atol=1e-5)
    handle.detach()


def test_one_module_with_a_padding_mask():
    """A masked context token stays masked; memory tokens are always visible."""
    attn, x, c, mem_k, mem_v = single_attention()
    handle = hooked(attn, LayerInjection([(mem_k, mem_v, 1.0)]))
    bias = torch.zeros(2, 1, 5)
    bias[:, :, -1] = -10000.0  # diffusers' encoder_attention_mask arrives as an additive bias
    visible = torch.ones(2, 5, dtype=torch.bool)
    visible[:, -1] = False
    with torch.no_grad():
        expected = by_hand(attn, x, c[:, :-1], mem_k, mem_v)
        assert torch.allclose(attn(x, encoder_hidden_states=c, attention_mask=bias), expected, atol=1e-5)
        assert torch.allclose(attn(x, encoder_hidden_states=c, attention_mask=visible), expected, atol=1e-5)
        assert "prepare_attention_mask" not in attn.__dict__  # the mask's room is made for one call only
        handle.detach()
        plain = attn(x, encoder_hidden_states=c, attention_mask=bias)
        assert torch.allclose(plain, by_hand(attn, x, c[:, :-1], mem_k[:0], mem_v[:0]), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_take_float32_patches(dtype):
    attn, x, c, mem_k, mem_v = single_attention()
    with torch.no_grad():
        expected = by_hand(attn, x, c, mem_k, mem_v)
        attn = attn.to(dtype)
        with_memory = hooked(attn, LayerInjection([(mem_k, mem_v, 1.0)]))
        out = attn(x.to(dtype), encoder_hidden_states=c.to(dtype))
        with_memory.detach()
    assert out.dtype == dtype
    assert torch.allclose(out.float(), expected, atol=0.05, rtol=0.05)
