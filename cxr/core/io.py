"""Atomic writes: an output appears whole or not at all, so DVC never caches half a file.

Temporaries sit next to the output as `.<name>.<pid>-<random>.tmp…`; a run killed mid-write
(kill -9, power loss) leaves them behind, and the next write of the same output removes those
whose process is gone. A full disk is reported as one line naming the output.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cxr.core.errors import CxrError

# mkstemp creates 0600 files; outputs should get the usual permissions of the user's umask.
_UMASK = os.umask(0)
os.umask(_UMASK)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(CxrError):
    """No space left while writing an output; the message names the output."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        super().__init__(
            f"{path}: no space left on device while writing it; free disk space on that drive (df -h) and run again"
        )


def _publish_mode(path: Path) -> None:
    os.chmod(path, 0o666 & ~_UMASK)


def _tag(final: Path) -> str:
    """Name prefix of this process's temporaries for `final`."""
    return f".{final.name}.{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:  # a killed child nobody has reaped yet is a zombie: gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def sweep_stale(final: Path | str) -> None:
    """Remove the temporaries of `final` that writers killed mid-write left behind."""
    final = Path(final)
    prefix = f".{final.name}."
    try:
        entries = [e for e in final.parent.iterdir() if e.name.startswith(prefix)]
    except FileNotFoundError:
        return
    for entry in entries:
        m = re.match(r"(\d+)-", entry.name[len(prefix) :])
        if m is None or _alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _no_space(final: Path, exc: BaseException, inside: Path | None = None) -> BaseException:
    """A full disk (or quota) while writing `final` → one line naming it; any other error unchanged.
    A DiskFullError about a file `inside` the temporary folder of `final` is renamed to `final`."""
    if isinstance(exc, DiskFullError):
        return DiskFullError(final) if inside is not None and inside in exc.path.parents else exc
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return DiskFullError(final)
    return exc


@contextlib.contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final`, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=_tag(final), suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f"{_tag(final)}old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = _no_space(final, exc, inside=tmp)
        if error is exc:
            raise
        raise error from None


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to `final` for libraries that write by path (Keras, numpy);
    it replaces `final` only if the block succeeds."""
    dest = Path(final)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(dest)
    # The suffix keeps the extension: Keras picks the format from it.
    fd, tmp_name = tempfile.mkstemp(prefix=_tag(dest), suffix=f".tmp{dest.suffix}", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _publish_mode(tmp)
        os.replace(tmp, dest)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        error = _no_space(dest, exc)
        if error is exc:
            raise
        raise error from None


@contextlib.contextmanager
def atomic_file(final: Path | str, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling file for writing; it replaces `final` only if the block succeeds."""
    with atomic_path(final) as tmp, open(tmp, mode) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def write_json(path: Path | str, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_file(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
