"""The "Concept Erasure" tab: train a patch on the loaded model, watch it train, compare before and after.

One gradio code base serves AUTOMATIC1111 (gradio 3.41), Forge (gradio 4) and the standalone `erasure ui` (what
pip installs, gradio 6 at the time of writing): only components and arguments every one of them has, no
`.style()`, no `gr.Box`, no `_js`, and handlers that return `gr.update(...)`. The host differences (progress in
A1111's `shared.state`, its interrupt button, its GPU queue lock) come in through a small `Host` object.

This module also holds what the WebUI accordion needs without gradio: the patch folder listing, short hashes, and
the infotext entry (`Erasure: "circle: 0.8 [1a2b3c4d5e], ..."`) with its parser.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .methods import DEFAULT_METHOD

SUFFIX = ".safetensors"
INFOTEXT_KEY = "Erasure"
HASH_LENGTH = 10
_NAME = re.compile(r"^[\w][\w.\- ]{0,99}$")


# -- the patch folder ------------------------------------------------------------------------
def list_patches(folder: str | Path) -> list[str]:
    """Patch names in `folder` and its subfolders: paths relative to it, without `.safetensors`, `/`-separated.
    SAeUron's shared SAE files (`*.sae.safetensors`) sit there too but are no patches."""
    from .sae import SAE_SUFFIX

    root = Path(folder)
    if not root.is_dir():
        return []
    names = [p.relative_to(root).as_posix()[: -len(SUFFIX)] for p in root.rglob("*" + SUFFIX)
             if p.is_file() and not p.name.endswith(SAE_SUFFIX)]
    return sorted(names, key=str.lower)


def patch_path(folder: str | Path, name: str) -> Path:
    """The file of patch `name` inside `folder`; a name that would leave the folder is refused."""
    root = Path(folder).resolve()
    path = (root / (name + SUFFIX)).resolve()
    if root not in path.parents:
        raise ValueError(f"patch name {name!r} points outside the patch folder")
    return path


_hash_cache: dict[tuple[str, int, int], str] = {}


def short_hash(path: str | Path) -> str:
    """The first 10 hex digits of the file's sha256 (as A1111 shows LoRA hashes), cached by size and mtime."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hash_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _hash_cache[key] = h.hexdigest()[:HASH_LENGTH]
    return _hash_cache[key]


def find_patch(folder: str | Path, name: str, hash_: str = "") -> str | None:
    """The patch a pasted infotext means: `name` if its hash matches (or no hash is given), otherwise any patch in
    the folder with that hash (the file was renamed); None when nothing matches."""
    names = list_patches(folder)
    if name in names and (not hash_ or short_hash(patch_path(folder, name)) == hash_):
        return name
    if hash_:
        for other in names:
            if short_hash(patch_path(folder, other)) == hash_:
                return other
    return None


# -- the infotext entry ----------------------------------------------------------------------
@dataclass
class InfotextEntry:
    name: str
    strength: float
    hash: str = ""


def format_infotext(entries: list[InfotextEntry]) -> str:
    """`circle: 0.8 [1a2b3c4d5e], styles/stripes: 1 [0f0f0f0f0f]`; the host quotes it in the infotext line."""
    return ", ".join(f"{e.name}: {e.strength:g}" + (f" [{e.hash}]" if e.hash else "") for e in entries)


_ENTRY = re.compile(r"\s*(?P<name>[^,\[\]]+?):\s*(?P<strength>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
                    r"(?:\s*\[(?P<hash>[0-9a-fA-F]+)\])?\s*(?:,|$)")


def parse_infotext(text: str) -> list[InfotextEntry]:
    """Inverse of format_infotext; unreadable parts are skipped."""
    text = (text or "").strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':  # still quoted
        import json

        try:
            text = json.loads(text)
        except ValueError:
            text = text[1:-1]
    return [InfotextEntry(m["name"].strip(), float(m["strength"]), (m["hash"] or "").lower())
            for m in _ENTRY.finditer(text)]


# -- the host --------------------------------------------------------------------------------
class Host:
    """What a host offers a long job. The standalone app uses these defaults; the WebUI script subclasses it to
    report into A1111's `shared.state`, honour its Interrupt button and hold its GPU queue lock."""

    name = "standalone"

    def begin(self, job: str, total: int) -> None:
        pass

    def step(self, done: int, total: int, text: str) -> None:
        pass

    def interrupted(self) -> bool:
        return False

    def end(self) -> None:
        pass

    def lock(self):
        return contextlib.nullcontext()


