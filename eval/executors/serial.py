"""The serial executor: every cell in this process, one after the other, on one model."""
from .. import env
from ..cell import time_forward, try_cell
from .common import load_run_model, model_info


class SerialExecutor:
    name = "serial"

    def __init__(self, config, say, progress: bool = False):
        self.config, self.say, self.progress = config, say, progress
        self.loaded = None

    def prepare(self) -> None:
        """Nothing to start: the model loads with the first cell that needs it."""

    def load(self):
        """The model, loaded once for the whole run (a load failure ends the run)."""
        if self.loaded is None:
            self.loaded = load_run_model(self.config, self.say)
            info = model_info(self.loaded)
            self.say(f"model: {info['name']} from {info['source']}, "
                     f"{info['num_parameters'] / 1e6:.1f}M parameters, "
                     f"{info['max_positions']} positions")
        return self.loaded

    def tokenizer(self):
        return self.load().tokenizer

    def model_info(self):
        return None if self.loaded is None else model_info(self.loaded)

    def time_forward(self, input_ids) -> float:
        """Seconds of one dense forward of a window here (the run's size estimate)."""
        return time_forward(self.load(), input_ids, env.resolve_device(self.config.model.device))

    def run(self, specs, windows_for, claim):
        for spec in specs:
            if not claim(spec):
                continue
            loaded = self.load()
            yield spec, try_cell(self.config, loaded, windows_for(spec), spec,
                                 progress=self.progress), None

    def close(self) -> None:
        """Nothing to stop (the model stays loaded for a next run in this process)."""
