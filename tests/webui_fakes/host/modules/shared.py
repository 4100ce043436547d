"""Fake of modules.shared: opts with add_option / OptionInfo, state (job progress, interrupted), sd_model."""
from types import SimpleNamespace


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, **kwargs):
        self.default, self.label, self.section = default, label, section


class Options:
    def __init__(self) -> None:
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info) -> None:
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, key):
        if key in self.data:
            return self.data[key]
        raise AttributeError(key)

    def __setattr__(self, key, value):
        self.data[key] = value


class State:
    skipped = interrupted = stopping_generation = False
    job = ""
    job_no = job_count = sampling_step = sampling_steps = 0
    textinfo = None

    def __init__(self) -> None:
        self.history: list[tuple] = []

    def begin(self, job="(unknown)"):
        self.sampling_step, self.job_count, self.job_no = 0, -1, 0
        self.skipped = self.interrupted = self.stopping_generation = False
        self.textinfo, self.job = None, job
        self.history.append(("begin", job))

    def end(self):
        self.history.append(("end", self.job, self.sampling_step, self.sampling_steps))
        self.job, self.job_count = "", 0

    def interrupt(self):
        self.interrupted = True

    def skip(self):
        self.skipped = True


opts = Options()
state = State()
sd_model = None
cmd_opts = SimpleNamespace(hide_ui_dir_config=False, no_prompt_history=True)
