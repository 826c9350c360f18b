"""Selection cost of the mask protocol against dense causal attention, on the CPU (fp32).

One run, same threads, same q/k/v: q [1, 9, L, 64], k and v [1, 3, L, 64] (GQA 3), block size
auto (cabattn.grid.auto_block_size: 32 at 2K, 128 at 8K). For each L it times
  sdpa     torch's causal scaled_dot_product_attention (the dense forward's attention)
  oracle   coarsen(q) + coarsen(k) + block_scores      (h2o / cab_v4 magnitude statistics)
  frc      coarsen(q) + coarsen(k) + frc_scores + select_blocks (cab_v3 at s = 0.9)
and prints each as a fraction of sdpa; block_scores costs one QK^T pass, so about 0.5 is the
target. A second table times the whole mask-protocol selection (the method's plan and the
layout) of knorm, quest, tova, oracle_topk, snapkv, pyramidkv (its bottom layer, the largest
budget, of 30) and adakv at s = 0.9 against sdpa (interleaved rounds, median of the per-round
ratios), and one kv step of three rules: quest's page pick for one query over a cache of L
tokens, and tova's and snapkv's (32-query window) keep sets over a cache of K + 1 entries
(per step: compared with the attention of one query over K + 1 keys, not with a whole
forward). Appends dated sections to bench/RESULTS.md.

  .venv/bin/python bench/bench_selection.py [--lengths 2048 8192] [--repeats 3]
"""
import argparse
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cabattn import ops  # noqa: E402
from cabattn.grid import BlockGrid, auto_block_size, token_budget  # noqa: E402
from cabattn.methods import KVPages, KVState, MaskContext, get_method  # noqa: E402
from cabattn.sparse import make_grid, plan_layout  # noqa: E402
from bench_common import interleaved_seconds, median_ratio, median_seconds, report  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, SPARSITY = 9, 3, 64, 0.9


def bench_length(length, repeats):
    torch.manual_seed(0)
    q = torch.randn(1, Q_HEADS, length, HEAD_DIM)
    k = torch.randn(1, KV_HEADS, length, HEAD_DIM)
    v = torch.randn(1, KV_HEADS, length, HEAD_DIM)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    block = auto_block_size(length)
    grid = BlockGrid(length, block, token_budget(length, SPARSITY))
    picks = grid.rule_budget()
    zeros = torch.zeros_like(picks)

    def sdpa():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                         enable_gqa=True)

    def oracle():
        ops.coarsen(q, block), ops.coarsen(k, block)
        ops.block_scores(q, k, block, scale)

    def frc():
        curvature = ops.frc_scores(ops.coarsen(q, block), ops.coarsen(k, block), scale, 0.3)
        ops.select_blocks(curvature, None, zeros, zeros, picks, zeros, grid.shift,
                          grid.max_count())

    times = {name: median_seconds(fn, repeats) for name, fn in
             (("sdpa", sdpa), ("oracle", oracle), ("frc", frc))}
    return block, times


MASK_RULES = ("knorm", "quest", "tova", "oracle_topk", "snapkv", "pyramidkv", "adakv")
KV_STEPS = ("quest kv_select", "tova kv_keep", "snapkv kv_keep")


