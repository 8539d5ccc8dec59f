"""Atomic writes: an output appears whole or not at all, so DVC never caches half a file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

# mkstemp creates 0600 files; outputs should get the usual permissions of the user's umask.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _publish_mode(path: Path) -> None:
    os.chmod(path, 0o666 & ~_UMASK)
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final`, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path | str, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling file for writing; it replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        _publish_mode(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_path(final: Path | str) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary path next to `final` for libraries that write by path (Keras, numpy)."""

    @contextlib.contextmanager
    def _cm() -> Iterator[Path]:
        dest = Path(final)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{dest.suffix}", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            _publish_mode(tmp)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    return _cm()


def write_json(path: Path | str, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_file(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")


def read_json(path: Path | str) -> Any:
    with open(path) as fh:
        return json.load(fh)
