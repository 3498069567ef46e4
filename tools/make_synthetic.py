#!/usr/bin/env python
"""Generate the synthetic long-tailed detection data set (LVIS v1 format) and print its classes.

    python tools/make_synthetic.py                              # data/generated/synthetic, seed 0
    python tools/make_synthetic.py --root /tmp/syn --seed 1 --set num_train=300 image_size=128

The command lives in the package (`ltdet.scripts.make_synthetic`); `make venv` installs ltdet
editable, so this imports the installed package.
"""

import sys

from ltdet.scripts.make_synthetic import class_table, main, parse_sizes

__all__ = ["class_table", "main", "parse_sizes"]

if __name__ == "__main__":
    sys.exit(main())
