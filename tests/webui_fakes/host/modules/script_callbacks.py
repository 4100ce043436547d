"""Fake of modules.script_callbacks: the registration functions and the runners the WebUI calls."""
from collections import defaultdict

callbacks: dict[str, list] = defaultdict(list)


def _add(kind, fn):
    callbacks[kind].append(fn)


def on_ui_tabs(callback, *, name=None):
    _add("ui_tabs", callback)


def on_ui_settings(callback, *, name=None):
    _add("ui_settings", callback)


def on_script_unloaded(callback, *, name=None):
    _add("script_unloaded", callback)


def on_infotext_pasted(callback, *, name=None):
    _add("infotext_pasted", callback)


def on_before_ui(callback, *, name=None):
    _add("before_ui", callback)


def before_ui_callback():
    for c in callbacks["before_ui"]:
        c()


def ui_tabs_callback():
    res = []
    for c in callbacks["ui_tabs"]:
        res += c() or []
    return res


def ui_settings_callback():
    for c in callbacks["ui_settings"]:
        c()


def script_unloaded_callback():
    for c in reversed(callbacks["script_unloaded"]):
        c()


def infotext_pasted_callback(infotext, params):
    for c in callbacks["infotext_pasted"]:
        c(infotext, params)


def clear_callbacks():
    callbacks.clear()
