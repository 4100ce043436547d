"""AUTOMATIC1111 / Forge: the "Concept Erasure" accordion in txt2img and img2img, and the training tab.

Thin on purpose: loading and validating patches, the hooks (A1111), the unet-patcher path (Forge) and the tab
live in erasure_core; this file connects them to the WebUI's Script, callbacks, settings and infotext.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # the WebUI loads this file by path; erasure_core sits in the extension's root
    sys.path.insert(0, _ROOT)

import gradio as gr  # noqa: E402
from modules import extra_networks, script_callbacks, scripts, shared  # noqa: E402

from erasure_core import ui as erasure_ui  # noqa: E402
from erasure_core.backends import ldm  # noqa: E402
from erasure_core.backends.comfy import refuse_for_forge  # noqa: E402
from erasure_core.layers import weight_modules  # noqa: E402
from erasure_core.patch import PatchError, load_patch  # noqa: E402

SLOTS = 4
NONE = "None"
SECTION = ("concept_erasure", "Concept Erasure")
LOG = "[Concept Erasure]"


def patch_folder() -> Path:
    """The folder set in Settings > Concept Erasure, or models/erasures."""
    configured = (getattr(shared.opts, "erasure_patch_dir", "") or "").strip()
    if configured:
        return Path(configured)
    from modules import paths

    return Path(paths.models_path) / "erasures"


def is_forge(sd_model) -> bool:
    return hasattr(sd_model, "forge_objects")


def running_in_forge() -> bool:
    """Forge by its own package: until its first generation, Forge's sd_model is a placeholder with no forge_objects."""
    return importlib.util.find_spec("modules_forge") is not None


_patches: dict[str, tuple[tuple[int, int], object]] = {}


def strength_note(name: str, strength: float) -> str:
    """The text under an accordion slot: from which strength the chosen patch erases, read from its metadata."""
    if not name or name == NONE:
        return ""
    try:
        return _load(name)[0].strength_note(float(strength))
    except (PatchError, ValueError, OSError) as exc:
        return f"⚠ {exc}"


def _load(name: str):
    """A patch from the folder, validated; reloaded when the file changes."""
    path = erasure_ui.patch_path(patch_folder(), name)
    if not path.is_file():
        raise PatchError(f"no patch {name!r} in {patch_folder()}")
    stat = path.stat()
    key = (stat.st_size, stat.st_mtime_ns)
    cached = _patches.get(str(path))
    if cached is None or cached[0] != key:
        _patches[str(path)] = (key, load_patch(path))
    return _patches[str(path)][1], path


_attached: list[ldm.LdmAttachment] = []
_fingerprints: dict[tuple[int, str], str] = {}
_warned: set[tuple[str, str]] = set()


def remove_hooks() -> None:
    """Detach every hook this script put on the A1111 model (after each generation and on script unload)."""
    while _attached:
        _attached.pop().detach()


def _fingerprint(sd_model, modules):
    key = (id(sd_model), str(getattr(sd_model, "sd_model_hash", "")))
    if key not in _fingerprints:
        _fingerprints[key] = ldm.modules_fingerprint(modules)
    return _fingerprints[key]


