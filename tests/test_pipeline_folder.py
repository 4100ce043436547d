"""`--model PATH` with a local diffusers pipeline folder, built and saved by the test itself."""
import pytest
import torch
from PIL import Image

from erasure_core.cli import main


@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasure_core.toy.model import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                max_position_embeddings=tokenizer.model_max_length,
                                                pad_token_id=tokenizer.pad_token_id,
                                                bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16,
                        sample_size=16)
    scheduler = DDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("tiny-sd")
    pipe.save_pretrained(folder)
    return folder


def test_generate_from_a_local_pipeline_folder_offline(tiny_sd_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "g.png"
    assert main(["generate", "--model", str(tiny_sd_folder), "--prompt", "a red circle", "--n", "2",
                 "--steps", "3", "--out", str(out)]) == 0
    assert Image.open(out).height > 16


def test_pipeline_backend_reports_its_parameterisation(tiny_sd_folder):
    from erasure_core.backends.diffusers_backend import load_pipeline_folder

    model = load_pipeline_folder(tiny_sd_folder)
    assert model.context_dim == 32 and model.sample_shape == (4, 8, 8)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    cond = model.encode(["a red circle"])
    with torch.no_grad():
        raw = model.unet(x, t, cond.context).sample
        eps = model.predict_noise(x, t, cond)
    a = model.scheduler().alphas_cumprod[500]
    assert torch.allclose(eps, (1 - a).sqrt() * x + a.sqrt() * raw, atol=1e-5)  # v converted to ε
    images = model.generate(["a circle"], [0], steps=2)
    assert images.shape == (1, 3, 16, 16)


def test_a_broken_pipeline_folder_is_a_user_error(tiny_sd_folder, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_folder, broken)
    shutil.rmtree(broken / "vae")
    assert main(["generate", "--model", str(broken), "--prompt", "x", "--out", str(tmp_path / "g.png")]) == 2
    assert "cannot load the pipeline" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_sdxl_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from erasure_core.toy.model import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer()

    def text_config(hidden):
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=hidden,
                              max_position_embeddings=tokenizer.model_max_length, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=48, attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=16)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16,
                        sample_size=16)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text_config(16)), tokenizer=tokenizer,
                                     text_encoder_2=CLIPTextModelWithProjection(text_config(32)),
                                     tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler())
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    pipe.save_pretrained(folder)
    return folder


def test_sdxl_pipeline_folder_encodes_both_text_encoders(tiny_sdxl_folder, tmp_path):
    from erasure_core.backends.diffusers_backend import load_pipeline_folder

    model = load_pipeline_folder(tiny_sdxl_folder)
    cond = model.encode(["a red circle", "a square"])
    assert cond.context.shape == (2, 16, 48)  # 16 + 32 channels, concatenated
    assert cond.extra["text_embeds"].shape == (2, 32) and cond.extra["time_ids"].shape == (2, 6)
    assert len(model.layer_names()) == 2 + 2 + 2 * 2  # input 1x2, middle 2, output 2x2 transformer blocks
    out = tmp_path / "xl.png"
    assert main(["generate", "--model", str(tiny_sdxl_folder), "--prompt", "a red circle", "--n", "1",
                 "--steps", "2", "--out", str(out)]) == 0
