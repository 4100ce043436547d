"""Erasure Preview (before/after from one seed) and Purify Image (All-but-One purification of an IMAGE)."""
from __future__ import annotations

import torch

from erasure_core.backends.comfy import ComfyDenoiser
from erasure_core.denoiser import patched
from erasure_core.purify import purify

from .common import CATEGORY, interrupt_check, loader, patch_input, progress_bar, require_patch, strength_input


def _downscale(vae) -> int:
    """Pixels per latent cell of ComfyUI's VAE (spacial_compression_encode(), or downscale_ratio when it is a
    number; 8 for SD's VAEs)."""
    measure = getattr(vae, "spacial_compression_encode", None)
    ratio = measure() if callable(measure) else getattr(vae, "downscale_ratio", 8)
    return ratio if isinstance(ratio, int) and ratio > 0 else 8


def _image(images: torch.Tensor) -> torch.Tensor:
    """The protocol's images (N,3,H,W) as a ComfyUI IMAGE (N,H,W,3)."""
    return images.movedim(1, -1).contiguous()


class ConceptErasurePreview:
    DESCRIPTION = ("Draws one prompt from one seed twice, without and with the erasure patch, so you can see what "
                   "the patch changes (DDIM with classifier-free guidance). The MODEL is not changed.")
    CATEGORY = CATEGORY
    FUNCTION = "preview"
    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE")
    RETURN_NAMES = ("before", "after", "side_by_side")
    OUTPUT_TOOLTIPS = ("Without the patch.", "With the patch.", "Both, left to right.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model without the patch."}),
                "clip": ("CLIP", {"tooltip": "The text encoder that goes with the model."}),
                "vae": ("VAE", {"tooltip": "Decodes the two images."}),
                "erasure_patch": patch_input(),
                "strength": strength_input(),
                "prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "What to draw."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": False,
                                 "tooltip": "Same seed for both."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "DDIM steps."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 1.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale."}),
                "width": ("INT", {"default": 512, "min": 16, "max": 2048, "step": 8, "tooltip": "Image width."}),
                "height": ("INT", {"default": 512, "min": 16, "max": 2048, "step": 8, "tooltip": "Image height."}),
            },
            "optional": {
                "negative": ("STRING", {"default": "", "multiline": True, "tooltip": "Negative prompt."}),
            },
        }

    def preview(self, model, clip, vae, erasure_patch, strength, prompt, seed, steps, cfg, width, height,
                negative=""):
        patch = require_patch(erasure_patch)
        denoiser = ComfyDenoiser(model, clip, width=width, height=height, downscale=_downscale(vae), vae=vae,
                                 load_model=loader(), check_interrupt=interrupt_check())
        bar = progress_bar(2 * steps)
        before = denoiser.generate([prompt], [seed], steps, cfg, lambda i, n: bar.update_absolute(i, 2 * steps),
                                   negative=negative)
        with patched(denoiser, [(patch, strength)]):
            after = denoiser.generate([prompt], [seed], steps, cfg,
                                      lambda i, n: bar.update_absolute(steps + i, 2 * steps), negative=negative)
        before_img, after_img = _image(before), _image(after)
        return (before_img, after_img, torch.cat([before_img, after_img], dim=2))


class ConceptErasurePurifyImage:
    DESCRIPTION = ("All-but-One purification (our reconstruction of Hong et al., AAAI 2024): inverts the image "
                   "with DDIM under the original MODEL, then regenerates it with the erasure patch applied, so the "
                   "erased concept leaves the picture while the layout stays.")
    CATEGORY = CATEGORY
    FUNCTION = "purify"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The purified image.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The original model, without the patch."}),
                "clip": ("CLIP", {"tooltip": "The text encoder that goes with the model."}),
                "vae": ("VAE", {"tooltip": "Encodes the image and decodes the result."}),
                "erasure_patch": patch_input(),
                "image": ("IMAGE", {"tooltip": "The image to purify."}),
                "prompt": ("STRING", {"default": "", "multiline": True,
                                      "tooltip": "A description of the image; empty: the patch's erased concept."}),
                "strength": strength_input(),
                "steps": ("INT", {"default": 50, "min": 1, "max": 500, "tooltip": "DDIM steps each way."}),
                "guidance": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 30.0, "step": 0.1,
                                       "tooltip": "1 keeps the inversion nearly exact; higher pushes harder."}),
            },
        }

    def purify(self, model, clip, vae, erasure_patch, image, prompt, strength, steps, guidance):
        patch = require_patch(erasure_patch)
        ratio = _downscale(vae)
        height, width = (image.shape[1] // ratio) * ratio, (image.shape[2] // ratio) * ratio
        if height == 0 or width == 0:
            raise ValueError(f"the image is smaller than the VAE's {ratio}-pixel grid")
        pixels = image[:, :height, :width, :3]
        denoiser = ComfyDenoiser(model, clip, width=width, height=height, downscale=ratio, vae=vae,
                                 load_model=loader(), check_interrupt=interrupt_check())
        text = prompt.strip() or (patch.concepts[0] if patch.concepts else "")
        bar = progress_bar(2 * steps)
        latents = denoiser.encode_image(pixels.movedim(-1, 1))
        out = purify(denoiser, [(patch, strength)], latents, text, steps=steps, guidance=guidance,
                     progress=lambda i, n: bar.update_absolute(i, n))
        return (_image(denoiser.decode(out)),)
