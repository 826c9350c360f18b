"""`python -m experiments.perplexity_lm.driver [flags]`: the original benchmark's command, the
same command line as `python -m eval.run` (--quick-test, --icml-full, --config, ...)."""
import runpy

if __name__ == "__main__":
    runpy.run_module("eval.run", run_name="__main__", alter_sys=True)
