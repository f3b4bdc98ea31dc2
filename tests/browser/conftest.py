"""Opt-in browser tests (`make test-browser`): skipped by `make test` unless LABKIT_BROWSER=1."""

import os

collect_ignore_glob = [] if os.environ.get("LABKIT_BROWSER") == "1" else ["test_*.py"]
