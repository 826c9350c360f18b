"""Shared fixtures: every operator test runs on the CPU, on the CUDA kernels emulated on the
CPU (`emu`, see emulation.py) and, when one is present, on CUDA; the harness tests' tiny model
and text are built once per session (eval_assets.py). Tests live by layer in tests/kernels/,
tests/library/ and tests/harness/; this folder's modules are importable from all of them."""
import pytest
import torch

from emulation import cpu_kernels, emulate_cuda_kernels
# Registered here, once, so that every module shares one session-scoped build of each.
from eval_assets import no_model_loading, tiny_model, tiny_text  # noqa: F401  (fixtures)

TORCH_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DEVICES = [*TORCH_DEVICES, "emu"]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (pyproject.toml) are skipped, saying why, where no CUDA device is."""
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="no CUDA device present"))


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """The device of the test's tensors ("cpu" for emu, whose kernels take CPU tensors)."""
    if request.param == "emu":
        return emulate_cuda_kernels(monkeypatch)
    return request.param


@pytest.fixture
def raises_as_on_cpu(device):
    """check(call, *args): call(*args) raises on `device` (CUDA, emulated or not) the error the
    CPU kernel raises, word for word (the CPU and CUDA kernels share their checks,
    csrc/checks.h). Tensor arguments are given on the CPU and moved to `device`. Returns the
    message."""
    def check(call, *args):
        def message(where):
            moved = [a.to(where) if isinstance(a, torch.Tensor) else a for a in args]
            with pytest.raises(RuntimeError) as info:
                call(*moved)
            return str(info.value).splitlines()[0]
        with cpu_kernels():
            want = message("cpu")
        assert want.startswith("cabattn::"), want
        assert message(device) == want
        return want
    return check


@pytest.fixture(params=TORCH_DEVICES)
def torch_device(request):
    """A torch device for tests of cabattn's public API (method rules, protocols), which take
    ordinary tensors: the CPU and, when one is present, CUDA."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module's tests: tiny models and streaming run many small
    operations, which OpenMP teams slow down, above all on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
