"""What every executor shares: its error, the run's model and that model's provenance."""
from .. import env, models


class ExecutorError(RuntimeError):
    """The executor cannot go on (every Ray actor died); finished cells are stored."""


def load_run_model(config, say):
    """The model a run's cells use, checked against every context length of the run."""
    device = env.resolve_device(config.model.device)
    dtype = env.resolve_dtype(config.model.torch_dtype, device)
    say(f"loading model {config.model.name} ({dtype}, {device}) ...")
    loaded = models.load_model(config.model.name, dtype=dtype, device=device,
                               trust_remote_code=config.model.trust_remote_code,
                               cache_dir=config.model.cache_dir)
    for L in config.context_lengths():
        models.check_context(loaded, L)
    return loaded


def model_info(loaded) -> dict:
    """The provenance of a loaded model, for the results' config record."""
    return {"name": loaded.name, "source": str(loaded.source),
            "num_parameters": loaded.num_parameters, "max_positions": loaded.max_positions}
