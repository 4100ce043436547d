"""`--model model.safetensors`: single-file SD1.x / SD2.x / SDXL checkpoints in the original key layout, offline.
The files are written by the test (tests/ldm_checkpoint.py spells the layout out independently of diffusers)."""
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from erasure_core.backends.single_file import CheckpointError, checkpoint_family, clip_tokenizer, load_single_file
from erasure_core.cli import main
from ldm_checkpoint import tiny_ldm_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single-file")
    out = {}
    for family in ("sd1", "sd2", "sdxl"):
        state = tiny_ldm_checkpoint(family)
        save_file(state, folder / f"tiny-{family}.safetensors")
        out[family] = (folder / f"tiny-{family}.safetensors", state)
    return out


def test_the_clip_tokenizer_is_built_offline_from_the_shipped_merges():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    # CLIP's published ids: <|startoftext|> a photo of a cat <|endoftext|>
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_tokenizer(pad="!").pad_token_id == 0  # OpenCLIP (SD2.x, SDXL's second encoder) pads with "!"


def _numel(state: dict, prefix: str) -> int:
    return sum(v.numel() for k, v in state.items() if k.startswith(prefix))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_tensor_of_the_file_lands_in_the_model(files, family, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, state = files[family]
    assert checkpoint_family(state) == family
    model = load_single_file(path)
    unet_numel = sum(p.numel() for p in model.unet.parameters())
    assert unet_numel == _numel(state, "model.diffusion_model.")
    assert sum(p.numel() for p in model.vae.parameters()) == _numel(state, "first_stage_model.")
    assert not any(t.is_meta for m in [model.unet, model.vae, *model.text_encoders]
                   for t in [*m.parameters(), *m.buffers()])
    # one tensor followed through the renaming: the first cross-attention's key projection
    level = {"sd1": 0, "sd2": 0, "sdxl": 1}[family]
    block = {"sd1": 1, "sd2": 1, "sdxl": 4}[family]
    ldm = state[f"model.diffusion_model.input_blocks.{block}.1.transformer_blocks.0.attn2.to_k.weight"]
    ours = model.unet.down_blocks[level].attentions[0].transformer_blocks[0].attn2.to_k.weight
    assert torch.equal(ours, ldm)
    # the text encoders feed the UNet's cross-attention, and one step runs
    cond = model.encode(["a red circle"])
    assert cond.context.shape[-1] == model.context_dim == ldm.shape[1]
    x = torch.randn(1, *model.sample_shape)
    with torch.no_grad():
        eps = model.predict_noise(x, torch.tensor([500]), cond)
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_sd2_conditions_on_the_penultimate_openclip_layer_and_predicts_velocity(files):
    path, state = files["sd2"]
    model = load_single_file(path)
    encoder = model.text_encoders[0]
    assert encoder.config.num_hidden_layers == 2  # of the file's 3 blocks
    q = next(p for n, p in encoder.named_parameters() if n.endswith("layers.0.self_attn.q_proj.weight"))
    assert torch.equal(q, state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"][:64])
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    assert load_single_file(path, prediction_type="epsilon").scheduler_config["prediction_type"] == "epsilon"


def test_generate_from_a_single_file_checkpoint_offline(files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "g.png"
    assert main(["generate", "--model", str(files["sd1"][0]), "--prompt", "a red circle", "--n", "1",
                 "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).height >= 128  # one 128 px image: SD1.x's 64-latent default, the tiny VAE upsamples 2x


def test_files_that_are_not_checkpoints_are_refused_with_one_line(files, tmp_path, capsys):
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"\x80\x04K\x01.")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in files["sd1"][1].items() if k.startswith("model.diffusion_model.")}, unet_only)
    truncated = tmp_path / "truncated.safetensors"
    save_file({k: v for k, v in files["sd1"][1].items() if "output_blocks.0." not in k}, truncated)
    cases = [(pickled, "pickled checkpoint"), (garbage, "not a readable .safetensors"),
             (unet_only, "first_stage_model"), (truncated, "does not match the architecture"),
             (tmp_path / "absent.safetensors", "no checkpoint file")]
    for path, message in cases:
        code = main(["generate", "--model", str(path), "--prompt", "x", "--out", str(tmp_path / "g.png")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (path.name, err)
    with pytest.raises(CheckpointError):
        load_single_file(unet_only)
