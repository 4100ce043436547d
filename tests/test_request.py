"""One training request: every front end turns the same inputs into the same TrainConfig, with one set of checks."""
import importlib
from pathlib import Path

import pytest

from comfy_fakes.host import load_pack
from erasure_core import ui
from erasure_core.cli import build_parser
from erasure_core.cli.train import request_from_args
from erasure_core.methods import MethodSpec, TrainResult, register, unregister
from erasure_core.request import RequestError, TrainRequest, prepare

ROOT = Path(__file__).resolve().parents[1]


def _node_train_module():
    load_pack(ROOT, "comfyui-concept-erasure")
    return importlib.import_module("comfyui-concept-erasure.nodes.train")


def through_every_front_end(model, concept, method, alternative, preserve, steps, lr, layers, seed):
    """The same user inputs, typed into the CLI, the ComfyUI node and the WebUI tab."""
    argv = ["train", "--concept", concept, "--method", method, "--alternative", alternative, "--preserve", preserve,
            "--steps", str(steps), "--layers", layers, "--seed", str(seed), "--out", "x.safetensors"]
    cli = request_from_args(build_parser().parse_args(argv + (["--lr", str(lr)] if lr else [])))
    node = _node_train_module().make_request(concept, method, alternative, preserve, steps, lr, layers, seed)
    tab = ui.TabRequest(concept=concept, method=method, alternative=alternative, preserve=preserve, steps=steps,
                        lr=lr, layers=layers, seed=seed).training()
    return {name: prepare(request, model) for name, request in (("cli", cli), ("node", node), ("tab", tab))}


@pytest.mark.parametrize("inputs", [
    dict(concept="circle", method="memory", alternative="square", preserve="auto", steps=50, lr=0.0, layers="all",
         seed=3),
    dict(concept="stripes", method="esd-x", alternative="checker", preserve="dots, grid", steps=7, lr=2e-3,
         layers="mid", seed=0),
    dict(concept="star", method="all-but-one", alternative="", preserve="none", steps=20, lr=0.0, layers="midout",
         seed=1),
])
def test_the_cli_the_node_and_the_tab_build_equal_configs(toy_model, inputs):
    plans = through_every_front_end(toy_model, **inputs)
    configs = {name: plan.config for name, plan in plans.items()}
    assert configs["cli"] == configs["node"] == configs["tab"], configs
    assert plans["cli"].notes == plans["node"].notes == plans["tab"].notes


def test_defaults_and_what_each_method_takes(toy_model):
    plan = prepare(TrainRequest(concept="circle", method="esd-x", alternative="square"), toy_model)
    assert plan.config.alternative == "" and plan.alternative == ""
    assert plan.notes == ["esd-x takes no alternative; 'square' is ignored"]
    auto = prepare(TrainRequest(concept="circle"), toy_model)  # "auto": every other concept of the toy world
    assert auto.preserve[:2] == ["square", "triangle"] and len(auto.preserve) == 15
    assert auto.config.preserve[0] == "a square" and auto.config.concept == "a circle"
    lines = prepare(TrainRequest(concept="circle", preserve="square\ntriangle, star"), toy_model)
    assert lines.preserve == ["square", "triangle", "star"]
    assert prepare(TrainRequest(concept="circle", preserve="none"), toy_model).preserve == []
    assert prepare(TrainRequest(concept="circle", lr=0), toy_model).config.delta_lr == 1e-3
    assert prepare(TrainRequest(concept="circle", method="esd-u"), toy_model).config.delta_lr == 1e-4
    assert prepare(TrainRequest(concept="circle"), toy_model).config.memory_rate == 1e-2


def test_a_model_without_vocabulary_takes_the_text_as_it_is(toy_model, monkeypatch):
    monkeypatch.setattr(toy_model, "vocabulary", None)
    plan = prepare(TrainRequest(concept="Van Gogh", alternative="dry brushing", preserve="none"), toy_model)
    assert (plan.config.concept, plan.config.alternative, plan.config.preserve) == ("Van Gogh", "dry brushing", [])


def test_auto_on_a_model_without_vocabulary_keeps_the_word_lists_nearest_concepts(toy_model, monkeypatch):
    from erasure_core.candidates import nearest_concepts
    from erasure_core.request import AUTO_PRESERVE

    monkeypatch.setattr(toy_model, "vocabulary", None)
    plan = prepare(TrainRequest(concept="Van Gogh"), toy_model)
    assert plan.preserve == plan.config.preserve == nearest_concepts(toy_model, "Van Gogh", AUTO_PRESERVE)
    assert len(plan.preserve) == AUTO_PRESERVE and not {"van", "gogh"} & {p.lower() for p in plan.preserve}
    assert plan.notes == [f"preserving the 8 nearest concepts of the word list: {', '.join(plan.preserve)}"]
    assert prepare(TrainRequest(concept="Van Gogh", method="uce"), toy_model).preserve == plan.preserve


