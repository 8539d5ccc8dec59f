"""One error type for everything a user can fix, and the wrapper that turns it into one line.

Every stage script and the `cxr` command run through `run_main`: a `CxrError` (or `ValueError`
from argument checks) prints `error: <message>` and exits 1; set CXR_DEBUG=1 or pass --verbose
for the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable


class CxrError(Exception):
    """A failure the user can act on; the message names the thing and what to do."""


def debug_enabled(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return os.environ.get("CXR_DEBUG", "") not in ("", "0") or "--verbose" in argv


def run_main(main: Callable[[], int | None], argv: list[str] | None = None) -> None:
    """Run `main`, exiting with its status; user errors become one line on stderr.
    `argv` (default sys.argv) is only consulted for --verbose."""
    try:
        status = main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (CxrError, ValueError, FileNotFoundError, PermissionError, OSError) as exc:
        if debug_enabled(argv):
            traceback.print_exc()
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    sys.exit(status or 0)
