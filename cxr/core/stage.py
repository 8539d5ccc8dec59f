"""The command line of every stage script: one parser, so each takes its arguments, `--help` and
`--verbose` the same way, and a bad argument ends as every other user error does (one `error:`
line, exit 1, through `cxr.core.errors.run_main`).

    args = stage_args(__doc__, variant="a name under params.yaml variants", fold=True)
    python stages/train.py --help
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # A ValueError, not argparse's exit 2 with a usage block: run_main prints it as one line.
        raise ValueError(f"{message} ({self.format_usage().strip()})")


def stage_args(
    description: str | None, variant: str | None = None, fold: bool = False, optional: bool = False
) -> argparse.Namespace:
    """Parse sys.argv for a stage: VARIANT (when `variant` says what it names; may be left out
    with `optional`), --fold K (when `fold`), and --verbose. `description` is the script's
    docstring, shown by --help."""
    parser = _Parser(
        prog=f"python stages/{Path(sys.argv[0]).name}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if variant is not None:
        parser.add_argument("variant", metavar="VARIANT", help=variant, nargs="?" if optional else None)
    if fold:
        parser.add_argument(
            "--fold", type=int, default=None, metavar="K", help="train on the other folds, validate on this one (cv)"
        )
    # run_main reads it from sys.argv itself; declared here so that it is not refused.
    parser.add_argument("--verbose", action="store_true", help="print the traceback of an error")
    return parser.parse_args()
