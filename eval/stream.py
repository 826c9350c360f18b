"""python -m eval.stream: perplexity over one stream longer than the model's positions.

One window of --tokens tokens (the first book of a book corpus long enough, or the first
tokens of a stream corpus; like every window, it starts with the BOS token when the model's
tokenizer puts one before a text, docs/datasets.md) is scored through the kv protocol with a
cache of --cache entries per KV head, fed in chunks of --chunk tokens, with positions="cache"
(StreamingLLM's pos-shift: RoPE at the entries' indices inside the cache, so no position ever
exceeds cache + chunk - 1). The NLL of every prediction is kept and reported per segment of
--segment tokens. `dense` is the model's own attention over the first min(tokens, positions)
tokens: it cannot go further.

    python -m eval.stream --tokens 32768 --cache 1024 --chunk 16 --output-dir results/stream

Each method is one cell of the cell store (<output-dir>/<name>.cells/): a killed run keeps every
finished method and a rerun computes only the rest. The results file <name>.json holds
{"config": ..., "stream": {label: R}}, R being a cell's metrics plus `segments` (end token,
NLL sum, tokens, perplexity of each segment), `last_tokens_perplexity` (over the last
--summary-tokens predictions) and the speed; the figure <name>_stream.png/pdf draws
perplexity per segment against tokens streamed.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import cabattn
from cabattn.checks import lookup
from cabattn.grid import resolve_block_size
from cabattn.kv_protocol import KVProtocol

from . import arguments, env
from .cell import data_identity
from .data import available_datasets, check_data_file, load_windows, validate_dataset
from .executors.common import KernelCheckError, check_kernels
from .metrics import summarize
from .models import DEFAULT_MODEL, load_model
from .plotting import save_figure, style_of
from .report import _log_if_wide
from .results import CellStore, write_json_atomic

# label -> (registered method, parameters): the curves of StreamingLLM's Figure 3 and ours
STREAM_METHODS = {
    "dense": ("dense", {}),
    "streaming_llm": ("streaming_llm", {"n_sink": 4}),
    "window": ("streaming_llm", {"n_sink": 0}),  # streaming without attention sinks
    "h2o": ("h2o", {}),
    "cab_v4": ("cab_v4", {}),
    "cab_v3": ("cab_v3", {}),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.stream", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods: " + "; ".join(f"{label} = {m}{params or ''}"
                                       for label, (m, params) in STREAM_METHODS.items()))
    p.add_argument("--tokens", type=arguments.positive_int, default=32768,
                   help="stream length (32768)")
    p.add_argument("--cache", type=arguments.positive_int, default=1024,
                   help="cache entries per KV head and layer (1024)")
    p.add_argument("--chunk", type=arguments.positive_int, default=16,
                   help="tokens per step (16)")
    p.add_argument("--segment", type=arguments.positive_int, default=1024,
                   help="tokens per reported perplexity (1024)")
    p.add_argument("--summary-tokens", type=arguments.positive_int, default=8192,
                   help="the summary: perplexity of the last N predictions (8192)")
    p.add_argument("--methods", nargs="+", default=list(STREAM_METHODS), metavar="LABEL",
                   help=f"any of {', '.join(STREAM_METHODS)} (all)")
    p.add_argument("--dataset", default="pd-books", help=f"{', '.join(available_datasets())}")
    p.add_argument("--data-file", metavar="PATH", help="a local text/JSON(L) file instead "
                   "(--dataset then only labels it)")
    p.add_argument("--text-field", default="text", help="text column of --data-file (text)")
    p.add_argument("--block-size", type=arguments.block_size, default="auto",
                   help="cab_v3/cab_v4 block: auto (about 64 blocks in the cache) or 16..128")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="auto", choices=("auto", *env.DTYPES))
    p.add_argument("--device", default="auto", help=f"{', '.join(env.DEVICES)} or cuda:N")
    p.add_argument("--threads", type=arguments.positive_int, help="CPU threads for torch")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output-dir", default="results/stream")
    p.add_argument("--name", default="stream", help="results file name (stream)")
    return p


def check_args(args) -> None:
    """Bad input fails here, before the model loads."""
    for label in args.methods:
        lookup("stream method", label, STREAM_METHODS)
    if args.cache >= args.tokens:
        raise ValueError(f"--cache {args.cache} must be smaller than --tokens {args.tokens} "
                         "(nothing would be evicted)")
    if args.segment > args.tokens - 1:
        raise ValueError(f"--segment {args.segment} is longer than the stream's "
                         f"{args.tokens - 1} predictions")
    if args.data_file is None:
        validate_dataset(args.dataset)
    else:
        check_data_file(args.dataset, args.data_file, args.text_field)


def block_size(args) -> int:
    return resolve_block_size(args.block_size, args.cache)


def stream_key(args, label: str, positions: int, bos_token_id) -> dict:
    method, params = STREAM_METHODS[label]
    from .results import CELL_FORMAT
    key = {"cell_format": CELL_FORMAT, "kind": "stream", "dataset": args.dataset,
           "data_file": data_identity(args),
           "text_field": args.text_field, "model": args.model,
           "dtype": args.dtype, "device": args.device.split(":")[0], "tokens": args.tokens,
           "seed": args.seed, "segment": args.segment, "summary_tokens": args.summary_tokens,
           "method": method, "params": params}
    if bos_token_id is not None:  # only then, so that the keys of BOS-less streams stay
        key["bos_token_id"] = bos_token_id
    if method == "dense":
        key["tokens"] = min(args.tokens, positions)
    else:
        key.update(cache=args.cache, chunk=args.chunk, positions="cache",
                   block_size=block_size(args))
    return key


def score(args, loaded, ids, label: str):
    """(NLL of every prediction [n-1] float64, the protocol's record) of one method."""
    method, params = STREAM_METHODS[label]
    model = loaded.model
    with torch.inference_mode():
        if method == "dense":
            ids = ids[:, :loaded.max_positions]
            with cabattn.model_attention(model) as stats:
                logits = model(ids).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            return nll.double(), stats.record()
        # K = max(k_min, floor((1 - s) L)) = cache exactly with k_min = cache
        sparsity = 1.0 - args.cache / args.tokens
        protocol = KVProtocol(model, method, sparsity, kv_chunk=args.chunk, positions="cache",
                              block_size=block_size(args), k_min=args.cache, seed=args.seed,
                              keep_logits=False, progress=True, **params)
        with protocol as stats:
            model(ids, labels=ids)
        assert protocol.budget == args.cache, (protocol.budget, args.cache)
        return protocol.token_nll[0].double(), stats.record()


def stream_result(args, tokenizer, ids, nll, record: dict, wall: float) -> dict:
    """R of one method: the cell metrics over its segments, the segments, the summary."""
    n = nll.shape[0]  # predictions of tokens 1..n
    segments = []
    for start in range(0, n, args.segment):
        end = min(start + args.segment, n)
        text = tokenizer.decode(ids[0, start + 1:end + 1].tolist())
        part = nll[start:end]
        segments.append({"end": end + 1, "nll_sum": float(part.sum()), "tokens": end - start,
                         "bytes": len(text.encode("utf-8")),
                         "perplexity": math.exp(float(part.mean()))})
    result = summarize([s["nll_sum"] for s in segments], [s["tokens"] for s in segments],
                       [s["bytes"] for s in segments], seed=args.seed)
    last = nll[-min(args.summary_tokens, n):]
    result.update(record)
    result.update(segments=segments, last_tokens=int(last.shape[0]),
                  last_tokens_perplexity=math.exp(float(last.mean())),
                  wall_seconds=wall, tokens_per_second=(n + 1) / wall)
    return result


def stream_figure(results: dict, positions: int, stem: Path, title: str) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    style = style_of(list(results))
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, r in results.items():
        ends = [s["end"] for s in r["segments"]]
        ax.plot(ends, [s["perplexity"] for s in r["segments"]], label=label,
                markersize=3, **style[label])
    if positions < max(r["segments"][-1]["end"] for r in results.values()):
        ax.axvline(positions, color="gray", linewidth=0.8, linestyle=":")
        ax.text(positions, ax.get_ylim()[1], " model's positions", va="top", fontsize=8,
                color="gray")
    _log_if_wide(ax, [s["perplexity"] for r in results.values() for s in r["segments"]])
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel("perplexity per segment")
    ax.set_title(title, fontsize=9)
    ax.legend(frameon=False, fontsize=8)
    paths = save_figure(fig, stem, "stream")
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except ValueError as error:  # DatasetError is one
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.device = env.resolve_device(args.device)
    args.dtype = env.resolve_dtype(args.dtype, args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = CellStore(out / f"{args.name}.cells")
    try:  # no stream on kernels that have not passed the self-check on this device
        check_kernels("extension", args.device, print)
    except KernelCheckError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    windows = load_windows(args.dataset, loaded.tokenizer, args.tokens, max_windows=1,
                           data_file=args.data_file, text_field=args.text_field)
    ids = windows.input_ids[:1].to(args.device)
    results = {}
    for label in tqdm(args.methods, desc="stream", unit="method"):
        key = stream_key(args, label, loaded.max_positions, windows.bos_token_id)
        with store.claim(key):
            result = store.get(key)
            if result is None:
                start = time.perf_counter()
                nll, record = score(args, loaded, ids, label)
                env.synchronize(args.device)
                result = stream_result(args, loaded.tokenizer, ids, nll, record,
                                       time.perf_counter() - start)
                store.put(key, result, env.provenance(args.device))
        results[label] = result
        print(f"{label}: perplexity {result['perplexity']:.3f}, last "
              f"{result['last_tokens']} tokens {result['last_tokens_perplexity']:.3f}, "
              f"{result['tokens_per_second']:.1f} tokens/s", flush=True)
    config = {**{k: v for k, v in vars(args).items() if k != "methods"},
              "block_size": block_size(args), "positions": "cache",
              "model_positions": loaded.max_positions, "source": windows.description,
              "provenance": env.provenance(args.device)}
    path = out / f"{args.name}.json"
    write_json_atomic(path, {"config": config, "stream": results})
    title = (f"{args.model.split('/')[-1]}, {args.dataset}: {args.tokens} tokens, cache "
             f"{args.cache}, chunk {args.chunk}")
    figures = stream_figure(results, loaded.max_positions, out / args.name, title)
    print(f"wrote {path} and {', '.join(map(str, figures))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
