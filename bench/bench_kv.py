"""kv protocol speed: streaming with eviction vs a plain transformers decode loop.

One run over one window (same tokens, same prefill of K tokens, same threads):
  plain  prefill K, then token-by-token decode with a DynamicCache (no eviction, sdpa)
  kv c=1 the kv protocol, exact token-by-token streaming (target: <= 1.3x plain)
  kv c=C the kv protocol with chunks of C tokens (target: >= 8x faster than c=1)
  model  the same chunks through the model alone, no cache: what chunking can give at most
Prints the ratios and the per-layer, per-token overhead of c=1 over plain, and appends a dated
section to bench/RESULTS.md.

  .venv/bin/python bench/bench_kv.py                 # SmolLM2-135M, a pd-books window
  .venv/bin/python bench/bench_kv.py --tiny          # a random 4-layer Llama, random tokens

--positions compares positions="absolute" with "cache" (StreamingLLM's pos-shift: every step
rotates the live keys at their cache indices) at chunk C, same window, same method:
  .venv/bin/python bench/bench_kv.py --positions --tiny

--score scores one window with the kv protocol only and prints the result (the issue's
done-when: h2o at s = 0.9, c = 1 on a 2048-token book window):
  .venv/bin/python bench/bench_kv.py --score --method h2o --length 2048 --sparsity 0.9 --chunk 1
"""
import argparse
import inspect
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_common import book_window, report  # noqa: E402
from cabattn.grid import token_budget  # noqa: E402
from cabattn.kv_protocol import KVProtocol  # noqa: E402


def load(args):
    """(model, input_ids [1, L], description)."""
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512,
                             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                             max_position_embeddings=max(args.length, 2048),
                             attn_implementation="sdpa")
        model = LlamaForCausalLM(config).eval()
        ids = torch.randint(0, 1024, (1, args.length), generator=torch.Generator().manual_seed(0))
        return model, ids, "tiny random Llama (4 layers, 8:2 heads, d=32), random tokens"
    loaded, ids = book_window(args.length)
    return loaded.model, ids, f"{loaded.name}, one pd-books window"


def plain_decode(model, ids, prefill: int) -> float:
    """Seconds for a dense prefill then token-by-token decode with transformers' DynamicCache."""
    from transformers import DynamicCache
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    model(ids[:, :prefill], use_cache=True, **{name: cache})
    for t in range(prefill, ids.shape[1]):
        model(ids[:, t:t + 1], position_ids=torch.tensor([[t]]), use_cache=True, **{name: cache})
    return time.perf_counter() - start


def chunk_forwards(model, ids, start: int, chunk: int) -> float:
    """Seconds of the model's own forwards over ids[start:] in chunks of `chunk` tokens with no
    cache: the part of a chunked kv run that is the model's, not the protocol's (its layers run
    on `chunk` rows at a time whatever the protocol does)."""
    begin = time.perf_counter()
    for first in range(start, ids.shape[1], chunk):
        model(ids[:, first:first + chunk])
    return time.perf_counter() - begin


def kv_run(model, ids, args, chunk: int, positions: str = "absolute"):
    """(seconds, loss, ProtocolStats) of the kv protocol over the window."""
    with KVProtocol(model, args.method, args.sparsity, kv_chunk=chunk,
                    positions=positions) as stats:
        start = time.perf_counter()
        out = model(ids, labels=ids)
        seconds = time.perf_counter() - start
    return seconds, float(out.loss), stats


