"""Choose, check and write the chest X-ray members of a zip archive or an extracted folder.

    used by cxr/data/fetch.py (python stages/fetch.py → data/raw)

Nothing here knows where the bytes come from: a zip is any seekable file (a local file, a
download, or cxr.data.transport's ranged HTTP reader, which `extract_zip` tells which byte ranges it
is about to read). Every member is CRC-checked (zipfile does it on read) and hashed; `dest`
appears atomically with `chest_xray/` and `sha256.csv`, or not at all.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from cxr.core.constants import CLASSES, OFFICIAL_SPLITS
from cxr.core.errors import CxrError
from cxr.core.io import atomic_dir

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
ROOT_NAME = "chest_xray"
# Gaps between wanted members (macOS "._" files, a stray .DS_Store) are read through while they
# stay within this fraction of the wanted bytes: each request costs a round trip, and this leaves
# room under the 5 % overhead we allow for local headers.
GAP_SLACK = 0.03
CHUNK = 1 << 20
METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
MB = 1 << 20


@dataclass
class Kept:
    """What was written from one archive or folder."""

    root: str  # the chest_xray folder that was kept, as named in the source
    members: int  # images kept
    compressed_bytes: int  # their compressed size (= uncompressed for a folder)
    uncompressed_bytes: int
    files_written: int
    pruned: int  # archive entries (or files) not kept
    counts: dict[str, int]  # "train/NORMAL" → images
    central_directory_bytes: int  # 0 for a folder


@dataclass(frozen=True)
class Pick:
    """One image to keep: its name in the source and its path under `dest`."""

    name: str
    out: str


def mb(n: int) -> str:
    """`n` bytes as '12.3 MB'."""
    return f"{n / MB:.1f} MB"


# ---------------------------------------------------------------- choosing what to keep


def check_names(names: Iterable[str], display: str) -> None:
    """Refuse an archive with absolute or '..' member paths (zip-slip)."""
    for name in names:
        parts = re.split(r"[\\/]", name)
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            raise CxrError(
                f"{display}: member '{name}' has an absolute or '..' path "
                "(zip-slip); refusing the archive, get it from its original source"
            )


def find_root(names: Iterable[str], display: str) -> str:
    """The shallowest `chest_xray/` folder (a name prefix ending in '/') that holds train/ and test/."""
    splits: dict[str, set[str]] = {}
    for name in names:
        parts = name.split("/")
        for i, part in enumerate(parts[:-1]):
            if part == "__MACOSX":
                break  # macOS resource forks, never the data
            if part == ROOT_NAME:
                prefix = "/".join(parts[: i + 1]) + "/"
                found = splits.setdefault(prefix, set())
                if i + 2 < len(parts):
                    found.add(parts[i + 1])
    if not splits:
        raise CxrError(
            f"{display}: no '{ROOT_NAME}' folder in it; point fetch.source "
            "at the Mendeley chest X-ray archive (or the Kaggle copy)"
        )
    complete = [p for p, s in splits.items() if set(OFFICIAL_SPLITS) <= s]
    if not complete:
        shallowest = min(splits, key=lambda p: (p.count("/"), p))
        missing = ", ".join(f"{s}/" for s in OFFICIAL_SPLITS if s not in splits[shallowest])
        raise CxrError(f"{display}: {shallowest} has no {missing} folder; the archive is incomplete, fetch it again")
    depth = min(p.count("/") for p in complete)
    best = sorted(p for p in complete if p.count("/") == depth)
    if len(best) > 1:
        raise CxrError(
            f"{display}: several '{ROOT_NAME}' folders at the same depth "
            f"({', '.join(best)}); point fetch.source at one of them"
        )
    return best[0]


def select(names: Iterable[str], root: str, display: str) -> tuple[list[Pick], dict[str, int]]:
    """The images under `root` in {train,test}/{NORMAL,PNEUMONIA}/ and their count per folder."""
    picks: list[Pick] = []
    seen: set[str] = set()
    counts = {f"{s}/{c}": 0 for s in OFFICIAL_SPLITS for c in CLASSES}
    for name in names:
        if not name.startswith(root):
            continue
        parts = name[len(root) :].split("/")
        if len(parts) != 3 or parts[0] not in OFFICIAL_SPLITS or parts[1] not in CLASSES:
            continue
        file = parts[2]
        if not file or file.startswith(".") or not file.lower().endswith(IMAGE_SUFFIXES):
            continue
        if name in seen:
            raise CxrError(f"{display}: member '{name}' appears twice; the archive is damaged, fetch it again")
        seen.add(name)
        counts[f"{parts[0]}/{parts[1]}"] += 1
        picks.append(Pick(name, f"{ROOT_NAME}/{parts[0]}/{parts[1]}/{file}"))
    for split in OFFICIAL_SPLITS:
        if not any(counts[f"{split}/{c}"] for c in CLASSES):
            raise CxrError(
                f"{display}: {root}{split}/ holds no images (empty split); the archive is incomplete, fetch it again"
            )
        for cls in CLASSES:
            if not counts[f"{split}/{cls}"]:
                raise CxrError(
                    f"{display}: {root}{split}/{cls}/ is missing or holds "
                    "no images; the archive is incomplete, fetch it again"
                )
    return picks, counts


def _cap_error(display: str, cap: int, declared: int | None = None) -> CxrError:
    what = f"declares {mb(declared)} uncompressed" if declared is not None else "unpacks to more than that"
    return CxrError(
        f"{display}: the chest_xray part {what}, over fetch.max_uncompressed_mb = {cap / MB:g}; "
        "refusing it as a possible zip bomb (raise the limit if the archive is genuine)"
    )


# ---------------------------------------------------------------- writing


class BudgetExceeded(Exception):
    """More bytes came than the budget allows."""


def copy_capped(src: BinaryIO, dst: BinaryIO, budget: int) -> tuple[str, int]:
    """Copy src to dst, returning (sha256, bytes); BudgetExceeded once more than `budget` bytes come."""
    digest = hashlib.sha256()
    n = 0
    while chunk := src.read(CHUNK):
        n += len(chunk)
        if n > budget:
            raise BudgetExceeded(n)
        digest.update(chunk)
        dst.write(chunk)
    return digest.hexdigest(), n


def _write_all(
    picks: list[Pick], opener: Callable[[Pick], BinaryIO], dest: Path, cap: int, display: str, progress: bool
) -> list[tuple[str, str, int]]:
    """Write every pick under a temporary sibling of dest plus sha256.csv, then swap it in."""
    rows: list[tuple[str, str, int]] = []
    left = cap
    with atomic_dir(dest) as tmp:
        for pick in tqdm(picks, desc="extract", unit="file", disable=not progress):
            out = tmp / pick.out
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                with opener(pick) as src, open(out, "xb") as dst:
                    sha, n = copy_capped(src, dst, left)
            except BudgetExceeded:
                raise _cap_error(display, cap) from None
            left -= n
            rows.append((pick.out, sha, n))
        rows.sort()
        with open(tmp / "sha256.csv", "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(("path", "sha256", "bytes"))
            writer.writerows(rows)
    return rows


def copy_folder(folder: Path, display: str, dest: Path, cap: int, progress: bool) -> tuple[Kept, int]:
    """Copy the chest_xray images out of an extracted folder (the folder itself may be chest_xray);
    also returns the size of every file under it."""
    base = Path(os.path.abspath(folder))
    files: dict[str, Path] = {}
    for dirpath, _dirs, filenames in os.walk(base):
        for f in filenames:
            path = Path(dirpath, f)
            files[path.relative_to(base.parent).as_posix()] = path
    root = find_root(files, display)
    picks, counts = select(sorted(files), root, display)
    for pick in picks:
        if files[pick.name].is_symlink():
            raise CxrError(f"{display}: {files[pick.name]} is a symbolic link; copy the real files instead")
    declared = sum(files[p.name].stat().st_size for p in picks)
    if declared > cap:
        raise _cap_error(display, cap, declared)
    rows = _write_all(picks, lambda p: open(files[p.name], "rb"), dest, cap, display, progress)
    written = sum(n for _, _, n in rows)
    kept = Kept(
        root=root,
        members=len(picks),
        compressed_bytes=written,
        uncompressed_bytes=written,
        files_written=len(rows),
        pruned=len(files) - len(picks),
        counts=counts,
        central_directory_bytes=0,
    )
    return kept, sum(p.stat().st_size for p in files.values() if not p.is_symlink())


# ---------------------------------------------------------------- zip archives


def not_zip(display: str, head: bytes, content_type: str = "") -> CxrError:
    """Tell a truncated zip (it starts like one) from something that is no zip at all."""
    if head.startswith(b"PK\x03\x04"):
        return CxrError(f"{display}: the zip archive is truncated (no end of central directory); download it again")
    got = (
        f" (got {content_type.split(';')[0]}, starting {head[:8]!r})"
        if content_type
        else f" (it starts with {head[:8]!r})"
    )
    return CxrError(f"{display} is not a zip archive{got}; check fetch.source")


def open_zip(file: Path | BinaryIO, display: str, content_type: str = "") -> zipfile.ZipFile:
    """zipfile.ZipFile(file), or a CxrError saying whether it is truncated or no zip at all."""
    try:
        return zipfile.ZipFile(file)
    except zipfile.BadZipFile:
        pass
    if isinstance(file, Path):
        with open(file, "rb") as fh:
            head = fh.read(8)
    else:
        file.seek(0)
        head = file.read(8)
    raise not_zip(display, head, content_type)


def check_members(infos: list[zipfile.ZipInfo], display: str) -> None:
    """Refuse zip-slip paths and symbolic links anywhere in the archive."""
    check_names((i.filename for i in infos), display)
    for info in infos:
        if stat.S_ISLNK(info.external_attr >> 16):
            raise CxrError(
                f"{display}: member '{info.filename}' is a symbolic link; "
                "refusing the archive, get it from its original source"
            )


def central_directory_bytes(infos: list[zipfile.ZipInfo]) -> int:
    """Size of the central directory: a 46-byte record plus name, extra and comment per entry."""
    total = 0
    for i in infos:
        name = i.orig_filename.encode("utf-8" if i.flag_bits & 0x800 else "cp437")
        total += 46 + len(name) + len(i.extra) + len(i.comment)
    return total


def member_spans(infos: list[zipfile.ZipInfo], wanted: list[zipfile.ZipInfo], cd_start: int) -> list[tuple[int, int]]:
    """[start, end) of each wanted member's local header + data: up to where the next entry starts."""
    starts = sorted({i.header_offset for i in infos} | {cd_start})
    spans = []
    for info in wanted:
        k = bisect.bisect_right(starts, info.header_offset)
        spans.append((info.header_offset, starts[k] if k < len(starts) else cd_start))
    return spans


