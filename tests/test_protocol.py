"""The denoiser protocol (erasure_core.denoiser.Denoiser), member by member, on every backend: diffusers (the toy
model), ComfyUI (the contract fakes, tests/comfy_fakes) and A1111 (tests/webui_fakes). All three wrap the toy
model's weights, so they must also agree with each other. Tiny sizes, 2 DDIM steps."""
import pytest
import torch
from diffusers import DDIMScheduler

from erasure_core.denoiser import Conditioning, Denoiser
from erasure_core.layers import PROJECTIONS, is_canonical_layer
from erasure_core.patch import ConceptMemory, ErasurePatch, WeightDelta, model_fingerprint

BACKENDS = ["diffusers", "comfyui", "a1111"]
PROMPTS, SEEDS = ["a red circle", "a blue square with stripes"], [3, 4]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared CPU
    yield
    torch.set_num_threads(before)


def _comfy(toy, vae=True):
    from comfy_fakes import FakeModelPatcher, build_comfy_model
    from comfy_fakes.host import FakeCLIP, FakeVAE
    from erasure_core.backends.comfy import ComfyDenoiser
    from erasure_core.toy.model import train_scheduler

    model = build_comfy_model(toy.unet, betas=train_scheduler().betas, downscale=1)
    clip = FakeCLIP(toy.tokenizer, toy.text_encoders[0])
    return ComfyDenoiser(FakeModelPatcher(model), clip, width=32, height=32, downscale=1, chunk=16,
                         vae=FakeVAE() if vae else None)


def _a1111_model():
    from webui_fakes import FakeLatentDiffusion
    from erasure_core.toy.model import load_toy_model

    class WithEncoder(FakeLatentDiffusion):  # pixel space: the first stage is the identity both ways
        def encode_first_stage(self, x):
            return x

    return WithEncoder(load_toy_model())  # its own copy: the fake re-routes the UNet's attention


@pytest.fixture(scope="module")
def backends(toy_model):
    from erasure_core.backends.ldm import LdmDenoiser

    return {"diffusers": toy_model, "comfyui": _comfy(toy_model),
            "a1111": LdmDenoiser(_a1111_model(), resolution=32, latent_scale=1)}


@pytest.fixture(params=BACKENDS)
def denoiser(request, backends):
    return backends[request.param]


def _memory_patch(denoiser, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = denoiser.context_dim
    return ErasurePatch(layers=denoiser.layer_names(),
                        memory=ConceptMemory(3 * torch.randn(4, d, generator=g), 3 * torch.randn(4, d, generator=g)))


def _protocol_members() -> set[str]:
    return {name for name in vars(Denoiser) if not name.startswith("_")} | set(Denoiser.__annotations__)


def test_every_protocol_member_is_there(denoiser):
    members = _protocol_members()
    assert {"context_dim", "sample_shape", "device", "encode", "predict_noise", "scheduler", "layer_names",
            "prompt_length", "projection_weights", "weight_shapes", "attach", "fingerprint", "generate",
            "encode_image", "decode"} <= members
    missing = [name for name in sorted(members) if not hasattr(denoiser, name)]
    assert missing == []


def test_model_description(denoiser, toy_model):
    assert isinstance(denoiser.context_dim, int) and denoiser.context_dim == 128
    assert isinstance(denoiser.sample_shape, tuple) and tuple(denoiser.sample_shape) == (3, 32, 32)
    assert all(isinstance(s, int) for s in denoiser.sample_shape)
    assert isinstance(denoiser.device, torch.device)
    names = denoiser.layer_names()
    assert names and len(set(names)) == len(names) and all(is_canonical_layer(n) for n in names)
    assert names == toy_model.layer_names()  # one canonical naming for every host
    weights = denoiser.projection_weights()
    assert set(weights) == {f"{layer}.{proj}" for layer in names for proj in PROJECTIONS}
    assert all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in weights.values())
    assert all(weights[f"{layer}.to_k"].shape[1] == denoiser.context_dim for layer in names)
    shapes = denoiser.weight_shapes()
    assert all(isinstance(s, tuple) for s in shapes.values())
    assert all(shapes[key] == tuple(w.shape) for key, w in weights.items())  # attn2 projections are listed too
    fingerprint = denoiser.fingerprint()
    assert isinstance(fingerprint, str) and fingerprint == model_fingerprint(toy_model.unet)