def compare_positions(model, ids, args, what: str, budget: int) -> None:
    """kv c=C with positions absolute, cache, absolute again (the mean of the two absolute
    runs is the reference, so a drift in the machine's load shows as their spread)."""
    runs = [kv_run(model, ids, args, args.chunk, positions)
            for positions in ("absolute", "cache", "absolute")]
    absolute = (runs[0][0] + runs[2][0]) / 2
    streamed = ids.shape[1] - budget
    header = (f"{what}; L={ids.shape[1]}, s={args.sparsity} (K={budget}, {streamed} streamed "
              f"tokens), c={args.chunk}, method {args.method}, CPU "
              f"({platform.processor() or platform.machine()}), {torch.get_num_threads()} "
              f"threads, torch {torch.__version__}. One run each, in the order listed.")
    rows = ["| positions | seconds | tokens/s | loss | attention s | selection+eviction s |",
            "|---|---|---|---|---|---|"]
    for (seconds, loss, stats), positions in zip(runs, ("absolute", "cache", "absolute")):
        rows.append(f"| {positions} | {seconds:.2f} | {(ids.shape[1] - 1) / seconds:.1f} | "
                    f"{loss:.4f} | {stats.attention_seconds:.2f} | "
                    f"{stats.selection_seconds:.2f} |")
    rows += ["", f"- cache / absolute: **{runs[1][0] / absolute:.2f}x** the time (rotating the "
             f"live keys at every step; absolute runs {runs[0][0]:.2f} s and {runs[2][0]:.2f} s)"]
    report("kv protocol: positions cache vs absolute (bench_kv.py --positions)", header, rows,
           record=not args.no_record)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="random tiny Llama, random tokens")
    p.add_argument("--length", type=int, default=1024, help="window length L (1024)")
    p.add_argument("--sparsity", type=float, default=0.9, help="s (0.9)")
    p.add_argument("--method", default="h2o", help="kv method (h2o)")
    p.add_argument("--chunk", type=int, default=16, help="chunk C compared with c=1 (16); "
                   "with --score, the chunk to score with")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; "
                   "1 can be faster on a CPU that other jobs keep busy)")
    p.add_argument("--score", action="store_true", help="only score the window with the kv "
                   "protocol and print loss, PPL, density and timing")
    p.add_argument("--positions", action="store_true", help="compare positions absolute "
                   "and cache at chunk C")
    p.add_argument("--no-record", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, ids, what = load(args)
    length = ids.shape[1]
    budget = token_budget(length, args.sparsity)
    layers = model.config.num_hidden_layers

    with torch.inference_mode():
        if args.score:
            seconds, loss, stats = kv_run(model, ids, args, args.chunk)
            print(f"{what}: {args.method}, kv protocol, s={args.sparsity}, c={args.chunk}, "
                  f"L={length}, K={budget}")
            print(f"  loss {loss:.4f} nats  PPL {math.exp(loss):.3f}  density "
                  f"{stats.density:.4f}  wall {seconds:.1f} s ({(length - 1) / seconds:.1f} "
                  f"tokens/s)  attention {stats.attention_seconds:.1f} s  selection+eviction "
                  f"{stats.selection_seconds:.1f} s")
            return
        if args.positions:
            compare_positions(model, ids, args, what, budget)
            return
        plain = plain_decode(model, ids, budget)
        c1, loss1, stats1 = kv_run(model, ids, args, 1)
        cc, loss_c, stats_c = kv_run(model, ids, args, args.chunk)
        model_only = chunk_forwards(model, ids, budget, args.chunk)

    streamed = length - budget
    overhead_us = (c1 - plain) / (streamed * layers) * 1e6
    header = (f"{what}; L={length}, s={args.sparsity} (K={budget}, {streamed} streamed tokens), "
              f"method {args.method}, CPU ({platform.processor() or platform.machine()}), "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}. One run each.")
    rows = [
        "| run | seconds | loss | density | attention s | selection+eviction s |",
        "|---|---|---|---|---|---|",
        f"| plain decode (DynamicCache, no eviction) | {plain:.2f} | | 1 | | |",
        f"| kv c=1 | {c1:.2f} | {loss1:.4f} | {stats1.density:.4f} | "
        f"{stats1.attention_seconds:.2f} | {stats1.selection_seconds:.2f} |",
        f"| kv c={args.chunk} | {cc:.2f} | {loss_c:.4f} | {stats_c.density:.4f} | "
        f"{stats_c.attention_seconds:.2f} | {stats_c.selection_seconds:.2f} |",
        f"| the model alone: {args.chunk}-token forwards, no cache | {model_only:.2f} | | | | |",
        "",
        f"- kv c=1 / plain decode: **{c1 / plain:.2f}x** (target <= 1.3x); overhead "
        f"{overhead_us:.0f} us per layer per streamed token",
        f"- kv c=1 / kv c={args.chunk}: **{c1 / cc:.1f}x** faster with chunks (target >= 8x); "
        f"the model's own {args.chunk}-token forwards take {model_only:.2f} s of the "
        f"{cc:.2f} s, so no protocol could do better than {c1 / model_only:.1f}x here",
    ]
    report("kv protocol vs plain decode (bench_kv.py)", header, rows, record=not args.no_record)


if __name__ == "__main__":
    main()
