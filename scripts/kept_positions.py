"""What each method keeps under the prefill protocol, for one task sample: a figure of the kept
positions (layer x context position; the share of a layer's KV heads that keep it), one panel
per method, the needle's tokens marked.

  .venv/bin/python scripts/kept_positions.py                   # niah_single, L = 1024, s = 0.9
  .venv/bin/python scripts/kept_positions.py --sparsity 0.8 --sample 3 --question-aware \\
      --out docs/figures/prefill

It reads `stats.kept_positions` after one forward under each method (docs/protocols.md,
Prefill), on the offline default model unless --model says otherwise.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cabattn  # noqa: E402
from eval.models import load_model  # noqa: E402
from eval.plotting import save_figure  # noqa: E402
from eval.tasks.prompt import synthetic_samples  # noqa: E402

METHODS = ["h2o", "snapkv", "adakv", "tova", "knorm", "streaming_llm", "cab_v4", "cab_v3"]


def kept_share(kept: list, context: int) -> torch.Tensor:
    """[layers, context] share of each layer's KV heads that keep each position."""
    rows = []
    for positions in kept:  # [B, Hkv, K_l], -1 past a head's count
        held = torch.zeros(context)
        live = positions[0][positions[0] >= 0]
        held.index_add_(0, live, torch.ones(live.numel()))
        rows.append(held / positions.shape[1])
    return torch.stack(rows)


def needle_span(sample, tokenizer) -> tuple:
    """(first, last) token positions of the needle's number in the prompt."""
    number = tokenizer(" " + sample.answers[0], add_special_tokens=False).input_ids
    ids = sample.prompt_ids
    for start in range(len(ids) - len(number) + 1):
        if ids[start:start + len(number)] == number:
            return start, start + len(number) - 1
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="niah_single")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--sample", type=int, default=2, help="which of 5 samples (depths spread)")
    p.add_argument("--question-aware", action="store_true",
                   help="compress after the question (default: before it)")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--out", type=Path, default=Path("prefill"),
                   help="path stem: STEM_kept_positions.png and .pdf (prefill)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    sample = synthetic_samples(args.task, loaded.tokenizer, args.length, 5, 42).samples[args.sample]
    context = len(sample.prompt_ids) if args.question_aware else sample.question_start
    ids = torch.tensor([sample.ids])
    import matplotlib.pyplot as plt
    columns = 2
    rows = -(-len(args.methods) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(12, 2.2 * rows), sharex=True, squeeze=False)
    span = needle_span(sample, loaded.tokenizer)
    for ax, method in zip(axes.flat, args.methods):
        with cabattn.apply(loaded.model, method, args.sparsity, protocol="prefill") as stats, \
                torch.no_grad():
            loaded.model(ids, context_length=context)
        share = kept_share(stats.kept_positions, context)
        ax.imshow(share, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1,
                  extent=(0, context, share.shape[0], 0))
        if span is not None:
            ax.axvspan(span[0], span[1] + 1, color="tab:red", alpha=0.35, lw=0)
        ax.set_title(f"{method}: K = {stats.budget_tokens} of {context}", fontsize=9)
        ax.set_ylabel("layer")
    for ax in axes.flat[len(args.methods):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("context position")
    where = "after" if args.question_aware else "before"
    fig.suptitle(f"Kept positions under the prefill protocol ({loaded.name}, {args.task} "
                 f"sample {args.sample} at depth {sample.depth:.2f}, L = {args.length}, "
                 f"s = {args.sparsity:g}, compressed {where} the question; black: every KV "
                 "head keeps it, red: the needle's number)", fontsize=9)
    for path in save_figure(fig, args.out, "kept_positions"):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
