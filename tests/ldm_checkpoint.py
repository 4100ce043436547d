"""Tiny single-file checkpoints in the original (LDM / CompVis / Stability) key layout, written from that layout's
structure, not through diffusers, so the loader's reading of the layout is checked against an independent
spelling of it. Random weights; GroupNorm needs widths that are multiples of 32."""
import torch


class _Writer:
    def __init__(self, seed: int) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(seed)

    def tensor(self, name: str, *shape: int) -> None:
        self.state[name] = torch.randn(*shape, generator=self.generator) * 0.05

    def linear(self, name: str, n_in: int, n_out: int, bias: bool = True) -> None:
        self.tensor(f"{name}.weight", n_out, n_in)
        if bias:
            self.tensor(f"{name}.bias", n_out)

    def conv(self, name: str, n_in: int, n_out: int, k: int = 3) -> None:
        self.tensor(f"{name}.weight", n_out, n_in, k, k)
        self.tensor(f"{name}.bias", n_out)

    def norm(self, name: str, n: int) -> None:
        self.state[f"{name}.weight"] = torch.ones(n)
        self.state[f"{name}.bias"] = torch.zeros(n)

    # -- UNet (ldm.modules.diffusionmodules.openaimodel) --
    def resblock(self, name: str, n_in: int, n_out: int, emb: int) -> None:
        self.norm(f"{name}.in_layers.0", n_in)
        self.conv(f"{name}.in_layers.2", n_in, n_out)
        self.linear(f"{name}.emb_layers.1", emb, n_out)
        self.norm(f"{name}.out_layers.0", n_out)
        self.conv(f"{name}.out_layers.3", n_out, n_out)
        if n_in != n_out:
            self.conv(f"{name}.skip_connection", n_in, n_out, 1)

    def transformer(self, name: str, n: int, context: int, depth: int, linear: bool) -> None:
        self.norm(f"{name}.norm", n)
        for proj in ("proj_in", "proj_out"):
            self.linear(f"{name}.{proj}", n, n) if linear else self.conv(f"{name}.{proj}", n, n, 1)
        for j in range(depth):
            block = f"{name}.transformer_blocks.{j}"
            for attn, source in (("attn1", n), ("attn2", context)):
                self.linear(f"{block}.{attn}.to_q", n, n, bias=False)
                self.linear(f"{block}.{attn}.to_k", source, n, bias=False)
                self.linear(f"{block}.{attn}.to_v", source, n, bias=False)
                self.linear(f"{block}.{attn}.to_out.0", n, n)
            self.linear(f"{block}.ff.net.0.proj", n, 8 * n)  # GEGLU: twice the inner width 4n
            self.linear(f"{block}.ff.net.2", 4 * n, n)
            for k in (1, 2, 3):
                self.norm(f"{block}.norm{k}", n)

    def unet(self, width, mults, attention, depths, context, heads_linear, adm=None) -> None:
        p, emb = "model.diffusion_model.", 4 * width
        self.linear(f"{p}time_embed.0", width, emb)
        self.linear(f"{p}time_embed.2", emb, emb)
        if adm:
            self.linear(f"{p}label_emb.0.0", adm, emb)
            self.linear(f"{p}label_emb.0.2", emb, emb)
        self.conv(f"{p}input_blocks.0.0", 4, width)
        skips, ch, i = [width], width, 1
        for level, mult in enumerate(mults):
            for _ in range(2):
                self.resblock(f"{p}input_blocks.{i}.0", ch, mult * width, emb)
                ch = mult * width
                if attention[level]:
                    self.transformer(f"{p}input_blocks.{i}.1", ch, context, depths[level], heads_linear)
                skips.append(ch)
                i += 1
            if level != len(mults) - 1:
                self.conv(f"{p}input_blocks.{i}.0.op", ch, ch)
                skips.append(ch)
                i += 1
        self.resblock(f"{p}middle_block.0", ch, ch, emb)
        self.transformer(f"{p}middle_block.1", ch, context, depths[-1], heads_linear)
        self.resblock(f"{p}middle_block.2", ch, ch, emb)
        i = 0
        for level in reversed(range(len(mults))):
            for r in range(3):
                self.resblock(f"{p}output_blocks.{i}.0", ch + skips.pop(), mults[level] * width, emb)
                ch = mults[level] * width
                if attention[level]:
                    self.transformer(f"{p}output_blocks.{i}.1", ch, context, depths[level], heads_linear)
                if level and r == 2:
                    self.conv(f"{p}output_blocks.{i}.{2 if attention[level] else 1}.conv", ch, ch)
                i += 1
        self.norm(f"{p}out.0", width)
        self.conv(f"{p}out.2", width, 4)

    # -- VAE (ldm.modules.diffusionmodules.model Encoder / Decoder) --
    def vae_resblock(self, name: str, n_in: int, n_out: int) -> None:
        self.norm(f"{name}.norm1", n_in)
        self.conv(f"{name}.conv1", n_in, n_out)
        self.norm(f"{name}.norm2", n_out)
        self.conv(f"{name}.conv2", n_out, n_out)
        if n_in != n_out:
            self.conv(f"{name}.nin_shortcut", n_in, n_out, 1)

    def vae_mid(self, name: str, n: int) -> None:
        self.vae_resblock(f"{name}.block_1", n, n)
        self.norm(f"{name}.attn_1.norm", n)
        for proj in ("q", "k", "v", "proj_out"):
            self.conv(f"{name}.attn_1.{proj}", n, n, 1)
        self.vae_resblock(f"{name}.block_2", n, n)

    def vae(self, width: int, mults: tuple[int, ...]) -> None:
        p, z = "first_stage_model.", 4
        self.conv(f"{p}encoder.conv_in", 3, width)
        ch = width
        for level, mult in enumerate(mults):
            for j in range(2):
                self.vae_resblock(f"{p}encoder.down.{level}.block.{j}", ch, mult * width)
                ch = mult * width
            if level != len(mults) - 1:
                self.conv(f"{p}encoder.down.{level}.downsample.conv", ch, ch)
        self.vae_mid(f"{p}encoder.mid", ch)
        self.norm(f"{p}encoder.norm_out", ch)
        self.conv(f"{p}encoder.conv_out", ch, 2 * z)
        self.conv(f"{p}quant_conv", 2 * z, 2 * z, 1)
        self.conv(f"{p}post_quant_conv", z, z, 1)
        self.conv(f"{p}decoder.conv_in", z, ch)
        self.vae_mid(f"{p}decoder.mid", ch)
        for level in reversed(range(len(mults))):
            for j in range(3):
                self.vae_resblock(f"{p}decoder.up.{level}.block.{j}", ch, mults[level] * width)
                ch = mults[level] * width
            if level:
                self.conv(f"{p}decoder.up.{level}.upsample.conv", ch, ch)
        self.norm(f"{p}decoder.norm_out", width)
        self.conv(f"{p}decoder.conv_out", width, 3)

    # -- text encoders --
    def clip(self, p: str, hidden: int, layers: int) -> None:
        """OpenAI CLIP in Hugging Face's spelling, as SD1.x and SDXL's first encoder store it."""
        t = f"{p}text_model."
        self.tensor(f"{t}embeddings.token_embedding.weight", 49408, hidden)
        self.tensor(f"{t}embeddings.position_embedding.weight", 77, hidden)
        for i in range(layers):
            layer = f"{t}encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                self.linear(f"{layer}self_attn.{proj}", hidden, hidden)
            self.norm(f"{layer}layer_norm1", hidden)
            self.linear(f"{layer}mlp.fc1", hidden, 4 * hidden)
            self.linear(f"{layer}mlp.fc2", 4 * hidden, hidden)
            self.norm(f"{layer}layer_norm2", hidden)
        self.norm(f"{t}final_layer_norm", hidden)

    def open_clip(self, p: str, hidden: int, layers: int, projection: int) -> None:
        """OpenCLIP's own spelling, as SD2.x and SDXL's second encoder store it."""
        self.tensor(f"{p}token_embedding.weight", 49408, hidden)
        self.tensor(f"{p}positional_embedding", 77, hidden)
        for i in range(layers):
            block = f"{p}transformer.resblocks.{i}."
            self.norm(f"{block}ln_1", hidden)
            self.tensor(f"{block}attn.in_proj_weight", 3 * hidden, hidden)
            self.tensor(f"{block}attn.in_proj_bias", 3 * hidden)
            self.linear(f"{block}attn.out_proj", hidden, hidden)
            self.norm(f"{block}ln_2", hidden)
            self.linear(f"{block}mlp.c_fc", hidden, 4 * hidden)
            self.linear(f"{block}mlp.c_proj", 4 * hidden, hidden)
        self.norm(f"{p}ln_final", hidden)
        self.tensor(f"{p}text_projection", hidden, projection)
        self.state[f"{p}logit_scale"] = torch.tensor(4.6)


