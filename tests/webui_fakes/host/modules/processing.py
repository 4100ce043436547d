"""Fake of modules.processing: the order of script calls around sampling, as in the WebUI's process_images.

A1111 samples through `p.sd_model.apply_model`; Forge (an sd_model with forge_objects) first resets the unet
patcher from forge_objects_after_applying_lora, calls process_before_every_sampling, and samples through the
patcher. Sampling is DDIM with CFG; `observe(p)` runs before every model call, so a test sees what the model
looked like during generation."""
import torch

from modules import extra_networks, infotext_utils, shared


class StableDiffusionProcessing:
    def __init__(self, sd_model, prompt="", seed=0, steps=4, cfg_scale=3.0, n_iter=1, script_args=(),
                 scripts=None, observe=None):
        self.sd_model, self.prompt, self.seed, self.steps, self.cfg_scale = sd_model, prompt, seed, steps, cfg_scale
        self.n_iter, self.script_args, self.scripts, self.observe = n_iter, tuple(script_args), scripts, observe
        self.extra_generation_params: dict = {}
        self.comments: dict = {}
        self.prompts, self.extra_network_data = [prompt], None

    def comment(self, text):
        self.comments[text] = 1


class Processed:
    """`comments` is what the UI shows under the gallery; `info` goes into the API response (A1111's js()
    carries extra_generation_params and infotexts, not comments)."""

    def __init__(self, p, images, infotexts):
        self.images, self.infotexts = images, infotexts
        self.info = infotexts[0] if infotexts else ""
        self.comments = "".join(f"{comment}\n" for comment in p.comments)
        self.extra_generation_params = p.extra_generation_params


def _sample(p, model_call, shape):
    from diffusers import DDIMScheduler

    a = torch.as_tensor(p.sd_model.alphas_cumprod).double()
    betas = 1 - a / torch.cat([torch.ones(1, dtype=a.dtype), a[:-1]])
    sched = DDIMScheduler(num_train_timesteps=len(a), trained_betas=betas.numpy(), clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(p.steps)
    c = p.sd_model.get_learned_conditioning(p.prompts).clone()
    uc = p.sd_model.get_learned_conditioning([""]).clone()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(p.seed))
    with torch.no_grad():
        for t in sched.timesteps:
            if p.observe:
                p.observe(p)
            eps_u, eps_c = model_call(torch.cat([x, x]), t.expand(2), torch.cat([uc, c])).chunk(2)
            x = sched.step(eps_u + p.cfg_scale * (eps_c - eps_u), t, x).prev_sample
    return p.sd_model.decode_first_stage(x)


def process_images(p, shape=(1, 3, 32, 32)):
    p.scripts.process(p)
    images = []
    for _ in range(p.n_iter):
        if shared.state.interrupted or shared.state.stopping_generation:
            break
        # as A1111, per batch: the prompt's <network:args> tags come out of the text and are activated
        p.prompts, p.extra_network_data = extra_networks.parse_prompts([p.prompt])
        extra_networks.activate(p, p.extra_network_data)
        if hasattr(p.sd_model, "forge_objects"):
            p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
            p.scripts.process_before_every_sampling(p, x=None, noise=None, c=None, uc=None)
            call = p.sd_model.forge_objects.unet.apply_model
        else:
            call = p.sd_model.apply_model
        images.append(_sample(p, call, shape))
    if p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    # as A1111: an infotext even when no image was made
    infotexts = [infotext_utils.create_infotext(p.prompt, {"Steps": p.steps, "Seed": p.seed,
                                                           **p.extra_generation_params})]
    processed = Processed(p, images, infotexts)
    p.scripts.postprocess(p, processed)
    return processed
