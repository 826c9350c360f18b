"""The original benchmark's import paths (experiments.perplexity_lm), kept so that its users'
commands and scripts keep working: an alias of the harness in eval/, nothing of its own."""
