"""`python -m eval.run [flags]`: the perplexity benchmark's command line (eval.cli).

This module only starts the command line; the runner is eval.runner and one cell's computation
eval.cell (docs/architecture.md). Importing eval.cli imports torch and the model libraries,
which takes seconds: a Ctrl-C that arrives then ends the run as one that arrives later does
(exit status 130, no traceback), since nothing has been computed yet.
"""
import sys

if __name__ == "__main__":
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)  # eval.cli.EXIT_INTERRUPTED, whose module had not finished importing
    sys.exit(main())
