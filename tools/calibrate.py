#!/usr/bin/env python
"""`python tools/calibrate.py ...` from a source checkout (same flags as `ltdet-calibrate`).

The command lives in the package (`ltdet.scripts.calibrate`); `make venv` installs ltdet
editable, so this imports the installed package.
"""

import sys

from ltdet.scripts.calibrate import calibrate_and_report, format_before_after, main, parse_args, run

__all__ = ["calibrate_and_report", "format_before_after", "main", "parse_args", "run"]

if __name__ == "__main__":
    sys.exit(main())
