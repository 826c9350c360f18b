"""block_sparse_attention against dense causal SDPA and FlexAttention on the same layout.

One run, same inputs: q [1, Hq, L, d], k/v [1, Hkv, L, d]; the layout is the random method's
budget-matched one (K = max(64, floor((1-s) L)), block size auto). Prints time ratios against
SDPA (pinned to the flash backend on GPU) with the share of the ideal speed-up (1 / density)
they reach, and block_scores (the oracle pass) against one dense forward, and appends a dated
section to bench/RESULTS.md. The kernels are timed in interleaved rounds (SDPA, block-sparse,
flex, repeat), so a shared machine's changing load shows in all of them alike. The header names
the CPU ISA path the kernels ran (docs/cpu_kernels.md) and the load average.

  .venv/bin/python bench/bench_kernels.py                 # CPU, fp32, L 2K/8K, 9/3 heads, d 64
  python bench/bench_kernels.py --device cuda             # GPU, bf16, L 4K/16K/32K, 32/8, d 128
  CABATTN_CPU_ISA=avx2 .venv/bin/python bench/bench_kernels.py   # another CPU ISA path
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cabattn  # noqa: E402
from cabattn import ops  # noqa: E402
from bench_common import cpu_model, interleaved_seconds, median_ratio, report  # noqa: E402


def flex_runner(q, k, v, layout, scale):
    """FlexAttention over the same key blocks (causal inside the diagonal), or a reason why not."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError as err:
        return None, f"n/a ({err})"
    bs = layout.grid.block_size

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    try:
        # FlexAttention wants one index slot per key block: pad the CSR rows to M.
        m = layout.grid.num_blocks
        index = torch.nn.functional.pad(layout.block_index.clamp(min=0),
                                        (0, m - layout.block_index.shape[-1]))
        mask = BlockMask.from_kv_blocks(layout.block_count, index,
                                        BLOCK_SIZE=bs, mask_mod=causal,
                                        seq_lengths=(q.shape[2], k.shape[2]))
        compiled = torch.compile(flex_attention)
        group = q.shape[1] // k.shape[1]

        def run():
            return compiled(q, k, v, block_mask=mask, scale=scale, enable_gqa=group > 1)
        run()
        return run, ""
    except Exception as err:  # a benchmark column, not a test: say why and go on
        return None, f"n/a ({type(err).__name__}: {str(err).splitlines()[0][:80]})"


def dense_runner(q, k, v, scale, gpu):
    """Causal SDPA: on the GPU pinned to the flash backend (the issue-12 baseline), else the
    default dispatch. Returns (run, backend name)."""
    def run():
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if not gpu:
        return run, "sdpa"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return run()
    try:
        flash()
        return flash, "sdpa flash"
    except RuntimeError:  # e.g. no GQA in this torch's flash backend: repeat the KV heads
        group = q.shape[1] // k.shape[1]
        k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

        def flash_repeated():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k_full, v_full, is_causal=True, scale=scale)
        return flash_repeated, "sdpa flash (KV heads repeated)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.9, 0.95])
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    lengths = args.lengths or ([4096, 16384, 32768] if gpu else [2048, 8192])
    q_heads, kv_heads = (32, 8) if gpu else (9, 3)
    dim = args.head_dim or (128 if gpu else 64)
    dtype = torch.bfloat16 if gpu else torch.float32
    scale = dim ** -0.5
    card = (torch.cuda.get_device_name() if gpu
            else f"{cpu_model()}, CPU ISA path {ops.cpu_isa()}")
    header = (f"q [1, {q_heads}, L, {dim}], k/v [1, {kv_heads}, L, {dim}] {dtype}, {args.device} "
              f"({card}), threads {torch.get_num_threads()}, torch {torch.__version__}, "
              f"median of {args.repeats} rounds, each timing SDPA, block-sparse and flex in turn; "
              f"speed-ups are medians of the per-round ratios; load average "
              f"{os.getloadavg()[0]:.1f} at the start")
    rows = ["| L | s | density | sdpa ms | block-sparse ms (speed-up) | of ideal (1/density) | "
            "flex ms (block-sparse / flex) |", "|---|---|---|---|---|---|---|"]
    scores_rows = ["| L | block size | sdpa ms | block_scores ms (/ sdpa) |", "|---|---|---|---|"]
    print(header)
    for length in lengths:
        q = torch.randn(1, q_heads, length, dim, device=args.device, dtype=dtype)
        k = torch.randn(1, kv_heads, length, dim, device=args.device, dtype=dtype)
        v = torch.randn(1, kv_heads, length, dim, device=args.device, dtype=dtype)
        sdpa, backend = dense_runner(q, k, v, scale, gpu)
        for sparsity in args.sparsities:
            layout = cabattn.select_blocks(q, k, "random", sparsity, scale=scale)
            fns = {"sdpa": sdpa, "sparse": lambda: ops.block_sparse_attention(
                q, k, v, layout.block_count, layout.block_index, layout.grid.block_size, scale)}
            flex_cell = "skipped"
            if not args.no_flex:
                run, why = flex_runner(q, k, v, layout, scale)
                if run is None:
                    flex_cell = why
                else:
                    fns["flex"] = run
            times = interleaved_seconds(fns, args.repeats, args.device)
            dense, sparse = (statistics.median(times[name]) for name in ("sdpa", "sparse"))
            if "flex" in times:
                flex_cell = (f"{statistics.median(times['flex']) * 1e3:.1f} "
                             f"({median_ratio(times['flex'], times['sparse']):.2f}x)")
            speedup = median_ratio(times['sdpa'], times['sparse'])
            row = (f"| {length} | {sparsity} | {layout.density:.3f} | {dense * 1e3:.1f} | "
                   f"{sparse * 1e3:.1f} ({speedup:.2f}x) | {speedup * layout.density:.0%} | "
                   f"{flex_cell} |")
            rows.append(row)
            print(row, flush=True)
        # The oracle pass of h2o / cab_v4 at the layouts' block size, against one dense forward.
        times = interleaved_seconds({"sdpa": sdpa, "scores": lambda: ops.block_scores(
            q, k, layout.grid.block_size, scale)}, args.repeats, args.device)
        scores_rows.append(f"| {length} | {layout.grid.block_size} | "
                           f"{statistics.median(times['sdpa']) * 1e3:.1f} | "
                           f"{statistics.median(times['scores']) * 1e3:.1f} "
                           f"({median_ratio(times['scores'], times['sdpa']):.2f}x) |")
        print(scores_rows[-1], flush=True)
    rows += ["", f"dense baseline: {backend}", ""] + scores_rows + [
        "", f"load average {os.getloadavg()[0]:.1f} at the end"]
    report("block_sparse_attention vs SDPA and FlexAttention (bench_kernels.py)", header, rows,
           record=not args.no_record)


if __name__ == "__main__":
    main()
