"""A ComfyUI-style diffusion model built on a diffusers UNet's modules.

The attention path is written the way ComfyUI's comfy/ldm/modules/attention.py runs it (extra_options, the
attn2_patch loop, CrossAttention taking k from `context` and v from `value`), and the UNet walk the way
openaimodel.py's UNetModel.forward runs it (`block`, `block_index`, `transformer_index`). Resnets, samplers and
norms are the diffusers modules themselves, registered under their LDM paths (a resnet's as ComfyUI's ResBlock
names them: in_layers, emb_layers, out_layers, skip_connection; a downsampler's conv as `op`), so that

- parameter names of every attn2 projection are ComfyUI's: `input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`;
- without patches the output equals the diffusers UNet's on the same weights (tested in test_comfy_fakes.py).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from torch import nn


def comfy_cross_attention(attn, x, context=None, value=None):
    """ComfyUI's CrossAttention.forward on a module with to_q / to_k / to_v / to_out (attention_pytorch)."""
    q = attn.to_q(x)
    context = x if context is None else context
    k = attn.to_k(context)
    v = attn.to_v(value) if value is not None else attn.to_v(context)
    b, _, inner = q.shape
    heads = attn.heads
    q, k, v = (t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(b, -1, inner)
    for layer in attn.to_out:  # Linear, Dropout
        out = layer(out)
    return out


class BasicTransformerBlock(nn.Module):
    """BasicTransformerBlock.forward as ComfyUI runs it, patch loops included (replace patches: attn2 only)."""

    def __init__(self, norm1, attn1, norm2, attn2, norm3, ff, n_heads: int, d_head: int):
        super().__init__()
        self.norm1, self.attn1, self.norm2, self.attn2, self.norm3, self.ff = norm1, attn1, norm2, attn2, norm3, ff
        self.n_heads, self.d_head = n_heads, d_head
        self.attn_precision = None
        self.seen_extra_options: list[dict] = []  # recorded for tests that inspect what patches receive

    @classmethod
    def from_diffusers(cls, block) -> "BasicTransformerBlock":
        heads = block.attn2.heads
        return cls(block.norm1, block.attn1, block.norm2, block.attn2, block.norm3, block.ff, heads,
                   block.attn2.to_q.out_features // heads)

    def forward(self, x, context=None, transformer_options={}):
        extra_options = {}
        block = transformer_options.get("block", None)
        block_index = transformer_options.get("block_index", 0)
        transformer_patches = {}
        transformer_patches_replace = {}
        for key in transformer_options:
            if key == "patches":
                transformer_patches = transformer_options[key]
            elif key == "patches_replace":
                transformer_patches_replace = transformer_options[key]
            else:
                extra_options[key] = transformer_options[key]
        extra_options["n_heads"] = self.n_heads
        extra_options["dim_head"] = self.d_head
        extra_options["attn_precision"] = self.attn_precision

        n = self.norm1(x)
        context_attn1 = None
        value_attn1 = None
        if "attn1_patch" in transformer_patches:
            context_attn1 = n
            value_attn1 = context_attn1
            for p in transformer_patches["attn1_patch"]:
                n, context_attn1, value_attn1 = p(n, context_attn1, value_attn1, extra_options)
        n = comfy_cross_attention(self.attn1, n, context=context_attn1, value=value_attn1)
        for p in transformer_patches.get("attn1_output_patch", []):
            n = p(n, extra_options)
        x = x + n
        for p in transformer_patches.get("middle_patch", []):
            x = p(x, extra_options)

        n = self.norm2(x)
        context_attn2 = context
        value_attn2 = None
        if "attn2_patch" in transformer_patches:
            value_attn2 = context_attn2
            for p in transformer_patches["attn2_patch"]:
                n, context_attn2, value_attn2 = p(n, context_attn2, value_attn2, extra_options)
        self.seen_extra_options.append(dict(extra_options))
        transformer_block = (block[0], block[1], block_index) if block is not None else None
        attn2_replace = transformer_patches_replace.get("attn2", {})
        key = transformer_block if transformer_block in attn2_replace else block
        if key in attn2_replace:
            if value_attn2 is None:
                value_attn2 = context_attn2
            q = self.attn2.to_q(n)
            k = self.attn2.to_k(context_attn2)
            v = self.attn2.to_v(value_attn2)
            n = attn2_replace[key](q, k, v, extra_options)
            for layer in self.attn2.to_out:
                n = layer(n)
        else:
            n = comfy_cross_attention(self.attn2, n, context=context_attn2, value=value_attn2)
        for p in transformer_patches.get("attn2_output_patch", []):
            n = p(n, extra_options)
        x = x + n
        return x + self.ff(self.norm3(x))


class ComfySpatialTransformer(nn.Module):
    """SpatialTransformer: sets transformer_options["block_index"] for each of its transformer blocks."""

    def __init__(self, t2d):
        super().__init__()
        self.norm, self.proj_in, self.proj_out = t2d.norm, t2d.proj_in, t2d.proj_out
        self.use_linear = bool(t2d.use_linear_projection)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock.from_diffusers(b)
                                                for b in t2d.transformer_blocks)

    def forward(self, x, context=None, transformer_options={}):
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.movedim(1, 3).flatten(1, 2).contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = i
            x = block(x, context=context, transformer_options=transformer_options)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(x.shape[0], h, w, x.shape[-1]).movedim(3, 1).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class ResBlock(nn.Module):
    """A diffusers ResnetBlock2D's modules under ComfyUI's ResBlock names, run as the diffusers block runs."""

    def __init__(self, resnet: ResnetBlock2D):
        super().__init__()
        assert resnet.time_embedding_norm == "default" and not (resnet.up or resnet.down)
        self.in_layers = nn.Sequential(resnet.norm1, nn.SiLU(), resnet.conv1)
        self.emb_layers = nn.Sequential(nn.SiLU(), resnet.time_emb_proj)
        self.out_layers = nn.Sequential(resnet.norm2, nn.SiLU(), resnet.dropout, resnet.conv2)
        self.skip_connection = resnet.conv_shortcut if resnet.conv_shortcut is not None else nn.Identity()
        self.scale = resnet.output_scale_factor

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return (self.skip_connection(x) + self.out_layers(h)) / self.scale


class Downsample(nn.Module):
    """A diffusers Downsample2D's conv under ComfyUI's name, `op`."""

    def __init__(self, down):
        super().__init__()
        assert down.padding == 1 and getattr(down, "norm", None) is None
        self.op = down.conv

    def forward(self, x):
        return self.op(x)


def _forward_timestep_embed(layers, x, emb, context, transformer_options):
    for layer in layers:
        if isinstance(layer, ResBlock):
            x = layer(x, emb)
        elif isinstance(layer, ComfySpatialTransformer):
            x = layer(x, context, transformer_options)
            if "transformer_index" in transformer_options:
                transformer_options["transformer_index"] += 1
        else:
            x = layer(x)
    return x


class WrapperExecutor:
    """comfy.patcher_extension.WrapperExecutor: each wrapper is called as wrapper(executor, *args, **kwargs) and
    calls executor(*args, **kwargs) for the next one, the last the original; `class_obj` is the module."""

    def __init__(self, original, class_obj, wrappers, idx=0):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, list(wrappers), idx

    def __call__(self, *args, **kwargs):
        return WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.idx >= len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)


