"""Stage `split`: the manifest of usable images with train/val/test and cross-validation folds, and the data audit.

python stages/split.py        # (dvc repro split) data/raw → data/split/{manifest.csv,audit.json}
"""

from __future__ import annotations

from multiprocessing import Pool

import pandas as pd
from tqdm import tqdm

from cxr.core import params as cxr_params
from cxr.core import paths
from cxr.core.constants import SPLITS
from cxr.core.errors import run_main
from cxr.core.io import atomic_file, write_json
from cxr.core.provenance import sha256_file
from cxr.core.stage import stage_args
from cxr.data import dataset
from cxr.data.images import DRAFT_MIN_SIDE, open_image
from cxr.data.pixels import ImageError


def check_image(path: str) -> str | None:
    """None if the image decodes (as preprocess will decode it), else the reason."""
    try:
        open_image(path, draft_size=DRAFT_MIN_SIDE)
        return None
    except ImageError as exc:
        return str(exc)


def sha256s(rows: pd.DataFrame) -> list[str]:
    """Hashes recorded by fetch (data/raw/sha256.csv), computed for files it did not list."""
    known: dict[str, str] = {}
    if paths.RAW_HASHES.exists():
        table = pd.read_csv(paths.RAW_HASHES, dtype=str)
        known = {(paths.RAW / p).as_posix(): h for p, h in zip(table["path"], table["sha256"])}
    return [known.get(p) or sha256_file(p) for p in rows["path"]]


def main() -> int:
    stage_args(__doc__)
    params = cxr_params.load()
    images = dataset.scan(paths.RAW_IMAGES)
    images["sha256"] = sha256s(images)
    with Pool(params.preprocess.workers) as pool:
        reasons = list(
            tqdm(pool.imap(check_image, images["path"], chunksize=32), total=len(images), desc="verify", unit="img")
        )
    images["reason"] = reasons
    bad = images[images["reason"].notna()]
    usable = images[images["reason"].isna()]

    manifest, removed = dataset.make_manifest(
        usable, params.split.strategy, params.split.val_fraction, params.seed, params.split.folds
    )
    dataset.check_manifest(manifest)
    audit = {
        "strategy": params.split.strategy,
        "val_fraction": params.split.val_fraction if params.split.strategy == "patient_grouped" else None,
        "seed": params.seed,
        "counts": dataset.counts(manifest),
        "folds": params.split.folds,
        "fold_counts": dataset.counts(manifest[manifest["fold"] != dataset.NO_FOLD], by="fold"),
        "patients": dataset.guarantees(manifest, params.split.strategy),
        "images_found": len(images),
        "excluded": [{"path": p, "reason": r} for p, r in zip(bad["path"], bad["reason"])],
        "unparsed_names": int((~images["parsed"]).sum()),
        "duplicates": dataset.duplicate_audit(usable),
        **removed,
    }
    with atomic_file(paths.MANIFEST) as fh:
        manifest.to_csv(fh, index=False)
    write_json(paths.AUDIT, audit)
    c = audit["counts"]
    print(
        f"split ({params.split.strategy}): "
        + ", ".join(f"{s} {c[s]['images']} ({c[s]['patients']} patients)" for s in SPLITS)
        + f"; {params.split.folds or 'no'} folds; excluded {len(bad)}; duplicate groups {audit['duplicates']['groups']}"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