def test_encode_predict_and_schedule(denoiser):
    cond = denoiser.encode(["a red circle", ""])
    assert isinstance(cond, Conditioning) and len(cond) == 2
    assert cond.context.dim() == 3 and cond.context.shape[0] == 2 and cond.context.shape[2] == denoiser.context_dim
    assert cond.context.is_floating_point()
    length = denoiser.prompt_length("a red circle")
    assert isinstance(length, int) and 2 < length <= cond.context.shape[1]
    x = torch.randn(2, *denoiser.sample_shape, generator=torch.Generator().manual_seed(0)).to(denoiser.device)
    with torch.no_grad():
        eps = denoiser.predict_noise(x, torch.tensor([100, 800], device=denoiser.device), cond)
    assert eps.shape == x.shape and eps.dtype == x.dtype and torch.isfinite(eps).all()
    a, b = denoiser.scheduler(), denoiser.scheduler()
    assert isinstance(a, DDIMScheduler) and a is not b  # fresh each time
    assert a.config.prediction_type == "epsilon"  # predict_noise returns ε whatever the model predicts


def test_attach_and_detach(denoiser):
    cond = denoiser.encode(["a red circle"] * 2)
    x = torch.randn(2, *denoiser.sample_shape, generator=torch.Generator().manual_seed(1)).to(denoiser.device)
    t = torch.tensor([300, 600], device=denoiser.device)
    with torch.no_grad():
        plain = denoiser.predict_noise(x, t, cond)
        handle = denoiser.attach([(_memory_patch(denoiser), 1.0)])
        assert isinstance(handle.warnings, list)
        patched = denoiser.predict_noise(x, t, cond)
        handle.detach()
        again = denoiser.predict_noise(x, t, cond)
    assert (patched - plain).abs().max() > 1e-3
    assert torch.equal(again, plain)


def test_generate_gives_images_on_the_cpu(denoiser):
    seen = []
    images = denoiser.generate(PROMPTS, SEEDS, steps=2, progress=lambda i, n: seen.append((i, n)))
    assert isinstance(images, torch.Tensor) and images.shape == (2, 3, 32, 32)
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert images.min() >= 0 and images.max() <= 1
    assert seen[-1] == (2, 2)
    single = denoiser.generate(PROMPTS[1:], SEEDS[1:], steps=2)  # an image depends only on its prompt and seed
    assert torch.allclose(single[0], images[1], atol=1e-4)


def test_encode_image_and_decode_round_trip(denoiser):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    x0 = denoiser.encode_image(images)
    assert x0.shape == (2, *denoiser.sample_shape) and x0.device == denoiser.device and x0.is_floating_point()
    back = denoiser.decode(x0)
    assert back.shape == images.shape and back.dtype == torch.float32 and back.device.type == "cpu"
    assert torch.allclose(back, images, atol=1e-5)  # the toy model's first stage is lossless


def test_the_backends_draw_the_same_images(backends):
    """Same weights behind three protocols: the same images. Not to float noise everywhere: the toy model's own
    scheduler clips x0 estimates to [-1, 1] (clip_sample), which the hosts' schedules (sigmas, alphas_cumprod)
    cannot say, so a few pixels differ by up to ~1e-2."""
    want = backends["diffusers"].generate(PROMPTS, SEEDS, steps=2, guidance=3.0)
    for name in ("comfyui", "a1111"):
        got = backends[name].generate(PROMPTS, SEEDS, steps=2, guidance=3.0)
        assert (got - want).abs().mean() < 1e-4 and (got - want).abs().max() < 0.03, name


def _delta_and_memory_patch(denoiser):
    g = torch.Generator().manual_seed(5)
    patch = _memory_patch(denoiser, seed=5)
    patch.deltas = {f"{layer}.to_k": WeightDelta(full=0.3 * torch.randn(w.shape, generator=g))
                    for layer in denoiser.layer_names()
                    for w in [denoiser.projection_weights()[f"{layer}.to_k"]]}
    return patch


