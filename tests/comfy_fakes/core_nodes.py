"""The core ComfyUI nodes the example workflows use, with INPUT_TYPES / RETURN_TYPES as ComfyUI's nodes.py
declares them (tooltips left out). File lists (checkpoints, input images) depend on the user's folders: any
non-empty file name is accepted for them (FILES)."""

MAX_RESOLUTION = 16384
FILES = "FILES"  # a combo of file names found on disk

# comfy.samplers.KSampler.SAMPLERS / SCHEDULERS (a stable subset: the names every recent ComfyUI has)
SAMPLERS = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
            "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu",
            "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
            "ipndm", "ipndm_v", "deis", "ddim", "uni_pc", "uni_pc_bh2"]
SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"]

CORE_NODES = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": (FILES, {})}},
        "output": ("MODEL", "CLIP", "VAE"),
    },
    "CLIPTextEncode": {
        "input": {"required": {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
                               "clip": ("CLIP", {})}},
        "output": ("CONDITIONING",),
    },
    "EmptyLatentImage": {
        "input": {"required": {"width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
                               "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
                               "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}},
        "output": ("LATENT",),
    },
    "KSampler": {
        "input": {"required": {
            "model": ("MODEL", {}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (SAMPLERS, {}),
            "scheduler": (SCHEDULERS, {}),
            "positive": ("CONDITIONING", {}),
            "negative": ("CONDITIONING", {}),
            "latent_image": ("LATENT", {}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }},
        "output": ("LATENT",),
    },
    "VAEDecode": {
        "input": {"required": {"samples": ("LATENT", {}), "vae": ("VAE", {})}},
        "output": ("IMAGE",),
    },
    "VAEEncode": {
        "input": {"required": {"pixels": ("IMAGE", {}), "vae": ("VAE", {})}},
        "output": ("LATENT",),
    },
    "SaveImage": {
        "input": {"required": {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
        "output": (),
    },
    "PreviewImage": {
        "input": {"required": {"images": ("IMAGE", {})}},
        "output": (),
    },
    "ImageScale": {
        "input": {"required": {"image": ("IMAGE", {}),
                               "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], {}),
                               "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
                               "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
                               "crop": (["disabled", "center"], {})}},
        "output": ("IMAGE",),
    },
    "LoadImage": {
        "input": {"required": {"image": (FILES, {"image_upload": True})}},
        "output": ("IMAGE", "MASK"),
    },
}