# -- training --------------------------------------------------------------------------------
@dataclass
class TabRequest:
    """The tab's fields: a training request (erasure_core.request.TrainRequest) plus the output name and the
    preview. `training()` gives the request every front end shares."""

    concept: str
    method: str = DEFAULT_METHOD
    alternative: str = ""
    preserve: str = "auto"
    steps: int = 200
    lr: float = 0.0         # 0: the method's default
    memory_lr: float = 0.0  # 0: the method's default
    layers: str = "all"
    seed: int = 0
    output: str = ""
    tokens: int = 8
    cache_seeds: int = 8
    cache_steps: int = 25
    batch: int = 0          # images per training step (0: the default, request.CHECKPOINT_BATCH for a checkpoint)
    resolution: int = 0     # training size in pixels; 0: the model's own (512 for SD1.5)
    cache_on_cpu: bool = False  # the trajectory cache in RAM instead of GPU memory
    preview_images: int = 2
    preview_steps: int = 20
    on_top_of: list[str] = field(default_factory=list)  # names of earlier patches in the patch folder

    def training(self, earlier: list | None = None):
        """`earlier`: the patches named by `on_top_of`, loaded (earlier_patches)."""
        from .request import TrainRequest

        return TrainRequest(concept=self.concept, method=self.method, alternative=self.alternative,
                            preserve=self.preserve, steps=self.steps, lr=self.lr, memory_lr=self.memory_lr,
                            tokens=self.tokens, layers=self.layers, seed=self.seed, batch=self.batch or None,
                            cache_seeds=self.cache_seeds, cache_steps=self.cache_steps,
                            cache_on_cpu=bool(self.cache_on_cpu), on_top_of=list(earlier or []))


def earlier_patches(folder: Path, names: list[str] | None) -> list:
    """The patches to train on top of, loaded from the patch folder; a missing or refused one says which."""
    from .patch import load_patch

    earlier = []
    for name in names or []:
        try:
            earlier.append(load_patch(patch_path(folder, name)))
        except (OSError, ValueError) as exc:
            raise ValueError(f"on top of {name!r}: {exc}") from None
    return earlier


def status_text(state: JobState) -> str:
    """What the status line says about a finished run: its error, or what it wrote."""
    return f"**Error:** {state.error}" if state.error else "\n\n".join(state.messages) or "done"


def output_name(request: TabRequest) -> str:
    """The patch name: the one given, or `<concept>-<method>`."""
    name = (request.output or "").strip()
    if name.endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    if not name:
        name = re.sub(r"-{2,}", "-", re.sub(r"[^\w.\-]+", "-", f"{request.concept.strip()}-{request.method}"))
        name = name.strip("-.")
    if not _NAME.match(name):
        raise ValueError(f"output name {name!r}: use letters, digits, spaces, '.', '-' and '_' only")
    return name


def _check_tab_numbers(request: TabRequest) -> None:
    """The tab's own numbers (the training request's are checked by request.prepare)."""
    for label, value, low in (("preview images", request.preview_images, 0),
                              ("preview steps", request.preview_steps, 1), ("resolution", request.resolution, 0)):
        if value is None or int(value) != value or value < low:
            raise ValueError(f"{label} must be a whole number of at least {low}, got {value}")


@dataclass
class JobState:
    stage: str = "starting"
    done: int = 0
    total: int = 0
    loss: float | None = None
    finished: bool = False
    error: str = ""
    path: Path | None = None
    preview: object = None  # PIL image
    messages: list[str] = field(default_factory=list)


