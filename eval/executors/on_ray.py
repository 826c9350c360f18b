"""The Ray executor: one actor per GPU (or per group of CPU cores), each holding the model.

The driver (this process) tokenises each (dataset, L) group once and puts its windows in Ray's
object store; an actor fetches a group's windows once and keeps them while it works on that
group, so cells are dispatched to an actor from the group it last worked on when there is one.
Each actor has at most one cell in flight: when an actor dies (killed, out of memory, its node
lost) the one cell it held goes back to the front of the queue for another actor, and no result
can arrive twice. The driver stores each result as it arrives (the runner is the only writer),
so a driver killed mid-run resumes from the cell store when the command is rerun.

`ray` is imported only here, so a run without `--executor ray` never imports it.
"""
import os
from collections import deque
from pathlib import Path

from .. import models
from ..cell import try_cell
from ..config import ConfigError
from .common import ExecutorError, load_run_model, model_info

REPO_ROOT = str(Path(__file__).resolve().parents[2])


class CellActor:
    """One worker process: loads the model once, computes the cells it is sent."""

    def __init__(self, config, threads: int):
        import torch
        torch.set_num_threads(threads)
        self.config, self.loaded = config, None
        self.group, self.windows = None, None

    def load(self) -> dict:
        self.loaded = load_run_model(self.config, say=lambda message: None)
        return model_info(self.loaded)

    def compute(self, spec, windows_ref: list) -> dict:
        """R of one cell; windows_ref is [ObjectRef] (in a list, so that Ray hands over the
        reference and the actor fetches a group's windows only when the group changes)."""
        import ray
        group = (spec.dataset, spec.context_length)
        if group != self.group:
            self.group, self.windows = group, ray.get(windows_ref[0])
        return try_cell(self.config, self.loaded, self.windows, spec)


class RayExecutor:
    name = "ray"

    def __init__(self, config, say, address=None, threads: int = 1):
        self.config, self.say, self.address, self.threads = config, say, address, threads
        self.started_ray = False
        self.actors = {}  # label -> actor handle (the live ones)
        self.info = None
        self._tokenizer = None

    def prepare(self) -> None:
        """Connect to (or start) Ray and fix the device the cells run on from the cluster's
        resources, so that every cell key names the device that computes it."""
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs the ray package (pip install -r "
                              "requirements.txt)") from None
        if not ray.is_initialized():
            self.say("starting Ray" if self.address is None else
                     f"connecting to the Ray cluster at {self.address}")
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            self.started_ray = True
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        device = str(self.config.model.device)
        if device.startswith("cuda") and not gpus:
            raise ConfigError(f"model.device {device!r} but the Ray cluster has no GPU "
                              f"(resources: {cpus} CPUs); use --device cpu or auto")
        if device != "cpu" and gpus:
            self.config.model.device = "cuda"  # each actor sees its own GPU as cuda:0
            self.slots, self.options = gpus, {"num_gpus": 1, "num_cpus": 1}
        else:
            self.config.model.device = "cpu"
            if cpus < self.threads:
                raise ConfigError(f"the Ray cluster has {cpus} CPUs, fewer than --threads "
                                  f"{self.threads} per actor")
            self.slots, self.options = cpus // self.threads, {"num_cpus": self.threads}
        self.say(f"Ray: {cpus} CPUs, {gpus} GPUs: up to {self.slots} actors on "
                 f"{self.config.model.device}"
                 + ("" if gpus else f", {self.threads} thread(s) each"))

    def tokenizer(self):
        """The driver tokenises; it needs the tokenizer, not the weights."""
        if self._tokenizer is None:
            self._tokenizer = models.load_tokenizer(
                self.config.model.name, self.config.model.trust_remote_code,
                self.config.model.cache_dir)
        return self._tokenizer

    def model_info(self):
        return self.info

    def time_forward(self, input_ids):
        """None: the driver holds no model to time a forward with (the actors do)."""
        return None

    def start_actors(self, count: int) -> None:
        import ray
        remote = ray.remote(CellActor).options(
            **self.options, max_restarts=0,
            # Workers import eval and cabattn from this checkout (the same path on every node).
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}})
        handles = {f"actor {i + 1}": remote.remote(self.config, self.threads)
                   for i in range(count)}
        self.say(f"starting {count} Ray actors, each loading {self.config.model.name} ...")
        infos = ray.get([handle.load.remote() for handle in handles.values()])
        self.actors, self.info = handles, infos[0]

    def submit(self, label: str, spec, windows_ref):
        return self.actors[label].compute.remote(spec, [windows_ref])

    def run(self, specs, windows_for, claim):
        import ray
        from ray.exceptions import RayActorError

        if not specs:
            return
        if not self.actors:
            self.start_actors(min(self.slots, len(specs)))
        pending = deque(specs)
        windows = {}  # (dataset, L) -> ObjectRef, put once
        last_group = {}  # actor label -> the group it last worked on
        in_flight = {}  # ObjectRef -> (actor label, spec)
        idle = list(self.actors)
        while pending or in_flight:
            while idle and pending:
                label = idle.pop(0)
                spec = next((s for s in pending
                             if (s.dataset, s.context_length) == last_group.get(label)),
                            pending[0])
                pending.remove(spec)
                if not claim(spec):  # another run computes it, or has stored it
                    idle.insert(0, label)
                    continue
                group = last_group[label] = (spec.dataset, spec.context_length)
                if group not in windows:
                    windows[group] = ray.put(windows_for(spec))
                in_flight[self.submit(label, spec, windows[group])] = (label, spec)
            if not in_flight:
                break
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            label, spec = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as err:
                self.actors.pop(label, None)
                pending.appendleft(spec)
                self.say(f"{label} died ({type(err).__name__}); {spec.label} goes back to "
                         f"the queue ({len(self.actors)} actors left)")
                if not self.actors:
                    raise ExecutorError(f"every Ray actor died; {len(pending)} cells are not "
                                       "computed (the finished ones are stored: rerun the "
                                       "command to resume)") from err
                continue
            idle.append(label)
            yield spec, result, label

    def close(self) -> None:
        import ray
        for handle in self.actors.values():
            ray.kill(handle)
        self.actors = {}
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False
