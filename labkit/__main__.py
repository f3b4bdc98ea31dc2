"""`python -m labkit ...` and the `labkit` console script: the command (labkit.cli) and its exit code."""

import os
import sys

from .cli import main
from .util import INTERRUPTED


def run() -> None:
    """Exit with cli.main's code. After Ctrl-C (caught, reported in one line) exit 130 at once: CPython can otherwise
    still end the process by SIGINT, which its parent reads as -2 (tests/test_bad_input.py's Ctrl-C test saw it in
    about 1 run of 10)."""
    code = main()
    if code == INTERRUPTED:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
