"""The original benchmark's Python API, by its original import path: the harness's own objects
(eval.config, eval.runner), not a second implementation.

    from experiments.perplexity_lm import create_quick_test, run_benchmark
    results = run_benchmark(create_quick_test())
"""
from eval.config import ExperimentConfig, ModelConfig, create_quick_test
from eval.runner import PerplexityBenchmarkRunner, run_benchmark

__all__ = ["ExperimentConfig", "ModelConfig", "PerplexityBenchmarkRunner", "create_quick_test",
           "run_benchmark"]
