"""The CUDA emulation layer itself (csrc/emu): barriers and thread order, warp shuffles against
their definition in the CUDA programming guide, launch limits of an H100/H200, device
assertions and undefined warp collectives as Python errors. The kernels are the test-only ones
of csrc/emu/test_kernels.cpp, built into cabattn._emu.
"""
import pytest
import torch

from cabattn import emu

emu_test = torch.ops.cabattn_emu_test
FULL = 0xFFFFFFFF
IDX, UP, DOWN, XOR, BALLOT = range(5)


def test_barriers_make_a_shared_memory_exchange_exact():
    x = torch.randn(3, 256)
    out = emu_test.neighbour_sum(x, 4, True)
    want = 4 * x.roll(-1, dims=1) + sum(range(4))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


def test_a_missing_barrier_gives_a_wrong_result():
    """Between barriers the threads run in a shuffled order, so a thread reads its neighbour's
    slot before the neighbour wrote it (poisoned memory: NaN) or after its next round."""
    x = torch.randn(3, 256)
    want = 4 * x.roll(-1, dims=1) + sum(range(4))
    out = emu_test.neighbour_sum(x, 4, False)
    wrong = ~torch.isclose(out, want, rtol=0, atol=1e-5)
    assert wrong.float().mean() > 0.1, f"only {int(wrong.sum())} of {out.numel()} wrong"


def shuffle_definition(values, mode, b, width):
    """The source lane of every lane (CUDA C++ Programming Guide, Warp Shuffle Functions)."""
    out = values.clone()
    for warp in range(values.numel() // 32):
        for lane in range(32):
            base = lane // width * width
            if mode == IDX:
                src = base + b % width
            elif mode == UP:
                src = lane - b if lane - base >= b else lane
            elif mode == DOWN:
                src = lane + b if lane - base + b < width else lane
            else:  # XOR: lanes of later groups are out of reach; earlier ones are not
                src = lane ^ b if (lane ^ b) < base + width else lane
            out[warp * 32 + lane] = values[warp * 32 + src]
    return out


@pytest.mark.parametrize("mode", [IDX, UP, DOWN, XOR])
@pytest.mark.parametrize("width", [32, 16, 8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64])
def test_shuffles_equal_their_definition(mode, width, dtype):
    values = torch.randint(-2 ** 30, 2 ** 30, (64,)).to(dtype)
    if dtype == torch.int64:
        values = values * 2 ** 31 + 12345  # both 32-bit halves matter
    for b in (0, 1, 3, width // 2, width - 1, 17, 31):
        got = emu_test.shuffle(values, mode, b, width)
        assert torch.equal(got, shuffle_definition(values, mode, b, width)), (mode, width, b)


def test_ballot_and_syncthreads_count():
    values = torch.randint(0, 2, (64,), dtype=torch.int64)
    got = emu_test.shuffle(values, BALLOT, 0, 32)
    for warp in range(2):
        bits = sum(int(values[warp * 32 + lane]) << lane for lane in range(32))
        assert (got[warp * 32:(warp + 1) * 32] == bits).all()
    flags = torch.randint(0, 2, (96,), dtype=torch.int32)
    assert (emu_test.syncthreads_count(flags) == int(flags.sum())).all()


def test_a_pointer_goes_through_a_shuffle():
    values = torch.arange(32, dtype=torch.int64) * 7
    assert (emu_test.pointer_shuffle(values, 5) == 35).all()


def test_launches_within_the_limits_run_every_block():
    assert emu_test.launch_config([5, 3, 2], [32, 4, 8], 0, 0).sum() == 30
    # The opt-in attribute allows up to 227 KB of dynamic shared memory.
    assert emu_test.launch_config([2, 1, 1], [64, 1, 1], 232448, 232448).sum() == 2


@pytest.mark.parametrize("grid,block,shared,opt_in,message", [
    ([1, 1, 1], [1025, 1, 1], 0, 0, "invalid configuration argument.*1025 threads"),
    ([1, 1, 1], [32, 32, 2], 0, 0, "invalid configuration argument.*2048 threads"),
    ([1, 1, 1], [1, 1, 65], 0, 0, "invalid configuration argument"),
    ([1, 65536, 1], [32, 1, 1], 0, 0, "invalid configuration argument.*65535"),
    ([0, 1, 1], [32, 1, 1], 0, 0, "invalid configuration argument"),
    ([1, 1, 1], [32, 1, 1], 49153, 0, "invalid argument.*49153 bytes.*without "
                                      "cudaFuncSetAttribute"),
    ([1, 1, 1], [32, 1, 1], 100000, 60000, "invalid argument.*100000 bytes"),
    ([1, 1, 1], [32, 1, 1], 0, 232449, "invalid argument.*cudaFuncSetAttribute"),
])
def test_launches_over_the_limits_fail_as_on_the_gpu(grid, block, shared, opt_in, message):
    with pytest.raises(RuntimeError, match=message):
        emu_test.launch_config(grid, block, shared, opt_in)


def test_a_device_assertion_becomes_an_error_naming_the_kernel_and_thread():
    x = torch.zeros(4, 64, dtype=torch.int32)
    x[2, 37] = -1
    with pytest.raises(RuntimeError, match=r"cabattn_emu_test \(emulated CUDA kernel\): "
                       r"device-side assertion `v >= 0` failed at .*test_kernels.cpp:\d+ in "
                       r"thread \(37, 0, 0\) of block \(2, 0, 0\)"):
        emu_test.assert_nonnegative(x)


def test_a_shuffle_with_an_exited_lane_is_an_error():
    assert torch.equal(emu_test.early_exit_shuffle(32),
                       torch.arange(32).reshape(16, 2).flip(1).reshape(32).float())
    with pytest.raises(RuntimeError, match="lane 31 of its mask has exited"):
        emu_test.early_exit_shuffle(31)


def test_emulated_operators_have_the_cuda_schemas():
    for name in ("coarsen", "block_scores", "frc_scores", "select_blocks",
                 "block_sparse_attention", "attention_with_scores", "kv_compact_"):
        real = getattr(torch.ops.cabattn, name).default._schema
        emulated = getattr(emu.OPS, name).default._schema
        assert str(emulated) == str(real).replace("cabattn::", "cabattn_emu::")


def test_emulated_kernels_reject_cuda_tensors_clearly():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA tensor to pass (no CUDA device present)")
    with pytest.raises(RuntimeError, match="must be a CPU tensor for the emulated CUDA kernel"):
        emu.OPS.coarsen(torch.randn(1, 1, 16, 64, device="cuda"), 16, 0)