def bench_rules(length, repeats):
    """{name: [seconds per round]}: sdpa, each MASK_RULES method's whole mask selection
    (pyramidkv: its bottom layer of 30, the largest budget), quest's kv page pick (one query,
    a cache of `length` tokens), tova's and snapkv's kv rules (a cache of K + 1 entries), and
    the attention of that one query for scale."""
    torch.manual_seed(0)
    q = torch.randn(1, Q_HEADS, length, HEAD_DIM)
    k = torch.randn(1, KV_HEADS, length, HEAD_DIM)
    v = torch.randn(1, KV_HEADS, length, HEAD_DIM)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    fns = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=True)}
    for name in MASK_RULES:
        method = get_method(name)
        grid = make_grid(method, length, SPARSITY, layer_idx=0, num_layers=30)
        fns[name] = (lambda m=method, g=grid: plan_layout(m, MaskContext(q, k, g, scale)))
    block, budget = auto_block_size(length), token_budget(length, SPARSITY)
    pages = k.view(1, KV_HEADS, length // block, block, HEAD_DIM)
    page_min, page_max = pages.amin(3), pages.amax(3)
    newest = q[:, :, -1:].contiguous()
    quest = get_method("quest")
    fns["quest kv_select"] = lambda: quest.kv_select(KVPages(
        newest, page_min[:, :, :-1], page_max[:, :, :-1], math.ceil(budget / block) - 1,
        block, scale))
    snapkv, tova = get_method("snapkv"), get_method("tova")
    keys = k[:, :, :budget + 1].contiguous()
    positions = torch.arange(budget + 1).expand(1, KV_HEADS, budget + 1)
    mass = torch.zeros(1, KV_HEADS, budget + 1)
    for name, rule, window in (("tova kv_keep", tova, 1),
                               ("snapkv kv_keep", snapkv, snapkv.window_size)):
        state = KVState(keys=keys, positions=positions, mass=mass, block_queries=None,
                        budget=budget, block_size=block, scale=scale,
                        recent_queries=q[:, :, budget + 1 - window:budget + 1])
        fns[name] = lambda r=rule, st=state: r.kv_keep(st)
    fns["step attention"] = lambda: ops.attention_with_scores(
        q[:, :, budget:budget + 1].contiguous(), keys, v[:, :, :budget + 1].contiguous(), scale)
    return interleaved_seconds(fns, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()

    device = platform.processor() or platform.machine()
    header = (f"q [1, {Q_HEADS}, L, {HEAD_DIM}], k/v [1, {KV_HEADS}, L, {HEAD_DIM}] fp32, CPU "
              f"({device}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"median of {args.repeats}; frc selects at s = {SPARSITY}, strict")
    rows = ["| L | block | sdpa ms | coarsen+block_scores ms (/sdpa) "
            "| coarsen+frc+select ms (/sdpa) |", "|---|---|---|---|---|"]
    print(header)
    for length in args.lengths:
        block, t = bench_length(length, args.repeats)
        rows.append(f"| {length} | {block} | {t['sdpa'] * 1e3:.1f} "
                    f"| {t['oracle'] * 1e3:.1f} ({t['oracle'] / t['sdpa']:.2f}) "
                    f"| {t['frc'] * 1e3:.2f} ({t['frc'] / t['sdpa']:.3f}) |")
        print(rows[-1], flush=True)

    report("Selection cost vs dense SDPA (bench_selection.py)", header, rows,
           record=not args.no_record)

    rows = ["| L | sdpa ms | " + " | ".join(f"{n} ms (/sdpa)" for n in MASK_RULES)
            + " | " + " | ".join(f"{n} ms" for n in KV_STEPS) + " | step attention ms |",
            "|---" * (len(MASK_RULES) + len(KV_STEPS) + 3) + "|"]
    for length in args.lengths:
        t = bench_rules(length, args.repeats)
        ms = {name: statistics.median(times) * 1e3 for name, times in t.items()}
        rows.append(f"| {length} | {ms['sdpa']:.1f} | "
                    + " | ".join(f"{ms[n]:.1f} ({median_ratio(t[n], t['sdpa']):.3f})"
                                 for n in MASK_RULES)
                    + " | " + " | ".join(f"{ms[n]:.3f}" for n in KV_STEPS)
                    + f" | {ms['step attention']:.3f} |")
        print(rows[-1], flush=True)
    report("Methods' selection vs dense SDPA (bench_selection.py)",
           header + f"; whole mask selection (plan + select_blocks) at s = {SPARSITY}, strict; "
           "ratios are medians of per-round ratios (interleaved rounds); kv steps: quest picks "
           "pages for one query over a cache of L, tova and snapkv keep K of K + 1 entries, "
           "against the attention of one query over K + 1 keys; machine AMD EPYC, AVX-512; "
           f"load average (1, 5, 15 min) at the end {tuple(round(x, 1) for x in os.getloadavg())}",
           rows, record=not args.no_record)


if __name__ == "__main__":
    main()