def sd15_ldm_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """SD1.5's own architecture, random weights in float16 (1.1 B parameters, 2.1 GB): for the real hosts."""
    w = _Writer(seed)
    w.clip("cond_stage_model.transformer.", 768, 12)
    w.unet(320, (1, 2, 4, 4), (True, True, True, False), (1, 1, 1, 1), 768, heads_linear=False)
    w.vae(128, (1, 2, 4, 4))
    return {k: v.half() for k, v in w.state.items()}


def tiny_ldm_checkpoint(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random-weight checkpoint of the family's layout at toy widths: "sd1", "sd2" or "sdxl"."""
    w = _Writer(seed)
    if family == "sd1":
        w.clip("cond_stage_model.transformer.", 64, 2)
        w.unet(32, (1, 2), (True, False), (1, 1), 64, heads_linear=False)
    elif family == "sd2":
        w.open_clip("cond_stage_model.model.", 64, 3, 64)
        w.unet(64, (1, 2), (True, True), (1, 1), 64, heads_linear=True)
    elif family == "sdxl":
        w.clip("conditioner.embedders.0.transformer.", 64, 2)
        w.open_clip("conditioner.embedders.1.model.", 64, 2, 64)
        w.unet(64, (1, 1, 2), (False, True, True), (0, 1, 2), 128, heads_linear=True, adm=64 + 6 * 256)
    else:
        raise ValueError(family)
    w.vae(32, (1, 2))
    return w.state