def test_cross_attention_maps_are_the_probabilities_the_model_attends_with(backends):
    """diffusers' own attention probabilities (its classic processor, get_attention_scores) with a patch of to_k
    deltas and memory tokens attached, read back by cross_attention_maps; ComfyUI's and A1111's attn2 modules give
    the same maps for the same weights."""
    from diffusers.models.attention_processor import AttnProcessor

    from erasure_core.attention_maps import cross_attention_maps, word_positions
    from erasure_core.denoiser import patched

    toy = backends["diffusers"]
    prompt = "a blue square with stripes"
    positions = word_positions(toy.prompt_length, prompt, frozenset({"a", "with"}))
    assert positions == [2, 3, 5]  # blue, square, stripes; BOS is 0
    for name in ("comfyui", "a1111"):
        assert word_positions(backends[name].prompt_length, prompt, frozenset({"a", "with"})) == positions, name
    x = torch.randn(2, *toy.sample_shape, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([200, 700])
    seen = {}
    with torch.no_grad():
        for name, denoiser in backends.items():
            cond = denoiser.encode([prompt] * 2)
            with patched(denoiser, [(_delta_and_memory_patch(denoiser), 1.0)]), \
                    cross_attention_maps(denoiser.cross_attention_modules(), positions) as maps:
                denoiser.predict_noise(x, t, cond)
            seen[name] = maps
        reference = []
        modules = toy.cross_attention_modules()
        saved = {name: m.processor for name, m in modules.items()}
        for attn in modules.values():
            def scores(query, key, mask=None, attn=attn):
                probabilities = type(attn).get_attention_scores(attn, query, key, mask)
                reference.append(probabilities.view(-1, attn.heads, *probabilities.shape[1:]))
                return probabilities
            attn.get_attention_scores = scores
            attn.set_processor(AttnProcessor())
        try:
            with patched(toy, [(_delta_and_memory_patch(toy), 1.0)]):
                toy.predict_noise(x, t, toy.encode([prompt] * 2))
        finally:
            for name, attn in modules.items():
                del attn.get_attention_scores
                attn.set_processor(saved[name])
    assert len(reference) == len(seen["diffusers"]) == len(modules)
    context = toy.encode([prompt]).context.shape[1]
    assert all(r.shape[-1] == context + 4 for r in reference)  # the memory's 4 keys are attended to as well
    for want, got in zip(reference, seen["diffusers"]):
        assert got.shape == (*want.shape[:-1], len(positions))
        assert torch.allclose(got, want[..., positions], atol=1e-6)
    for name in ("comfyui", "a1111"):
        assert len(seen[name]) == len(reference), name
        for want, got in zip(seen["diffusers"], seen[name]):
            assert torch.allclose(got, want, atol=1e-5), name


def test_comfy_without_a_vae_samples_latents_and_says_what_is_missing(toy_model, backends):
    comfy = _comfy(toy_model, vae=False)
    latents = comfy.sample(PROMPTS, SEEDS, steps=2, guidance=3.0)
    assert latents.shape == (2, *comfy.sample_shape)
    with_vae = backends["comfyui"]
    assert torch.allclose(with_vae.decode(latents), with_vae.generate(PROMPTS, SEEDS, steps=2, guidance=3.0))
    for call in (lambda: comfy.generate(PROMPTS, SEEDS, steps=2), lambda: comfy.decode(latents),
                 lambda: comfy.encode_image(torch.rand(1, 3, 32, 32))):
        with pytest.raises(ValueError, match="needs a VAE"):
            call()
    with pytest.raises(TypeError, match="list of strings"):
        comfy.sample("a red circle", [0], steps=2)


def test_ldm_encode_image_follows_a1111_img2img(toy_model):
    """ldm: get_first_stage_encoding(encode_first_stage(2x − 1)), from the posterior's mode; no first stage
    encoder: a clear error."""
    from webui_fakes import FakeLatentDiffusion
    from erasure_core.backends.ldm import LdmDenoiser

    class Posterior:
        def __init__(self, mean):
            self.mean = mean

        def mode(self):
            return self.mean

        def sample(self):
            raise AssertionError("encode_image must be deterministic")

    sd_model = FakeLatentDiffusion(toy_model)
    model = LdmDenoiser(sd_model, resolution=32, latent_scale=1)
    with pytest.raises(ValueError, match="encode_first_stage"):
        model.encode_image(torch.rand(1, 3, 32, 32))
    sd_model.encode_first_stage = lambda x: Posterior(x + 1)
    sd_model.get_first_stage_encoding = lambda z: 0.5 * z
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(model.encode_image(images), 0.5 * (images * 2 - 1 + 1))