class ConceptErasure(scripts.Script):
    sorting_priority = 16

    def __init__(self) -> None:
        self.selected: list = []  # Forge: (patch, strength) pairs re-applied before every sampling pass

    def title(self):
        return "Concept Erasure"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        choices = [NONE] + erasure_ui.list_patches(patch_folder())
        controls = []
        with gr.Accordion("Concept Erasure", open=False, elem_id=f"erasure_{tab}_accordion"):
            for i in range(SLOTS):
                with gr.Row():
                    name = gr.Dropdown(label=f"Erasure patch {i + 1}", choices=choices, value=NONE,
                                       elem_id=f"erasure_{tab}_patch_{i + 1}")
                    strength = gr.Slider(label="Strength", minimum=0.0, maximum=2.0, step=0.05, value=1.0,
                                         elem_id=f"erasure_{tab}_strength_{i + 1}")
                note = gr.Markdown("", elem_id=f"erasure_{tab}_strength_note_{i + 1}")
                for changed in (name.change, strength.change):  # not a script arg: the args stay name, strength
                    changed(strength_note, inputs=[name, strength], outputs=note)
                controls += [name, strength]
            refresh = gr.Button("Refresh the patch list", elem_id=f"erasure_{tab}_refresh")

        def refreshed():
            names = [NONE] + erasure_ui.list_patches(patch_folder())
            return [gr.update(choices=names) for _ in range(SLOTS)]

        refresh.click(refreshed, inputs=[], outputs=controls[0::2])
        self.infotext_fields = [(c, f"Erasure {i // 2 + 1} {'patch' if i % 2 == 0 else 'strength'}")
                                for i, c in enumerate(controls)]
        self.paste_field_names = [label for _, label in self.infotext_fields]
        return controls

    @staticmethod
    def chosen(args) -> list[tuple[str, float]]:
        pairs = [(args[2 * i], args[2 * i + 1]) for i in range(min(SLOTS, len(args) // 2))]
        return [(name, float(strength)) for name, strength in pairs if name and name != NONE]

    def process(self, p, *args):
        remove_hooks()  # a generation that failed never reached postprocess
        self.selected = []
        chosen = self.chosen(args)
        try:  # the prompt's <erasure:name:w> tags are checked now, before anything is drawn, and applied by
            # ErasureNetwork.activate on every batch (A1111 only prints what goes wrong in there)
            tagged = [(_load(name), strength) for name, strength in prompt_patches(p.prompt)]
        except (PatchError, ValueError, OSError) as exc:
            refuse(p, str(exc))
            return
        if tagged:  # the tags stay in the infotext's prompt; the hashes say which files they were
            p.extra_generation_params[PROMPT_INFOTEXT_KEY] = erasure_ui.format_infotext(
                [erasure_ui.InfotextEntry(name, strength, erasure_ui.short_hash(path))
                 for (name, _), ((_, path), strength) in zip(prompt_patches(p.prompt), tagged)])
        for (patch, _), strength in tagged:  # a tag's strength has no slider beside it: say it on the console
            if patch.strength_note(strength).startswith("⚠"):
                print(f"{LOG} {patch.strength_note(strength)}")
        if is_forge(p.sd_model):  # Forge only logs what fails while it samples: refuse what it cannot apply now
            try:
                refuse_for_forge([(patch, strength) for (patch, _), strength in tagged])
            except PatchError as exc:
                refuse(p, str(exc))
                return
        if not chosen:
            return
        try:
            loaded = [(_load(name), strength) for name, strength in chosen]
            patches = [(patch, strength) for (patch, _), strength in loaded]
            if is_forge(p.sd_model):  # validated now, applied in process_before_every_sampling
                unet = p.sd_model.forge_objects.unet.model.diffusion_model
                ldm.plan_layers(ldm.attn2_modules(unet), patches, weights=weight_modules(unet))
                refuse_for_forge(patches)
                self.selected = patches
            else:
                unet = p.sd_model.model.diffusion_model
                modules = ldm.attn2_modules(unet)
                handle = ldm.attach_hooks(modules, patches, lambda: _fingerprint(p.sd_model, modules),
                                          weight_modules(unet), unet)
                _attached.append(handle)
                for warning in handle.warnings:
                    if (warning, str(id(p.sd_model))) not in _warned:
                        _warned.add((warning, str(id(p.sd_model))))
                        print(f"{LOG} warning: {warning}")
        except (PatchError, ValueError, OSError) as exc:
            remove_hooks()
            refuse(p, str(exc))
            return
        entries = [erasure_ui.InfotextEntry(name, strength, erasure_ui.short_hash(path))
                   for (name, strength), ((_, path), _) in zip(chosen, loaded)]
        p.extra_generation_params[erasure_ui.INFOTEXT_KEY] = erasure_ui.format_infotext(entries)

    def process_before_every_sampling(self, p, *args, **kwargs):
        chosen = self.selected + (_prompt_active if is_forge(p.sd_model) else [])
        if chosen and is_forge(p.sd_model):  # Forge hands out a fresh patcher before every pass
            objects = p.sd_model.forge_objects
            objects.unet = ldm.apply_forge(objects.unet, chosen, filename="concept-erasure")

    def postprocess(self, p, processed, *args):
        remove_hooks()
        self.selected = []


PROMPT_NETWORK = "erasure"
PROMPT_INFOTEXT_KEY = "Erasure in prompt"
_prompt_active: list = []     # what ErasureNetwork.activate applied for the current batch
_prompt_attached: list = []   # its A1111 hooks


def prompt_patches(prompt: str) -> list[tuple[str, float]]:
    """The `<erasure:name>` / `<erasure:name:0.8>` tags of a prompt, as (name, strength)."""
    _, data = extra_networks.parse_prompt(prompt or "")
    return [_tag_patch(params) for params in data.get(PROMPT_NETWORK, [])]


def _tag_patch(params) -> tuple[str, float]:
    """One tag's parsed parameters (A1111's ExtraNetworkParams) as (name, strength)."""
    if not params.positional or not str(params.positional[0]).strip():
        raise ValueError("<erasure:...> needs a patch name, as in <erasure:van_gogh:0.8>")
    name, weight = str(params.positional[0]).strip(), params.positional[1] if len(params.positional) > 1 else 1
    try:
        return name, float(weight)
    except ValueError:
        raise ValueError(f"<erasure:{name}:{weight}>: the strength must be a number") from None


class ErasureNetwork(extra_networks.ExtraNetwork):
    """`<erasure:name:w>` in a prompt, a style or an X/Y/Z plot, as the built-in Lora's `<lora:name:w>`: the same
    patches and hooks as the accordion. The tags are validated in Script.process (a bad one stops the generation
    there); here the checked patches are attached for the batch."""

    def __init__(self) -> None:
        super().__init__(PROMPT_NETWORK)

    def activate(self, p, params_list) -> None:
        self.deactivate(p)  # activate may run again (hires pass) before deactivate
        if not params_list:
            return
        wanted = [_tag_patch(params) for params in params_list]
        _prompt_active[:] = [(_load(name)[0], strength) for name, strength in wanted]  # checked in process()
        if not is_forge(p.sd_model):
            unet = p.sd_model.model.diffusion_model
            modules = ldm.attn2_modules(unet)
            _prompt_attached.append(ldm.attach_hooks(modules, _prompt_active, lambda: _fingerprint(p.sd_model,
                                                                                                   modules),
                                                     weight_modules(unet), unet))

    def deactivate(self, p) -> None:
        while _prompt_attached:
            _prompt_attached.pop().detach()
        _prompt_active.clear()


def on_before_ui() -> None:
    extra_networks.register_extra_network(ErasureNetwork())


REFUSED_KEY = "Concept Erasure refused"


def refuse(p, reason: str) -> None:
    """Nothing is generated without the erasure the user selected. A1111 swallows an always-on script's
    exceptions (console only, API 200), so the reason goes where people look: the comments under the gallery
    and the response's info (extra_generation_params); no images are made (n_iter 0, as A1111's batch loop
    reads it) and the progress state is left as it was, not interrupted."""
    message = f"{reason}. Nothing was generated without the erasure you selected."
    print(f"{LOG} {message}", file=sys.stderr)
    p.comment(f"Concept Erasure: {message}")
    p.extra_generation_params[REFUSED_KEY] = reason
    p.n_iter = 0


def on_infotext_pasted(infotext: str, params: dict) -> None:
    """Spread `Erasure: "circle: 0.8 [hash], ..."` over the accordion's slots; a renamed file is found by hash.
    An infotext without the entry leaves the accordion as it is."""
    if erasure_ui.INFOTEXT_KEY not in params:
        return
    entries = erasure_ui.parse_infotext(str(params[erasure_ui.INFOTEXT_KEY]))
    folder = patch_folder()
    for i in range(SLOTS):
        name, strength = NONE, 1.0
        if i < len(entries):
            found = erasure_ui.find_patch(folder, entries[i].name, entries[i].hash)
            if found is None:
                print(f"{LOG} pasted patch {entries[i].name} [{entries[i].hash}] is not in {folder}", file=sys.stderr)
            else:
                name, strength = found, entries[i].strength
        params[f"Erasure {i + 1} patch"] = name
        params[f"Erasure {i + 1} strength"] = strength


def on_ui_settings() -> None:
    shared.opts.add_option("erasure_patch_dir", shared.OptionInfo(
        "", "Folder of erasure patches (empty: models/erasures)", section=SECTION))


class WebUIHost(erasure_ui.Host):
    """Training reports into shared.state, stops on the WebUI's Interrupt, and holds the GPU queue lock."""

    name = "webui"

    def begin(self, job: str, total: int) -> None:
        shared.state.begin(job=job)
        shared.state.job_count = 1
        shared.state.sampling_steps, shared.state.sampling_step = total, 0

    def step(self, done: int, total: int, text: str) -> None:
        shared.state.sampling_steps, shared.state.sampling_step = total, done
        shared.state.textinfo = text

    def interrupted(self) -> bool:
        return bool(shared.state.interrupted)

    def end(self) -> None:
        shared.state.end()

    def lock(self):
        from modules.call_queue import queue_lock

        return queue_lock


def loaded_model():
    if running_in_forge():
        raise ValueError("training in Forge is not supported yet: train with `erasure train` or the ComfyUI node "
                         "and put the patch in the patch folder; the accordion applies it in Forge")
    sd_model = shared.sd_model
    if sd_model is None:
        raise ValueError("no model is loaded")
    from modules import devices

    return ldm.LdmDenoiser(sd_model, autocast=devices.autocast, device=devices.device)


def on_ui_tabs():
    tab = erasure_ui.build_tab(loaded_model, patch_folder, host=WebUIHost())
    return [(tab, "Concept Erasure", "concept_erasure")]


script_callbacks.on_before_ui(on_before_ui)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_infotext_pasted(on_infotext_pasted)
script_callbacks.on_script_unloaded(remove_hooks)