class ComfyUNetModel(nn.Module):
    """openaimodel.UNetModel's walk over input_blocks / middle_block / output_blocks, on diffusers modules."""

    def __init__(self, unet):
        super().__init__()
        self.time_proj = unet.time_proj
        self.time_embed = unet.time_embedding
        self.input_blocks = nn.ModuleList([nn.ModuleList([unet.conv_in])])
        for down in unet.down_blocks:
            attentions = getattr(down, "attentions", None)
            for j, resnet in enumerate(down.resnets):
                layers = [ResBlock(resnet)] + ([ComfySpatialTransformer(attentions[j])] if attentions is not None
                                               else [])
                self.input_blocks.append(nn.ModuleList(layers))
            if down.downsamplers is not None:
                self.input_blocks.append(nn.ModuleList([Downsample(down.downsamplers[0])]))
        mid = unet.mid_block
        self.middle_block = nn.ModuleList([ResBlock(mid.resnets[0]), ComfySpatialTransformer(mid.attentions[0]),
                                           ResBlock(mid.resnets[1])])
        self.output_blocks = nn.ModuleList()
        for up in unet.up_blocks:
            attentions = getattr(up, "attentions", None)
            for j, resnet in enumerate(up.resnets):
                layers = [ResBlock(resnet)] + ([ComfySpatialTransformer(attentions[j])] if attentions is not None
                                               else [])
                if j == len(up.resnets) - 1 and up.upsamplers is not None:
                    layers.append(up.upsamplers[0])
                self.output_blocks.append(nn.ModuleList(layers))
        self.out = nn.ModuleList([unet.conv_norm_out, unet.conv_act, unet.conv_out])

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        """As ComfyUI's: the DIFFUSION_MODEL wrappers of transformer_options["wrappers"] run around _forward."""
        wrappers = [w for ws in transformer_options.get("wrappers", {}).get("diffusion_model", {}).values()
                    for w in ws]
        return WrapperExecutor(self._forward, self, wrappers).execute(x, timesteps, context, y, control,
                                                                      transformer_options, **kwargs)

    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        emb = self.time_embed(self.time_proj(timesteps.expand(x.shape[0])).to(x.dtype))
        hs = []
        h = x
        for i, module in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", i)
            h = _forward_timestep_embed(module, h, emb, context, transformer_options)
            hs.append(h)
        transformer_options["block"] = ("middle", 0)
        h = _forward_timestep_embed(self.middle_block, h, emb, context, transformer_options)
        for i, module in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", i)
            h = torch.cat([h, hs.pop()], dim=1)
            h = _forward_timestep_embed(module, h, emb, context, transformer_options)
        for layer in self.out:
            h = layer(h)
        return h


