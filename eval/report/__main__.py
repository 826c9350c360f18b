"""`python -m eval.report RESULTS.json [MORE.json ...] [--html PAGE.html]` (eval.report says what
each output is; eval.html_report makes the page)."""
import argparse
import sys

from ..html_report import write_page, write_report
from ..results import CorruptFileError
from . import __doc__ as DESCRIPTION
from . import key_token_markdown, load_results, table3_markdown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.report", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results JSON files written by python -m "
                        "eval.run")
    parser.add_argument("--output-dir", help="where to write the figures, tables and page of "
                        "each file (default: beside it)")
    parser.add_argument("--html", metavar="PAGE.html",
                        help="write one page of all the files given, with a view across them "
                        "when there are several, and nothing else")
    args = parser.parse_args(argv)
    try:
        for path in args.results:  # every file checked before anything is written
            load_results(path)
        if args.html:
            print(f"wrote {write_page(args.results, args.html)}")
            return 0
        for path in args.results:
            for written in write_report(path, args.output_dir):
                print(f"wrote {written}")
            print()
            results = load_results(path)
            print(table3_markdown(results) + key_token_markdown(results), end="")
    except CorruptFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
