"""Contract fakes of ComfyUI: small stand-ins that reproduce ComfyUI's calling conventions, read from its source.

What they reproduce, and where it comes from (ComfyUI, comfy/…):
- ldm/modules/attention.py `BasicTransformerBlock.forward`: extra_options is transformer_options minus
  `patches` / `patches_replace` plus n_heads, dim_head, attn_precision; the attn2_patch loop starts with
  `value is context` and calls `p(n, context, value, extra_options)` for every patch in order; CrossAttention
  projects k from `context` and v from `value`. `SpatialTransformer` sets `block_index` per transformer block.
- ldm/modules/diffusionmodules/openaimodel.py `UNetModel.forward`: `block` = ("input", i) / ("middle", 0) /
  ("output", i), `transformer_index` counts spatial transformers across the UNet.
- model_base.py `BaseModel.apply_model` and model_sampling.py (EPS, V_PREDICTION, ModelSamplingDiscrete): the
  model is called with sigma, not the timestep, and returns the denoised x0.
- model_patcher.py `ModelPatcher`: clone() shares the nn.Module, copies the patch lists and deep-copies
  model_options; set_model_attn2_patch appends to transformer_options["patches"]["attn2_patch"]; add_patches keeps
  only keys present in the model's state dict and returns them (everything else is dropped silently); weight
  patches are baked into the shared weights on load and restored from a backup on unload.
- samplers.py / conds.py: cond and uncond run in one batch; contexts of different lengths are padded to their
  least common multiple by repetition; transformer_options gets cond_or_uncond, sigmas and uuids during sampling
  only.
- Node execution happens under torch.inference_mode(), and loaded weights are inference tensors.
"""
from .ldm import BasicTransformerBlock, FakeBaseModel, build_comfy_model, comfy_cross_attention
from .patcher import FakeModelPatcher, ModelManagement, calc_cond_batch, pad_by_repetition

__all__ = ["BasicTransformerBlock", "FakeBaseModel", "build_comfy_model", "comfy_cross_attention",
           "FakeModelPatcher", "ModelManagement", "calc_cond_batch", "pad_by_repetition"]