class FakeModelSampling(nn.Module):
    """ModelSamplingDiscrete with EPS or V_PREDICTION: sigmas / log_sigmas buffers, sigma_data = 1."""

    def __init__(self, betas: torch.Tensor, prediction: str = "eps"):
        super().__init__()
        alphas_cumprod = torch.cumprod(1.0 - betas.double(), dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())
        self.sigma_data = 1.0
        self.prediction = prediction

    def calculate_input(self, sigma, noise):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        if self.prediction == "v":
            return model_input * self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2) \
                - model_output * sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        return model_input - model_output * sigma

    def timestep(self, sigma):
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=(len(self.sigmas) - 1))
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp().to(timestep.device)


class FakeLatentFormat:
    def __init__(self, channels: int, scale_factor: float = 1.0, downscale: int = 8):
        self.latent_channels = channels
        self.spacial_downscale_ratio = downscale
        self.scale_factor = scale_factor

    def process_in(self, latent):
        return latent * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor


class FakeBaseModel(nn.Module):
    """BaseModel: apply_model(x, sigma, c_crossattn=…, transformer_options=…) returns the denoised x0."""

    def __init__(self, diffusion_model, model_sampling, latent_channels: int, context_dim: int,
                 scale_factor: float = 1.0, downscale: int = 8):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.model_sampling = model_sampling
        self.latent_format = FakeLatentFormat(latent_channels, scale_factor, downscale)
        self.model_config = SimpleNamespace(unet_config={"context_dim": context_dim}, latent_format=self.latent_format)
        self.manual_cast_dtype = None
        self.adm_channels = 0
        self.device = torch.device("cpu")
        self.calls: list[dict] = []  # what apply_model received, for tests

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        self.calls.append({"transformer_options": transformer_options, "kwargs": sorted(kwargs)})
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        dtype = self.get_dtype()
        xc = xc.to(dtype)
        t = self.model_sampling.timestep(t).float()
        context = c_crossattn.to(dtype) if c_crossattn is not None else None
        out = self.diffusion_model(xc, t, context=context, control=control, transformer_options=transformer_options,
                                   **kwargs).float()
        return self.model_sampling.calculate_denoised(sigma, out, x)

    def get_dtype(self):
        return self.diffusion_model.dtype

    def process_latent_in(self, latent):
        return self.latent_format.process_in(latent)

    def process_latent_out(self, latent):
        return self.latent_format.process_out(latent)

    def encode_adm(self, **kwargs):
        return None


def scaled_linear_betas(n: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """SD's schedule (ComfyUI's make_beta_schedule "linear"): linspace of square roots, squared."""
    return torch.linspace(math.sqrt(start), math.sqrt(end), n, dtype=torch.float64) ** 2


def build_comfy_model(unet, betas: torch.Tensor | None = None, prediction: str = "eps", inference: bool = True,
                      scale_factor: float = 1.0, downscale: int = 8) -> FakeBaseModel:
    """A ComfyUI-style model with a copy of `unet`'s weights, created (like ComfyUI's) under inference mode."""
    from diffusers import UNet2DConditionModel

    betas = scaled_linear_betas() if betas is None else betas
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    mode = torch.inference_mode() if inference else torch.no_grad()
    with mode:
        copy = UNet2DConditionModel(**dict(unet.config))
        copy.load_state_dict(state)
        copy.eval()
        model = FakeBaseModel(ComfyUNetModel(copy), FakeModelSampling(betas, prediction),
                              unet.config.in_channels, int(unet.config.cross_attention_dim), scale_factor, downscale)
    return model
