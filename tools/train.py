#!/usr/bin/env python
"""`ltdet-train` from a source checkout: `python tools/train.py CONFIG [...]` (same flags).

The command lives in the package (`ltdet.scripts.train`); `make venv` installs ltdet editable, so
this imports the installed package. `torchrun --nproc_per_node=N tools/train.py CONFIG` works too.
"""

import sys

from ltdet.scripts.train import main, parse_args, run

__all__ = ["main", "parse_args", "run"]

if __name__ == "__main__":
    sys.exit(main())
