"""What the command-line tools share: user errors end as one line on stderr and exit code 2.

A user error is a config, data, checkpoint or file problem whose message already names the file,
the entry or the key and the fix (`USER_ERRORS`); a traceback would only bury it. Set
`LTDET_TRACEBACK=1` to get the traceback anyway (e.g. to report a bug).
"""

import os
import sys

from ltdet.config import ConfigError
from ltdet.engine.checkpoint import CheckpointError
from ltdet.spec import SpecError

__all__ = ["USER_ERRORS", "USER_ERROR_EXIT", "report"]

#: Exceptions whose message is the whole story. SpecError: a component spec given in code or in a
#: checkpoint's config (one from a config file is already a ConfigError). ValueError / OSError
#: cover ltdet's data and file checks (bad json entries, missing or corrupt images, a full disk).
USER_ERRORS = (ConfigError, SpecError, CheckpointError, FileNotFoundError, ValueError, OSError)
USER_ERROR_EXIT = 2


def report(exc: BaseException, prefix: str = "error") -> int:
    """Print `exc` as one line (or re-raise it under LTDET_TRACEBACK=1); returns exit code 2."""
    if os.environ.get("LTDET_TRACEBACK"):
        raise exc
    message = " ".join(str(exc).split())  # one line, whatever the message held
    print(f"{prefix}: {message}", file=sys.stderr)
    return USER_ERROR_EXIT
