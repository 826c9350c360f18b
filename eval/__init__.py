"""The perplexity harness: models, data, metrics and the benchmark runner (METHODS.md 4-6)."""
