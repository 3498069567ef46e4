#!/usr/bin/env python
"""`ltdet-test` from a source checkout: `python tools/test.py ...` (same flags).

The command lives in the package (`ltdet.scripts.test`); `make venv` installs ltdet editable, so
this imports the installed package.
"""

import sys

from ltdet.scripts.test import main, parse_args, run

__all__ = ["main", "parse_args", "run"]

if __name__ == "__main__":
    sys.exit(main())
