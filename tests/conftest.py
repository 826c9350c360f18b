"""Shared fixtures: every operator test runs on the CPU, on the CUDA kernels emulated on the
CPU (`emu`, see emulation.py) and, when one is present, on CUDA."""
import pytest
import torch

from emulation import emulate_cuda_kernels

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device present")), "emu"]


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """The device of the test's tensors ("cpu" for emu, whose kernels take CPU tensors)."""
    if request.param == "emu":
        return emulate_cuda_kernels(monkeypatch)
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
