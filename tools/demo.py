#!/usr/bin/env python
"""The ltdet demo (`make demo`): `python tools/demo.py [--opts ...] [--check] [--overwrite]`.

The command lives in the package (`ltdet.scripts.demo`, whose docstring says what it does);
`make venv` installs ltdet editable, so this imports the installed package.
"""

import sys

from ltdet.scripts.demo import DEFAULT_CONFIG, MAX_APR_OVER_APF, MIN_AP50_FREQUENT, main

__all__ = ["DEFAULT_CONFIG", "MAX_APR_OVER_APF", "MIN_AP50_FREQUENT", "main"]

if __name__ == "__main__":
    sys.exit(main())
