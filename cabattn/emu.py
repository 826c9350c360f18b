"""The CUDA kernels run on the CPU: torch.ops.cabattn_emu.<op>, with the schemas of
torch.ops.cabattn.<op>, taking CPU tensors.

cabattn._emu is csrc/cuda/*.cu compiled by the host compiler against the emulation layer
(csrc/emu/cuda_emu.h): the same kernel source as the GPU build, its threads run as fibers with
CUDA's barrier and warp semantics. It exists to test the CUDA kernels without a GPU; it is
orders of magnitude slower than either real kernel, so only tests use it (small shapes).
"""
import torch

from . import ops

# The schemas of torch.ops.cabattn's kernels (registered by cabattn._C), one place: copied here.
# (deferred_checks and raise_deferred_checks are defined by csrc/cuda/device_checks.cu itself.)
_LIBRARY = torch.library.Library("cabattn_emu", "DEF")
for _name in ops.KERNELS:
    if hasattr(torch.ops.cabattn, _name):
        _LIBRARY.define(str(getattr(torch.ops.cabattn, _name).default._schema)
                        .removeprefix("cabattn::"))

from . import _emu  # noqa: E402,F401  (loading the library registers the emulated kernels)

OPS = torch.ops.cabattn_emu
