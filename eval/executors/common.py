"""What every executor shares: its error, the run's model and that model's provenance."""
from .. import env, models


class ExecutorError(RuntimeError):
    """The executor cannot go on (every Ray actor died); finished cells are stored."""


class KernelCheckError(ExecutorError):
    """The compiled kernels failed the self-check on this device: nothing was computed."""


def check_kernels(kernels: str, device: str, say) -> None:
    """Before a model loads on a CUDA device with the compiled kernels: the self-check
    (cabattn.selfcheck, cached per device and build; docs/selfcheck.md). Every process that
    computes cells loads its model through load_run_model, so every Ray actor checks too;
    eval.stream calls it itself."""
    if kernels != "extension" or not device.startswith("cuda"):
        return
    from cabattn import selfcheck
    try:
        selfcheck.ensure(device, say)
    except selfcheck.SelfCheckError as err:
        raise KernelCheckError(str(err)) from None


def load_run_model(config, say):
    """The model a run's cells use (once its device's kernels passed the self-check), checked
    against every context length of the run."""
    device = env.resolve_device(config.model.device)
    dtype = env.resolve_dtype(config.model.torch_dtype, device)
    check_kernels(config.kernels, device, say)
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
