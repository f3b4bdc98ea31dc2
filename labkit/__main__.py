"""`python -m labkit ...` is the `labkit` command (labkit.cli)."""

import sys

from .cli import main

sys.exit(main())
