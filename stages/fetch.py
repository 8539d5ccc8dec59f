"""Stage `fetch`: download (or copy) the chest X-ray data, keeping only chest_xray's images.

    python stages/fetch.py        # (dvc repro fetch) params.yaml fetch.* → data/raw

Over HTTP only the chest_xray members are downloaded when the server honours Range requests;
data/raw appears atomically with chest_xray/{train,test}/{NORMAL,PNEUMONIA}/ and sha256.csv.
"""

from __future__ import annotations

from cxr.core import params as cxr_params
from cxr.core import paths
from cxr.core.errors import run_main
from cxr.core.stage import stage_args
from cxr.data.fetch import MB, fetch


def main() -> int:
    stage_args(__doc__)
    settings = cxr_params.load().fetch
    report = fetch(
        settings.source,
        paths.RAW,
        max_uncompressed_bytes=int(settings.max_uncompressed_mb * MB),
        timeout_s=float(settings.timeout_s),
    )
    print(report.summary())
    return 0


if __name__ == "__main__":
    run_main(main)