def coalesce(spans: list[tuple[int, int]], slack: float = GAP_SLACK) -> list[tuple[int, int]]:
    """Merge neighbouring spans, smallest gaps first, while the gap bytes stay within `slack` of the wanted bytes."""
    spans = sorted(spans)
    if not spans:
        return []
    allowance = slack * sum(e - s for s, e in spans)
    gaps = sorted((max(0, spans[i + 1][0] - spans[i][1]), i) for i in range(len(spans) - 1))
    joined = set()
    for gap, i in gaps:
        if gap > allowance:
            break
        allowance -= gap
        joined.add(i)
    merged = [spans[0]]
    for i in range(1, len(spans)):
        if i - 1 in joined:
            merged[-1] = (merged[-1][0], max(merged[-1][1], spans[i][1]))
        else:
            merged.append(spans[i])
    return merged


def extract_zip(
    zf: zipfile.ZipFile,
    display: str,
    dest: Path,
    cap: int,
    progress: bool,
    plan: Callable[[list[tuple[int, int]]], None] | None = None,
) -> Kept:
    """Check the archive's listing, then write the chest_xray images in archive order; `plan`
    (a ranged reader's) first hears the byte ranges that will be read."""
    infos = zf.infolist()
    if not infos:
        raise CxrError(f"{display}: the archive is empty; check fetch.source")
    check_members(infos, display)
    root = find_root((i.filename for i in infos), display)
    picks, counts = select((i.filename for i in infos), root, display)
    by_name = {i.filename: i for i in infos}
    wanted = sorted((by_name[p.name] for p in picks), key=lambda i: i.header_offset)
    for info in wanted:
        if info.flag_bits & 0x1:
            raise CxrError(f"{display}: member '{info.filename}' is encrypted; use an unencrypted archive")
        if info.compress_type not in METHODS:
            raise CxrError(
                f"{display}: member '{info.filename}' uses compression method {info.compress_type}, which Python's "
                "zipfile cannot read (Deflate64 = 9 comes from Windows Explorer); re-pack it with plain deflate"
            )
    declared = sum(i.file_size for i in wanted)
    if declared > cap:
        raise _cap_error(display, cap, declared)
    if plan is not None:
        plan(coalesce(member_spans(infos, wanted, zf.start_dir)))
    out_of = {p.name: p for p in picks}
    picks = [out_of[i.filename] for i in wanted]  # archive order: ranged reads stream forward

    def opener(pick: Pick) -> BinaryIO:
        try:
            return _Checked(zf.open(by_name[pick.name]), display, pick.name)
        except (zipfile.BadZipFile, NotImplementedError) as exc:  # a local header that does not match
            raise _corrupt(display, pick.name, exc) from None

    rows = _write_all(picks, opener, dest, cap, display, progress)
    return Kept(
        root=root,
        members=len(wanted),
        compressed_bytes=sum(i.compress_size for i in wanted),
        uncompressed_bytes=sum(n for _, _, n in rows),
        files_written=len(rows),
        pruned=len(infos) - len(wanted),
        counts=counts,
        central_directory_bytes=central_directory_bytes(infos),
    )


def _corrupt(display: str, name: str, exc: Exception) -> CxrError:
    return CxrError(f"{display}: member '{name}' is corrupt ({' '.join(str(exc).split())}); download the archive again")


class _Checked(io.RawIOBase):
    """A member being read; corrupt-data errors name the member."""

    def __init__(self, inner: BinaryIO, display: str, name: str) -> None:
        self._inner, self._display, self._name = inner, display, name

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            return self._inner.read(n)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # CRC mismatch, bad deflate data, cut short
            raise _corrupt(self._display, self._name, exc) from None

    def close(self) -> None:
        self._inner.close()
        super().close()
