"""Hand-made results documents shaped as eval.run writes them (both sweeps, per-window sums,
paired intervals vs dense, the protocol's record, key tokens, a tasks section), for the
results page's tests; built in milliseconds, no model."""
import numpy as np

from eval.metrics import summarize
from eval.statistics import versus_dense, wilson_interval

TOKENS = 255
LENGTHS = (128, 256)
LEVELS = (0.0, 0.5, 0.9)
# Per-token NLL each method adds at s = 0.9 (scaled by s/0.9 at other s): h2o and cab_v4
# close, cab_v3 far behind.
OFFSETS = {"h2o": 0.05, "cab_v4": 0.06, "cab_v3": 0.9}
PARAMS = {"h2o": {"recent_fraction": 0.5}, "cab_v4": {"lambda_redundancy": 0.3},
          "cab_v3": {"lambda_redundancy": 0.5}}


def _cell(per_token, method, s, L, record):
    r = summarize(np.asarray(per_token) * TOKENS, [TOKENS] * len(per_token),
                  [4 * TOKENS] * len(per_token))
    r.update(record, density=1.0 - s, context_length=L, sparsity=s, method=method,
             method_run="dense" if s == 0 else method, sparsity_run=s,
             params={} if s == 0 else PARAMS.get(method, {}))
    if s == 0:
        r["protocol"] = "dense"
    return r


def _versus(r, dense, seed=42):
    r.update(dense_perplexity=dense["perplexity"],
             delta_vs_dense=r["perplexity"] / dense["perplexity"] - 1)
    if r["method_run"] != "dense":
        r.update(versus_dense(r, dense, seed=seed))
    return r


def _task_cell(method, s, L, correct, record):
    n = len(correct)
    r = {"kind": "task", "task": "passkey", "scoring": "teacher_forced",
         "accuracy": sum(correct) / n, "accuracy_ci95": wilson_interval(sum(correct), n),
         "samples": n, "method": method, "sparsity": s, "context_length": L,
         "method_run": "dense" if s == 0 else method, "density": 1.0 - s,
         "delta_vs_dense": 0.0 if s == 0 else 0.02 * s,
         "per_sample": [{"score": float(c)} for c in correct],
         "by_depth": {f"{d:.1f}": {"accuracy": float(c), "samples": 1}
                      for d, c in zip(np.linspace(0.1, 0.9, n), correct)}, **record}
    return r


def results_document(windows: int = 12, protocol: str = "mask", options: dict | None = None,
                     offsets: dict | None = None, datasets=("brown", "pd-books"),
                     seed: int = 0, key_tokens: bool = True, tasks: bool = True) -> dict:
    """A complete run of dense and the methods of `offsets` (OFFSETS unless told) on the
    datasets: context lengths 128 and 256 at s = 0.9, s = 0, 0.5, 0.9 at L = 256; `options`
    are protocol options, in the config block and in every cell's record."""
    offsets = OFFSETS if offsets is None else offsets
    options = options or {}
    rng = np.random.default_rng(seed)
    record = {"protocol": protocol, "block_size": 16, "k_min": 16, **options}
    config = {"name": "fixture", "seed": 42, "model": {"name": "tiny-llama", "device": "auto"},
              "datasets": list(datasets), "methods": ["dense", *offsets],
              "context_length_sweep": {"enabled": True, "context_lengths": list(LENGTHS),
                                       "fixed_sparsity": 0.9},
              "sparsity_sweep": {"enabled": True, "sparsity_levels": list(LEVELS),
                                 "fixed_context_length": 256},
              "protocol": protocol, "block_size": "auto", "k_min": 16, **options,
              "max_windows": windows, "status": "complete",
              "started": "2026-12-07T06:00:00", "written": "2026-12-07T06:05:00",
              "command": ["python", "-m", "eval.run", "--protocol", protocol, "--name",
                          "fixture"],
              "resolved_device": "cpu", "resolved_dtype": "float32",
              "versions": {"python": "3.11.2", "torch": "2.14.1", "cabattn_commit": "abc123"},
              "machine": {"platform": "Linux-x86_64", "cpu_count": 2, "cuda_device": None},
              "model_info": {"name": "tiny-llama", "num_parameters": 123456}}
    results = {}
    for dataset in datasets:
        difficulty = rng.uniform(2.5, 3.5, windows)
        by_method = results.setdefault(dataset, {})
        dense = {L: _cell(difficulty + (0.1 if L == 128 else 0.0), "dense", 0.0, L, record)
                 for L in LENGTHS}
        by_method["dense"] = {
            "context_length_sweep": {str(L): _versus(dict(dense[L]), dense[L]) for L in LENGTHS},
            "sparsity_sweep": {"0.0": _versus(dict(dense[256]), dense[256])}}
        for method, offset in offsets.items():
            def sparse(L, s):
                if s == 0:
                    return _versus(dict(dense[L], method=method), dense[L])
                nll = (difficulty + (0.1 if L == 128 else 0.0) + offset * s / 0.9
                       + rng.normal(0, 0.01, windows))
                return _versus(_cell(nll, method, s, L, record), dense[L])
            by_method[method] = {
                "context_length_sweep": {str(L): sparse(L, 0.9) for L in LENGTHS},
                "sparsity_sweep": {f"{s}": sparse(256, s) for s in LEVELS}}
            by_method[method]["sparsity_sweep"]["0.9"] = \
                by_method[method]["context_length_sweep"]["256"]
        if key_tokens:
            for method, sweeps in by_method.items():
                for r in sweeps["sparsity_sweep"].values():
                    r.update(key_token_perplexity=r["perplexity"] * 0.5,
                             key_token_perplexity_dense=dense[256]["perplexity"] * 0.5,
                             num_key_tokens=40, key_tokens_indicative_only=False)
    document = {"config": config, "results": results}
    if tasks:
        correct = {"dense": [1] * 10, "h2o": [1, 0] * 5, "cab_v4": [1, 1, 0, 1, 1] * 2,
                   "cab_v3": [0] * 10}
        document["tasks"] = {"passkey": {
            method: {"sparsity_sweep": {
                f"{s}": _task_cell(method, s, 256, correct["dense" if s == 0 else method],
                                   record)
                for s in ((0.0,) if method == "dense" else LEVELS)}}
            for method in ["dense", *offsets] if method in correct}}
    return document
