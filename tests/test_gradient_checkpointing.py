"""TrainConfig.gradient_checkpointing: the UNet's transformer blocks are recomputed in the backward pass. Same
patch as without it, the blocks' forward restored afterwards, the weights untouched."""
from dataclasses import replace

import pytest
import torch

from erasure_core.injection import recomputed_transformer_blocks
from erasure_core.engine import TrainConfig
from erasure_core.methods import train_patch


def _checksum(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# memory and deltas in attn2; deltas inside whole blocks; attention probabilities read from inside the blocks
@pytest.mark.parametrize("method", ["memory", "esd-u", "forget-me-not"])
def test_recomputing_the_blocks_trains_the_same_patch(toy_model, method):
    unet = toy_model.network()
    before = _checksum(unet)
    config = TrainConfig(concept="a circle", method=method, steps=2, batch=2, cache_seeds=1, cache_steps=2)
    plain = train_patch(toy_model, config)
    recomputed = train_patch(toy_model, replace(config, gradient_checkpointing=True))
    assert torch.allclose(torch.tensor(plain.losses), torch.tensor(recomputed.losses), atol=1e-6)
    assert plain.patch.deltas.keys() == recomputed.patch.deltas.keys() and plain.patch.deltas
    for key in plain.patch.deltas:
        assert torch.allclose(plain.patch.deltas[key].full, recomputed.patch.deltas[key].full, atol=1e-6)
    if method == "memory":
        assert torch.allclose(plain.patch.memory.k, recomputed.patch.memory.k, atol=1e-6)
        assert torch.allclose(plain.patch.memory.v, recomputed.patch.memory.v, atol=1e-6)
    assert all("forward" not in m.__dict__ for m in unet.modules())  # the class's forward again
    assert all(torch.equal(a, b) for a, b in zip(before, _checksum(unet)))


def test_the_blocks_save_no_activations_for_backward_while_open(toy_model):
    unet = toy_model.network()
    x = torch.randn(2, *toy_model.sample_shape)
    cond = toy_model.encode(["a red circle", "a blue star"])
    leaf = torch.zeros((), requires_grad=True)  # something to differentiate, as a patch's tensors are

    def saved_tensors() -> int:
        count = [0]

        def pack(tensor):
            count[0] += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            (toy_model.predict_noise(x + leaf, torch.tensor([500, 500]), cond) ** 2).mean().backward()
        return count[0]

    kept = saved_tensors()
    with recomputed_transformer_blocks(unet) as blocks:
        recomputed = saved_tensors()
    assert blocks > 0 and recomputed < kept
    assert all("forward" not in m.__dict__ for m in unet.modules())


def test_comfyui_training_recomputes_the_blocks_with_the_weights_it_swapped_in(toy_model):
    """ComfyDenoiser trains through functional_call, which swaps W + s·ΔW in for the call only: the recomputed
    blocks must run with those, not with the module's own weights after the call."""
    from comfy_fakes import FakeModelPatcher, build_comfy_model
    from comfy_fakes.host import FakeCLIP
    from erasure_core.backends.comfy import ComfyDenoiser
    from erasure_core.toy.model import train_scheduler

    model = build_comfy_model(toy_model.unet, betas=train_scheduler().betas)
    comfy = ComfyDenoiser(FakeModelPatcher(model), FakeCLIP(toy_model.tokenizer, toy_model.text_encoders[0]),
                          width=32, height=32, downscale=1, chunk=16)
    config = TrainConfig(concept="a circle", method="memory", steps=2, batch=2, cache_seeds=1, cache_steps=2)
    plain = train_patch(comfy, config)
    with recomputed_transformer_blocks(comfy.network()) as blocks:
        assert blocks > 0  # the fake's blocks carry ComfyUI's class name
    recomputed = train_patch(comfy, replace(config, gradient_checkpointing=True))
    for key in plain.patch.deltas:
        assert torch.allclose(plain.patch.deltas[key].full, recomputed.patch.deltas[key].full, atol=1e-6)
    assert torch.allclose(plain.patch.memory.k, recomputed.patch.memory.k, atol=1e-6)