class TrainJob:
    """One training run in a worker thread: validate, train, write the patch, draw before/after.

    `cancel()` makes the engine's cancel check return True; the engine raises engine.Cancelled and nothing is
    written. Progress is read from `state` by whoever shows it."""

    _running = threading.Lock()  # one run at a time per process: the GPU and the model are shared

    def __init__(self, get_model: Callable[[], object], patch_folder: Callable[[], Path] | Path,
                 request: TabRequest, host: Host | None = None) -> None:
        self.get_model, self.request, self.host = get_model, request, host or Host()
        self.patch_folder = patch_folder if callable(patch_folder) else (lambda: Path(patch_folder))
        self.state = JobState()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def cancel(self) -> None:
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set() or self.host.interrupted()

    def start(self) -> "TrainJob":
        if not TrainJob._running.acquire(blocking=False):
            self.state.error, self.state.finished = "a training run is already in progress", True
            return self
        self._thread = threading.Thread(target=self._run, name="erasure-train", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _progress(self, done: int, total: int, loss: float | None = None, stage: str = "training") -> None:
        s = self.state
        s.stage, s.done, s.total, s.loss = stage, done, total, loss
        self.host.step(done, total, f"Concept Erasure: {stage} {done}/{total}")

    def _run(self) -> None:
        import torch

        from .denoiser import at_resolution
        from .engine import Cancelled, checkpoint_path, discard_checkpoint
        from .methods import train_patch
        from .patch import save_patch
        from .request import prepare

        s = self.state
        begun = False
        try:
            request = self.request
            _check_tab_numbers(request)
            name = output_name(request)
            folder = Path(self.patch_folder())
            path = patch_path(folder, name)
            if path.exists():
                raise ValueError(f"{path.name} already exists in {folder}; choose another output name")
            earlier = earlier_patches(folder, request.on_top_of)
            s.stage = "waiting for the model (a generation may be running)"
            with self.host.lock(), torch.inference_mode(False), torch.enable_grad():
                model = self.get_model()
                if model is None:
                    raise ValueError("no model is loaded")
                model = at_resolution(model, int(request.resolution or 0))
                plan = prepare(replace(request.training(earlier), sae=str(folder)), model)  # SAeUron's SAE
                config = plan.config
                s.messages.extend(f"note: {note}" for note in plan.notes)
                s.total, s.stage = config.steps, "training"
                self.host.begin("concept-erasure", config.steps)
                begun = True
                # an interrupted run leaves its state here; the same settings started again resume from it
                checkpoint = checkpoint_path(folder / ".checkpoints", config, model.fingerprint(),
                                             plan.earlier_digest)
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                if checkpoint.exists():
                    s.messages.append("resuming the interrupted run with these settings from its checkpoint")
                frozen = getattr(model, "frozen", None)
                with (frozen() if frozen else contextlib.nullcontext()):
                    result = plan.label(train_patch(model, config, progress=self._progress, cancel=self.cancelled,
                                                    checkpoint=checkpoint, on_top_of=plan.on_top_of))
                patch = result.patch
                s.done = s.total
                save_patch(patch, path)
                discard_checkpoint(checkpoint)
                s.path = path
                s.messages.append(f"wrote {path} ({path.stat().st_size / 1024:.1f} KB) in "
                                  f"{result.seconds:.1f} s")
                if result.key is not None:
                    key_path = save_patch(result.key, path.with_name(name + ".key" + SUFFIX))
                    s.messages.append(f"wrote the key {key_path}: apply it with the patch to bring the concept back")
                if request.preview_images > 0 and not self.cancelled():
                    s.stage = "drawing the before/after preview"
                    s.preview = self._preview(model, config, patch)
            s.stage = "done"
        except Cancelled as exc:
            s.stage, s.error = "cancelled", (f"cancelled ({exc}); nothing was written. Train again with the same "
                                             "settings to resume from where it stopped")
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if s.path is not None:
                s.stage, s.error = "failed", f"out of GPU memory while drawing the preview; the patch is at {s.path}"
            else:
                s.stage, s.error = "failed", ("out of GPU memory: lower the batch, the resolution or the memory "
                                              "tokens, train fewer layers or "
                                              "lower the trajectory seeds; nothing was written")
        except (ValueError, KeyError) as exc:
            s.stage, s.error = "failed", str(exc.args[0] if exc.args else exc)
        except Exception as exc:  # a bug: say so in the tab, keep the traceback in the console
            traceback.print_exc()
            s.stage, s.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            if begun:
                self.host.end()
            s.finished = True
            TrainJob._running.release()

    def _preview(self, model, config, patch):
        """The erased concept's prompt drawn with the same seeds before and after, one row each."""
        import torch

        from .denoiser import patched
        from .imaging import grid

        n = int(self.request.preview_images)
        prompts, seeds = [config.concept] * n, list(range(config.seed, config.seed + n))
        guidance = model.default_guidance
        before = model.generate(prompts, seeds, steps=int(self.request.preview_steps), guidance=guidance)
        with patched(model, [(patch, 1.0)]):
            after = model.generate(prompts, seeds, steps=int(self.request.preview_steps), guidance=guidance)
        self.state.messages.append(f'preview: "{config.concept}", seeds {seeds[0]}..{seeds[-1]}, '
                                   f"{int(self.request.preview_steps)} DDIM steps, guidance {guidance:g}")
        width = before.shape[-1]
        return grid(torch.cat([before, after]), ncols=n, scale=max(1, 192 // width), row_labels=["before", "after"])


def progress_html(state: JobState) -> str:
    total = max(state.total, 1)
    done = min(state.done, total)
    pct = 100.0 * done / total
    loss = f" · loss {state.loss:.4g}" if state.loss is not None else ""
    label = f"{state.stage}: step {state.done}/{state.total}{loss}" if state.total else state.stage
    return (f'<div class="erasure-progress" data-done="{state.done}" data-total="{state.total}">'
            f'<div style="background:#8884;border-radius:4px;height:10px;overflow:hidden">'
            f'<div style="background:#f97316;height:10px;width:{pct:.1f}%"></div></div>'
            f'<div class="erasure-progress-text">{label}</div></div>')


# -- the tab ---------------------------------------------------------------------------------
def _gr():
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline tool
    import gradio as gr

    return gr


def build_tab(get_model: Callable[[], object], patch_folder: Callable[[], Path] | Path, host: Host | None = None,
              defaults: TabRequest | None = None):
    """The tab as a `gr.Blocks`. `get_model()` returns the loaded model behind the denoiser protocol (with a
    `generate` for the preview); `patch_folder` is where patches are written (a path or a function giving one)."""
    gr = _gr()
    from .methods import get_method, method_names

    methods = method_names()
    d = defaults or TabRequest(concept="", method=DEFAULT_METHOD)
    host = host or Host()
    folder = patch_folder if callable(patch_folder) else (lambda: Path(patch_folder))
    jobs: dict[str, TrainJob] = {}
    latest: list[TrainJob] = []  # the last run started from any page, shown to a page opened later

    def current_progress() -> str:
        return progress_html(latest[0].state if latest else JobState(stage="idle"))

    def current_status() -> str:
        if not latest:
            return ""
        if not latest[0].state.finished:
            return "Training: a run started earlier is still going (Cancel works from the page that started it)."
        return status_text(latest[0].state)

    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown("### Concept Erasure\nTrain an erasure patch on the loaded model. The model's weights are not "
                    "changed; the patch is written to the patch folder and applied from the *Concept Erasure* "
                    "accordion in txt2img / img2img (or with `erasure generate --patch`).")
        with gr.Row():
            with gr.Column():
                concept = gr.Textbox(label="Concept to erase", value=d.concept, placeholder="e.g. circle",
                                     elem_id="erasure_concept",
                                     info="several, separated by commas, are erased by one patch")
                method = gr.Dropdown(label="Method", choices=list(methods), value=d.method, elem_id="erasure_method",
                                     info="; ".join(f"{m}: {get_method(m).summary}" for m in methods))
                takes = ", ".join(m for m in methods if get_method(m).takes_alternative)
                alternative = gr.Textbox(label=f"Alternative ({takes})", value=d.alternative,
                                         elem_id="erasure_alternative")
                preserve = gr.Textbox(label="Preserve: comma-separated, 'auto' (the model's default) or 'none'",
                                      value=d.preserve, elem_id="erasure_preserve")
                with gr.Row():
                    steps = gr.Number(label="Steps", value=d.steps, precision=0, elem_id="erasure_steps")
                    lr = gr.Number(label="Learning rate (0: the method's default)", value=d.lr, minimum=0,
                                   elem_id="erasure_lr")
                    seed = gr.Number(label="Seed", value=d.seed, precision=0, elem_id="erasure_seed")
                layers = gr.Textbox(label="Layers: all, midout, mid, or comma-separated attn2 names", value=d.layers,
                                    elem_id="erasure_layers")
                output = gr.Textbox(label="Output name (empty: <concept>-<method>)", value=d.output,
                                    elem_id="erasure_output")
                with gr.Row():
                    on_top_of = gr.Dropdown(label="On top of: earlier erasures to keep (applied, frozen, while "
                                                  "this one trains; the new patch holds them all)",
                                            choices=list_patches(folder()), value=[], multiselect=True,
                                            elem_id="erasure_on_top_of")
                    refresh = gr.Button("\U0001F504", elem_id="erasure_on_top_of_refresh", scale=0, min_width=40)
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        tokens = gr.Number(label="Memory tokens", value=d.tokens, precision=0, elem_id="erasure_tokens")
                        cache_seeds = gr.Number(label="Trajectory seeds", value=d.cache_seeds, precision=0,
                                                elem_id="erasure_cache_seeds")
                        cache_steps = gr.Number(label="Trajectory DDIM steps", value=d.cache_steps, precision=0,
                                                elem_id="erasure_cache_steps")
                        memory_lr = gr.Number(label="Memory learning rate (0: the method's default)",
                                              value=d.memory_lr, minimum=0, elem_id="erasure_memory_lr")
                    with gr.Row():
                        batch = gr.Number(label="Batch: images per step (0: the default, 1 for a checkpoint; "
                                                "each more adds about 3.5 GB at SD1.5 size)",
                                          value=d.batch, precision=0, minimum=0, elem_id="erasure_batch")
                        resolution = gr.Number(label="Resolution in pixels (0: the model's own; 256 or 384 need "
                                                     "far less memory)", value=d.resolution, precision=0,
                                               minimum=0, elem_id="erasure_resolution")
                        cache_on_cpu = gr.Checkbox(label="Trajectory cache in RAM, not GPU memory",
                                                   value=d.cache_on_cpu, elem_id="erasure_cache_on_cpu")
                    with gr.Row():
                        preview_images = gr.Number(label="Preview images", value=d.preview_images, precision=0,
                                                   elem_id="erasure_preview_images")
                        preview_steps = gr.Number(label="Preview DDIM steps", value=d.preview_steps, precision=0,
                                                  elem_id="erasure_preview_steps")
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id="erasure_train")
                    cancel = gr.Button("Cancel", interactive=False, elem_id="erasure_cancel")
            with gr.Column():
                # callables: evaluated whenever a page loads, so a reopened page shows the last run
                progress = gr.HTML(value=current_progress, elem_id="erasure_progress")
                status = gr.Markdown(value=current_status, elem_id="erasure_status")
                preview = gr.Image(label="Before / after: the same prompt and seeds", type="pil", interactive=False,
                                   elem_id="erasure_preview")
        job_id = gr.Textbox(value="", visible=False)

        fields = {"concept": concept, "method": method, "alternative": alternative, "preserve": preserve,
                  "steps": steps, "lr": lr, "memory_lr": memory_lr, "layers": layers, "seed": seed, "output": output,
                  "tokens": tokens, "cache_seeds": cache_seeds, "cache_steps": cache_steps, "batch": batch,
                  "resolution": resolution, "cache_on_cpu": cache_on_cpu, "preview_images": preview_images,
                  "preview_steps": preview_steps, "on_top_of": on_top_of}

        def run(*values):
            job = TrainJob(get_model, folder, TabRequest(**dict(zip(fields, values))), host)
            key = f"{id(job):x}-{time.time():.6f}"
            jobs[key] = job
            latest[:] = [job]
            job.start()
            busy = (gr.update(interactive=False), gr.update(interactive=True))
            try:
                yield (gr.update(value=progress_html(job.state)), gr.update(value="Training..."),
                       gr.update(value=None), *busy, gr.update(value=key))
                last = None
                while not job.state.finished:
                    time.sleep(0.25)
                    html = progress_html(job.state)
                    if html != last:
                        last = html
                        yield gr.update(value=html), gr.update(), gr.update(), *busy, gr.update()
                s = job.state
                yield (gr.update(value=progress_html(s)), gr.update(value=status_text(s)),
                       gr.update(value=s.preview) if s.preview is not None else gr.update(),
                       gr.update(interactive=True), gr.update(interactive=False), gr.update(value=""))
            finally:  # a gradio that closes a dropped page's generator stops the job here; A1111's 3.41 does
                # not (measured: the run finishes and writes its file), and a reopened page shows it instead
                if not job.state.finished:
                    job.cancel()
                jobs.pop(key, None)

        def stop(key):
            job = jobs.get(key)
            if job is not None:
                job.cancel()
            return gr.update(value="Cancelling...")

        train.click(run, inputs=list(fields.values()), outputs=[progress, status, preview, train, cancel, job_id])
        cancel.click(stop, inputs=[job_id], outputs=[status], queue=False)
        refresh.click(lambda: gr.update(choices=list_patches(folder())), outputs=[on_top_of], queue=False)
    return tab


def launch(model, patch_folder: str | Path, host: str = "127.0.0.1", port: int = 7861,
           defaults: TabRequest | None = None) -> None:
    """`erasure ui`: the tab as a page of its own on `host:port`, training on `model`. Blocks until stopped."""
    folder = Path(patch_folder)
    folder.mkdir(parents=True, exist_ok=True)
    tab = build_tab(lambda: model, folder, defaults=defaults)
    import inspect

    params = inspect.signature(tab.queue).parameters
    if "default_concurrency_limit" in params:   # gradio 4+: Train and Cancel have their own limits anyway
        tab.queue(default_concurrency_limit=2)
    else:                                        # gradio 3: one worker would hold Cancel behind Train
        tab.queue(concurrency_count=2)
    print(f"Concept Erasure on {getattr(model, 'name', 'model')}; patches go to {folder.resolve()}", flush=True)
    tab.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True)
