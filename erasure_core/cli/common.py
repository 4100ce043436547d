"""What every command shares: one-line user errors, argument types, loading the model and patches, progress bars.
Nothing here imports diffusers at module level, so `erasure --help` starts quickly."""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: reported in one line, never as a traceback."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2, as for every other user error
        raise UserError(message)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def png_path(text: str, option: str) -> Path:
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise UserError(f"{option} must end in .png, got {text!r}")
    return path


def add_model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a single-file SD1.x/SD2.x/SDXL checkpoint (.safetensors), a diffusers pipeline "
                                   "folder or a toy-model folder (default: the embedded toy model)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="what a single-file checkpoint predicts, which its weights cannot tell (default: "
                        "v_prediction for SD2.x, the 768 px models; epsilon for SD1.x, SDXL and SD2.x base)")


def load_model(path: str | None, prediction_type: str | None = None):
    """The toy model by default; otherwise a single-file checkpoint, a toy-model folder or a local diffusers
    pipeline folder."""
    from ..toy.model import ASSETS, load_toy_model

    folder = Path(path) if path else ASSETS
    if folder.is_file() or folder.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        from ..backends.single_file import CheckpointError, load_single_file

        if not folder.is_file():
            raise UserError(f"no checkpoint file {folder}")
        try:
            return load_single_file(folder, prediction_type=prediction_type)
        except CheckpointError as exc:
            raise UserError(f"cannot load {folder}: {exc}") from None
    if (folder / "model_index.json").is_file():
        from ..backends.diffusers_backend import load_pipeline_folder

        try:
            return load_pipeline_folder(folder)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the pipeline in {folder}: {str(exc).splitlines()[0]}") from None
    needed = ("unet.safetensors", "text_encoder.safetensors", "unet_config.json", "text_config.json", "tokenizer")
    missing = [n for n in needed if not (folder / n).exists()]
    if missing:
        raise UserError(f"{folder} is neither a diffusers pipeline folder (model_index.json) nor a toy-model "
                        f"folder (missing {', '.join(missing)})")
    return load_toy_model(folder)


def vocabulary_or_error(model, what: str):
    """The model's vocabulary, which oracle-judged commands need."""
    vocabulary = getattr(model, "vocabulary", None)
    if vocabulary is None:
        raise UserError(f"{what} needs a model that carries a vocabulary and an oracle (the toy model does); "
                        f"{getattr(model, 'name', 'this model')} has none")
    return vocabulary


def progress_bar(desc: str):
    """A tqdm bar driven by (done, total[, loss][, stage=]) callbacks; created on first use, closed when done; a
    new stage of the run gets its own bar."""
    from tqdm import tqdm

    state: dict = {}

    def update(done: int, total: int, loss: float | None = None, stage: str | None = None) -> None:
        if state.get("stage") != stage and "bar" in state:
            state.pop("bar").close()
        state["stage"] = stage
        bar = state.get("bar") or state.setdefault("bar", tqdm(total=total, desc=f"{desc}: {stage}" if stage
                                                                else desc))
        bar.total, bar.n = total, done
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.refresh()
        if done >= total:
            bar.close()
            state.clear()

    return update


def add_patch_options(p: argparse.ArgumentParser, required: bool = False, help: str = "erasure patch to apply "
                      "(repeatable)") -> None:
    p.add_argument("--patch", action="append", required=required, help=help)
    p.add_argument("--strength", action="append", type=finite_float,
                   help="strength of the matching --patch (repeatable; default 1)")


def load_patches(paths: list[str] | None, strengths: list[float] | None):
    """Load and validate every patch before any model work, so bad input costs nothing."""
    from ..patch import PatchError, load_patch

    paths = paths or []
    strengths = strengths or [1.0] * len(paths)
    if len(strengths) != len(paths):
        raise UserError(f"give one --strength per --patch ({len(paths)} patches, {len(strengths)} strengths)")
    try:
        return [(load_patch(p), s) for p, s in zip(paths, strengths)]
    except PatchError as exc:
        raise UserError(str(exc)) from None


@contextlib.contextmanager
def attached_or_error(model, patches):
    """Attach patches through the denoiser protocol for the duration; a patch the model cannot take is a user
    error, and its warnings are printed."""
    from ..patch import PatchError

    if not patches:
        yield
        return
    try:
        handle = model.attach(patches)
    except PatchError as exc:
        raise UserError(str(exc)) from None
    try:
        for warning in handle.warnings:
            print(f"erasure: warning: {warning}", file=sys.stderr)
        yield handle
    finally:
        handle.detach()


def check_patches(model, patches) -> None:
    """Refuse patches the model cannot take, as a user error, before any work; print their warnings once."""
    with attached_or_error(model, patches):
        pass
