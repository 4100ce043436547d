"""Fake of the WebUI's `launch` module (modules/launch_utils.py re-exported): is_installed and run_pip."""
import importlib.util

missing: set[str] = set()   # tests mark packages as absent here
pip_calls: list[tuple[str, str]] = []


def is_installed(package: str) -> bool:
    if package in missing:
        return False
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:
        return False


def run_pip(command: str, desc: str | None = None, live: bool = False):
    pip_calls.append((command, desc))
