"""Does a rounding-level change of the model move a method's perplexity?

Scales the model's RoPE inverse frequencies by 1 + eps (default 3e-7: dense perplexity moves
by about 1e-5 relative) and scores the same windows with and without it, per method. A method
whose selection rests on near-ties (docs/block_statistics.md) moves by much more than dense.

    python scripts/rope_perturbation.py --lengths 512 1024 --windows 0 1 \\
        --methods dense h2o cab_v3 cab_v4 streaming_llm --protocol mask

Prints one line per (L, window, method): PPL unperturbed, perturbed, relative move.
--max-l2-tolerance T pools max_l2 with tolerance T instead of the dtype's (through
cabattn.reference.coarsen); T = 0 is the first largest norm, the rule before the tolerance.
"""
import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import cabattn  # noqa: E402
from cabattn import ops, reference  # noqa: E402
from eval.data import load_windows  # noqa: E402
from eval.models import load_model  # noqa: E402


def window_ppl(model, ids, method, sparsity, protocol, **options) -> float:
    with torch.no_grad():
        if method == "dense":
            loss = model(ids, labels=ids).loss
        else:
            with cabattn.apply(model, method, sparsity, protocol=protocol, **options):
                loss = model(ids, labels=ids).loss
    return math.exp(loss.item())


def set_rope(model, inv_freq: torch.Tensor) -> None:
    """Sets the model's RoPE inverse frequencies (restored from a saved copy, exactly: scaling
    by 1 + eps and back by 1 / (1 + eps) would leave a few ulps of drift)."""
    rotary = model.model.rotary_emb
    rotary.inv_freq.copy_(inv_freq)
    rotary.original_inv_freq = inv_freq.clone()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="pd-books")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--windows", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max-windows", type=int, default=4, help="as the quick test's cells")
    parser.add_argument("--methods", nargs="+",
                        default=["dense", "h2o", "cab_v3", "cab_v4", "streaming_llm"])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--protocol", default="mask", choices=sorted(cabattn.PROTOCOLS))
    parser.add_argument("--kv-chunk", type=int, default=1, help="kv protocol: tokens per step")
    parser.add_argument("--eps", type=float, default=3e-7)
    parser.add_argument("--max-l2-tolerance", type=float, default=None)
    args = parser.parse_args()
    if args.max_l2_tolerance is not None:
        ops.coarsen = lambda x, block_size, mode=ops.MAX_L2: reference.coarsen(
            x, block_size, mode, tolerance=args.max_l2_tolerance)
    torch.set_num_threads(1)
    loaded = load_model()
    inv_freq = loaded.model.model.rotary_emb.inv_freq.clone()
    options = {"kv_chunk": args.kv_chunk} if args.protocol == "kv" else {}
    rows = []
    for length in args.lengths:
        windows = load_windows(args.dataset, loaded.tokenizer, length,
                               max_windows=args.max_windows)
        for w in args.windows:
            ids = windows.input_ids[w:w + 1]
            for method in args.methods:
                base = window_ppl(loaded.model, ids, method, args.sparsity, args.protocol,
                                  **options)
                set_rope(loaded.model, inv_freq * (1 + args.eps))
                try:
                    moved = window_ppl(loaded.model, ids, method, args.sparsity, args.protocol,
                                       **options)
                finally:
                    set_rope(loaded.model, inv_freq)
                rows.append((length, w, method, base, moved))
                print(f"L={length} window={w} {method:14s} {args.protocol} s={args.sparsity}: "
                      f"{base:.4f} -> {moved:.4f} ({(moved - base) / base:+.2e})", flush=True)
    worst = {}
    for _, _, method, base, moved in rows:
        worst[method] = max(worst.get(method, 0.0), abs(moved - base) / base)
    print("largest relative move per method: " +
          ", ".join(f"{m} {v:.1e}" for m, v in worst.items()))


if __name__ == "__main__":
    main()
