"""Fake of modules.scripts: Script, AlwaysVisible, loading script files by path, and the ScriptRunner calls that
processing makes (each wrapped in try/except and reported, as the WebUI does)."""
import importlib.util
import os

from modules import errors

AlwaysVisible = object()


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    infotext_fields = None
    paste_field_names = None
    sorting_priority = 0

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def process(self, p, *args):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass


def basedir():
    return os.getcwd()


scripts_data: list = []


def load_scripts(paths):
    """Load each file as the WebUI does (a module from its path) and register its Script subclasses."""
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for obj in module.__dict__.values():
            if isinstance(obj, type) and issubclass(obj, Script) and obj is not Script:
                scripts_data.append((obj, path, module))


class ScriptRunner:
    def __init__(self) -> None:
        self.alwayson_scripts: list[Script] = []
        self.inputs = [None]  # index 0: the selectable-script dropdown
        self.infotext_fields: list = []
        self.paste_field_names: list = []

    def initialize_scripts(self, is_img2img: bool) -> None:
        for cls, path, _ in scripts_data:
            script = cls()
            script.filename, script.is_img2img, script.is_txt2img = path, is_img2img, not is_img2img
            if script.show(is_img2img) is AlwaysVisible:
                script.alwayson = True
                self.alwayson_scripts.append(script)

    def setup_ui(self) -> None:
        for script in self.alwayson_scripts:
            script.args_from = len(self.inputs)
            controls = script.ui(script.is_img2img) or []
            self.inputs += list(controls)
            script.args_to = len(self.inputs)
            self.infotext_fields += script.infotext_fields or []
            self.paste_field_names += script.paste_field_names or []

    def default_args(self) -> list:
        return [None] + [getattr(c, "value", None) for c in self.inputs[1:]]

    def _each(self, method, p, *extra, **kwargs):
        for script in self.alwayson_scripts:
            try:
                getattr(script, method)(p, *extra, *p.script_args[script.args_from:script.args_to], **kwargs)
            except Exception:
                errors.report(f"Error running {method}: {script.filename}", exc_info=True)

    def process(self, p):
        self._each("process", p)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)
