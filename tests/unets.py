"""UNets with the real block structure of SD1.x, SD2.x, SDXL and the toy model, at tiny widths, random weights."""
import torch
from diffusers import UNet2DConditionModel

SD1_INPUT, SD1_OUTPUT = (1, 2, 4, 5, 7, 8), tuple(range(3, 12))


def sd1_unet(cross_dim=32, **kw):
    """SD1.x: 4 levels, 2 layers each, cross-attention in the first three down and last three up blocks."""
    torch.manual_seed(0)
    cfg = dict(sample_size=8, block_out_channels=(32, 32, 32, 32), layers_per_block=2, cross_attention_dim=cross_dim,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8, norm_num_groups=8)
    cfg.update(kw)
    return UNet2DConditionModel(**cfg)


def sd2_unet():
    """SD2.x: the SD1.x blocks with heads per level (SD2 uses 5, 10, 20, 20), linear projections, 1024-d context."""
    return sd1_unet(cross_dim=1024, attention_head_dim=(2, 4, 8, 8), use_linear_projection=True)


def sdxl_unet():
    """SDXL: 3 levels, no attention at the first, 2 and 10 transformer blocks deeper, text_time added embeddings."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 32), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=56,
        norm_num_groups=8)


def toy_unet():
    """The toy model's layout (erasure_core.toy.model.UNET_CONFIG) with random weights, not the shipped ones."""
    from erasure_core.toy.model import UNET_CONFIG

    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET_CONFIG)
