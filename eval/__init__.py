"""The perplexity harness: models, data, metrics and the benchmark runner (docs/running.md).

The original benchmark's Python API, by its original names:

    from eval import create_quick_test, run_benchmark
    results = run_benchmark(create_quick_test())

ExperimentConfig, ModelConfig, create_quick_test (eval.config) and run_benchmark,
PerplexityBenchmarkRunner (eval.runner) are imported on first use: importing a light module
of the harness (eval.cache, eval.hub) does not load torch and the model libraries.
"""
import importlib

_API = {"ExperimentConfig": "config", "ModelConfig": "config", "create_quick_test": "config",
        "run_benchmark": "runner", "PerplexityBenchmarkRunner": "runner"}
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
