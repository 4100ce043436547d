"""The method registry: a method registered once reaches every front end, with nothing else edited."""
from pathlib import Path

import pytest
import torch

from comfy_fakes.host import load_pack
from erasure_core import ui
from erasure_core.cli import main
from erasure_core.methods import MethodSpec, TrainResult, get_method, method_names, register, unregister
from erasure_core.patch import ConceptMemory, ErasurePatch, load_patch

ROOT = Path(__file__).resolve().parents[1]
NAME = "throwaway-test-method"


def train_throwaway(denoiser, config, *, cache=None, checkpoint=None, progress=None, cancel=None):
    """A closed-form stand-in: one memory token with a recognisable value."""
    memory = ConceptMemory(torch.zeros(1, denoiser.context_dim), torch.full((1, denoiser.context_dim), 0.5))
    return TrainResult(ErasurePatch(layers=denoiser.layer_names(), memory=memory, method=config.method,
                                    concepts=[config.concept]))


@pytest.fixture
def throwaway():
    spec = register(MethodSpec(NAME, "a method only this test knows", "no paper", reconstruction=False,
                               kind="closed-form", trains="one memory token", train=train_throwaway,
                               delta_lr=None))
    yield spec
    unregister(NAME)
    assert NAME not in method_names()


def _dropdown_choices(tab, elem_id):
    (block,) = [b for b in tab.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    return [c[1] if isinstance(c, (tuple, list)) else c for c in block.choices]


def test_a_registered_method_reaches_the_cli_the_node_and_the_tab(throwaway, toy_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert NAME in help_text and "a method only this test knows" in " ".join(help_text.split())

    node = load_pack(ROOT, "comfyui-concept-erasure").NODE_CLASS_MAPPINGS["ConceptErasureTrainPatch"]
    method_input = node.INPUT_TYPES()["required"]["method"]
    assert NAME in method_input[0] and "a method only this test knows" in method_input[1]["tooltip"]

    assert NAME in _dropdown_choices(ui.build_tab(lambda: toy_model, tmp_path), "erasure_method")

    # and it trains from the command line like any other method
    out = tmp_path / "p.safetensors"
    assert main(["train", "--concept", "circle", "--method", NAME, "--out", str(out)]) == 0
    patch = load_patch(out)
    assert patch.method == NAME and patch.concepts == ["circle"] and float(patch.memory.v[0, 0]) == 0.5


def test_names_are_unique_and_kinds_known():
    spec = get_method("uce")
    with pytest.raises(ValueError, match="already registered"):
        register(MethodSpec("uce", "another uce", "", False, "closed-form", "", train_throwaway))
    assert get_method("uce") is spec
    with pytest.raises(ValueError, match="kind must be one of"):
        MethodSpec("x", "", "", False, "magic", "", train_throwaway)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


def test_every_builtin_method_is_registered_with_its_facts():
    assert method_names()[:15] == ("memory", "memory-only", "memory-key", "all-but-one", "esd-x", "esd-x-strict",
                                   "esd-u", "uce", "rece", "adversarial-preservation", "prune-esd",
                                   "sdd", "forget-me-not", "saeuron", "dumo")
    assert get_method("saeuron").kind == "inference-time" and get_method("saeuron").delta_lr is None
    assert get_method("dumo").kind == "inference-time" and get_method("dumo").reconstruction
    assert [m for m in method_names() if get_method(m).takes_alternative] == \
        ["memory", "memory-only", "memory-key", "all-but-one", "uce", "rece"]
    assert get_method("rece").kind == "closed-form" and get_method("rece").reconstruction
    assert get_method("forget-me-not").trains == "attn2 to_k deltas" and not get_method("forget-me-not").reconstruction
    assert get_method("esd-u").delta_lr == 1e-4 and get_method("memory").memory_lr == 1e-2
    assert get_method("uce").kind == "closed-form" and get_method("memory-key").makes_key
    assert all(get_method(m).reconstruction for m in ("memory", "memory-only", "memory-key", "all-but-one"))