def test_a_checkpoint_trains_at_batch_1_by_default_and_the_toy_at_the_engines_8(toy_model, monkeypatch):
    from erasure_core.engine import TrainConfig
    from erasure_core.request import CHECKPOINT_BATCH

    assert prepare(TrainRequest(concept="circle"), toy_model).config.batch == TrainConfig.batch == 8
    monkeypatch.setattr(toy_model, "vocabulary", None)  # as a real checkpoint: no toy world
    assert prepare(TrainRequest(concept="Van Gogh", preserve="none"), toy_model).config.batch == CHECKPOINT_BATCH == 1
    assert prepare(TrainRequest(concept="Van Gogh", batch=4), toy_model).config.batch == 4


def test_a_checkpoint_trains_with_gradient_checkpointing_unless_told_not_to(toy_model, monkeypatch):
    assert not prepare(TrainRequest(concept="circle"), toy_model).config.gradient_checkpointing  # the toy: off
    assert prepare(TrainRequest(concept="circle", gradient_checkpointing=True), toy_model).config.gradient_checkpointing
    monkeypatch.setattr(toy_model, "vocabulary", None)
    assert prepare(TrainRequest(concept="Van Gogh"), toy_model).config.gradient_checkpointing
    off = TrainRequest(concept="Van Gogh", gradient_checkpointing=False)
    assert not prepare(off, toy_model).config.gradient_checkpointing


def test_a_method_that_needs_an_alternative_asks_for_it(toy_model):
    register(MethodSpec("needs-alt-test", "", "", False, "closed-form", "", lambda *a, **k: TrainResult(None),
                        takes_alternative=True, needs_alternative=True))
    try:
        with pytest.raises(RequestError, match="needs an alternative"):
            prepare(TrainRequest(concept="circle", method="needs-alt-test"), toy_model)
        assert prepare(TrainRequest(concept="circle", method="needs-alt-test", alternative="square"),
                       toy_model).config.alternative == "a square"
    finally:
        unregister("needs-alt-test")


@pytest.mark.parametrize("change, message", [
    (dict(concept=" "), "name the concept"), (dict(concept="octagon"), "unknown concept 'octagon'"),
    (dict(preserve="square, octagon"), "unknown concept 'octagon'"), (dict(method="nope"), "unknown method"),
    (dict(steps=0), "steps must be"), (dict(lr=2.0), "learning rate must be"), (dict(tokens=0), "memory tokens"),
    (dict(layers="nowhere"), "has no cross-attention layer"),
])
def test_bad_requests_are_refused_with_what_to_change(toy_model, change, message):
    with pytest.raises(ValueError, match=message):
        prepare(TrainRequest(**{"concept": "circle", **change}), toy_model)


def test_a_run_that_cannot_fit_in_free_memory_is_refused_with_what_to_lower(toy_model, monkeypatch):
    from erasure_core import memory_estimate

    needed = memory_estimate.estimate(toy_model.network(), 8, toy_model.sample_shape[-1], False)
    assert needed > 0
    monkeypatch.setattr(memory_estimate, "free_memory", lambda device: (needed // 2, "of RAM available"))
    with pytest.raises(RequestError, match=r"would need about .* lower the batch \(now 8\) to 1.*Nothing was trained"):
        prepare(TrainRequest(concept="circle"), toy_model)
    assert prepare(TrainRequest(concept="circle", method="uce"), toy_model)  # closed form: no activations to keep
    smaller = memory_estimate.estimate(toy_model.network(), 1, toy_model.sample_shape[-1], True)
    assert smaller < needed // 2 and prepare(TrainRequest(concept="circle", batch=1, gradient_checkpointing=True),
                                             toy_model)
    monkeypatch.setattr(memory_estimate, "free_memory", lambda device: (None, "free (unknown)"))
    assert prepare(TrainRequest(concept="circle"), toy_model)  # unknown: nothing is refused


def test_the_cache_in_ram_is_asked_for_the_same_way_in_every_front_end(toy_model):
    argv = ["train", "--concept", "circle", "--out", "x.safetensors"]
    asked = {"cli": request_from_args(build_parser().parse_args(argv + ["--cache-on-cpu"])),
             "node": _node_train_module().make_request("circle", "memory", "", "auto", 200, 0.0, "all", 0,
                                                       cache_on_cpu=True),
             "tab": ui.TabRequest(concept="circle", cache_on_cpu=True).training()}
    assert all(prepare(request, toy_model).config.cache_on_cpu for request in asked.values())
    plain = request_from_args(build_parser().parse_args(argv))
    assert not prepare(plain, toy_model).config.cache_on_cpu
