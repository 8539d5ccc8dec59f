"""The `cxr` command (installed by pyproject.toml; `python -m cxr.serving.cli` does the same).

    cxr predict IMAGE_OR_FOLDER... [--variant NAME | --model FILE] [--format table|json|csv]
                [--gradcam DIR] [--batch-size N] [--strict] [--verbose]
    cxr serve [--variant NAME | --model FILE] [--host 127.0.0.1] [--port 8000] [--max-upload-mb N]
    cxr calibrate IMAGES_DIR_OR_CSV [--variant NAME | --model FILE] [--rule sensitivity:0.97|youden]
                  [--out site.json] [--min-per-class 8]

`predict` prints P(pneumonia), the label at the model's validation threshold and the threshold
for every image (folders are searched recursively; DICOM is read too, see cxr.data.dicom). With
the model's OOD gate beside it (models/<v>.ood.npz, stage ood@<v>) the label is
OUT_OF_DISTRIBUTION for what is not a pediatric frontal chest X-ray and UNCERTAIN (refer to a
radiologist) inside the refer band around the threshold; the OOD score (> 1: out) and the band are
printed too. Exit status: 0 all images predicted, 1 some file (or the model) failed, or with
--strict some image was out of distribution, 2 usage error. Without --model/--variant it uses the
best variant named in metrics/summary.json of the project (the nearest folder upwards holding
dvc.yaml).

`serve` puts the same model and prediction path behind an HTTP service and a page (cxr.serving.serve):
POST /predict answers exactly what `predict` prints for the uploaded file.

`calibrate` sets a site's own threshold on its labelled images (a folder with NORMAL/ and
PNEUMONIA/, or a CSV of path,label) by a declared rule and writes a site file; `predict --site
FILE` and `serve --site FILE` then use that threshold instead of the model's, with the refer band
off (cxr.serving.site). Every answer says where its threshold came from (threshold_source).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr.core.errors import CxrError, run_main
from cxr.core.paths import SUMMARY, model_path

if TYPE_CHECKING:
    import numpy as np

# Folders are searched by name only (no file is opened to look for the DICOM marker); a file
# named on the command line is read whatever its name, so an extension-less DICOM works there.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
FORMATS = ("table", "json", "csv")


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port 1-65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 1-65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description="Pneumonia vs normal in pediatric chest X-rays.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "predict", help="predict P(pneumonia) for images or folders of images", description=__doc__.split("\n\n")[2]
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        type=Path,
        help=f"image file or folder (searched recursively for {', '.join(IMAGE_EXTENSIONS)}; hidden entries skipped)",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--variant", metavar="NAME", help="use models/NAME.keras of the project")
    which.add_argument(
        "--model", metavar="FILE", type=Path, help="use this .keras file (its .json sidecar must sit next to it)"
    )
    p.add_argument("--format", choices=FORMATS, default="table", help="output on stdout (default: table)")
    p.add_argument("--gradcam", metavar="DIR", type=Path, help="also write DIR/<stem>_gradcam.png heatmap overlays")
    p.add_argument(
        "--batch-size", metavar="N", type=positive_int, default=64, help="images per model call (default: 64)"
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when some image is OUT_OF_DISTRIBUTION")
    p.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto", help=RUNTIME_HELP)
    p.add_argument("--site", metavar="FILE", type=Path, help=SITE_HELP)
    p.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    p.set_defaults(run=predict_command, subparser=p)

    s = sub.add_parser(
        "serve", help="serve the model over HTTP: POST /predict and a page at /", description=__doc__.split("\n\n")[3]
    )
    which = s.add_mutually_exclusive_group()
    which.add_argument("--variant", metavar="NAME", help="use models/NAME.keras of the project")
    which.add_argument(
        "--model", metavar="FILE", type=Path, help="use this .keras file (its .json sidecar must sit next to it)"
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=port_number, default=8000, help="TCP port (default 8000)")
    s.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto", help=RUNTIME_HELP)
    s.add_argument(
        "--max-upload-mb",
        metavar="N",
        type=positive_float,
        default=64.0,
        help="refuse uploads over N MiB with 413 (default 64)",
    )
    s.add_argument("--site", metavar="FILE", type=Path, help=SITE_HELP)
    s.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    s.set_defaults(run=serve_command, subparser=s)
    add_calibrate_parser(sub)
    return parser


SITE_HELP = "use the threshold of this site file (cxr calibrate) instead of the model's; the refer band is then off"


def site_rule(text: str) -> str:
    """argparse type: youden or sensitivity:<target in (0, 1]> (cxr.evaluation.site_curve.check_site_rule, not
    imported here: the CLI starts fast)."""
    kind, _, target = text.partition(":")
    try:
        ok = text == "youden" or (kind == "sensitivity" and 0 < float(target) <= 1)
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected youden or sensitivity:<target in (0, 1]>, got {text!r}")
    return text


def add_calibrate_parser(sub: Any) -> None:
    c = sub.add_parser(
        "calibrate",
        help="set a site's own threshold on its labelled images and write a site file",
        description=__doc__.split("\n\n")[4],
    )
    c.add_argument(
        "source",
        metavar="IMAGES_DIR_OR_CSV",
        type=Path,
        help="a folder with NORMAL/ and PNEUMONIA/, or a CSV path,label",
    )
    which = c.add_mutually_exclusive_group()
    which.add_argument("--variant", metavar="NAME", help="use models/NAME.keras of the project")
    which.add_argument(
        "--model", metavar="FILE", type=Path, help="use this .keras file (its .json sidecar must sit next to it)"
    )
    c.add_argument(
        "--rule",
        type=site_rule,
        default="sensitivity:0.97",
        help="sensitivity:<target> (default sensitivity:0.97: the highest threshold reaching it) or youden",
    )
    c.add_argument("--out", metavar="FILE", type=Path, default=Path("site.json"), help="site file (default site.json)")
    c.add_argument(
        "--min-per-class",
        metavar="N",
        type=positive_int,
        default=8,
        help="refuse below N images of a class (default 8)",
    )
    c.add_argument(
        "--batch-size", metavar="N", type=positive_int, default=64, help="images per model call (default: 64)"
    )
    c.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto", help=RUNTIME_HELP)
    c.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    c.set_defaults(run=calibrate_command, subparser=c)


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: the working folder) holding dvc.yaml."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return start


RUNTIME_CHOICES = ("auto", "keras", "litert")  # cxr.serving.inference.RUNTIMES (not imported here: the CLI starts fast)
RUNTIME_HELP = (
    "auto (default): the LiteRT export models/<v>.tflite when present, else Keras; --gradcam always uses Keras"
)


def resolve_model(variant: str | None, model: Path | None, root: Path) -> Path:
    """The .keras file to use: --model, else --variant, else the best variant of the report."""
    if model is not None:
        return model
    if variant is not None:
        return model_path(variant, root)
    summary = root / SUMMARY
    if not summary.is_file():
        raise CxrError(
            f"{summary} not found, so there is no best model to use; "
            "run `dvc repro` (or `dvc pull`) or pass --model FILE / --variant NAME"
        )
    try:
        best = json.loads(summary.read_text()).get("best")
    except (json.JSONDecodeError, AttributeError):
        best = None
    if not isinstance(best, str) or not best:
        raise CxrError(
            f"{summary} names no best variant (key 'best'); rerun "
            "`dvc repro report` or pass --model FILE / --variant NAME"
        )
    return model_path(best, root)


def _visible(path: Path, top: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(top).parts)


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given (even missing ones: they are reported as failed), folders searched
    recursively for image extensions (any case), each folder's files in sorted order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = [
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and _visible(p, path)
            ]
            found.extend(sorted(inside, key=lambda p: p.as_posix()))
        else:
            found.append(path)
    unique = dict.fromkeys(found)  # a file named twice (or inside a named folder) once, first place kept
    return list(unique)


def gradcam_names(paths: list[Path]) -> list[str]:
    """`<stem>_gradcam.png` per path; repeated stems get `-2`, `-3`, ... so none overwrites another."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        n = seen.get(p.stem, 0) + 1
        seen[p.stem] = n
        names.append(f"{p.stem}_gradcam.png" if n == 1 else f"{p.stem}-{n}_gradcam.png")
    return names


def gradcam_writer(
    paths: list[Path], out_dir: Path, cam: Any
) -> tuple[Callable[[int, np.ndarray], None], dict[int, str]]:
    """An `on_image` callback for `predict_files` writing one overlay per decoded image, and the
    {index: overlay path} it fills."""
    from cxr.evaluation.gradcam import overlay, write_overlay

    names, written = gradcam_names(paths), {}

    def write(i: int, img: np.ndarray) -> None:
        target = out_dir / names[i]
        write_overlay(target, overlay(img, cam(img)))
        written[i] = str(target)

    return write, written


TABLE = (  # header → answer field (cxr.serving.present): the texts a person reads, as on the page
    ("path", "path"),
    ("probability", "shown_probability"),
    ("label", "label"),
    ("threshold", "shown_threshold"),
    ("ood", "ood_level"),
    ("reason", "reason"),
)


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per answer: the presentation's texts (cxr.serving.present.answer), the reason last."""
    cells = [[r["label"] or "ERROR" if key == "label" else str(r[key]) for _, key in TABLE] for r in rows]
    widths = [max([len(head)] + [len(c[i]) for c in cells]) for i, (head, _) in enumerate(TABLE)]
    # a site threshold is named once, above the table (JSON and CSV carry it per row)
    sources = sorted({r.get("threshold_source", "validation") for r in rows} - {"validation"})
    lines = [f"threshold_source: {s}" for s in sources]
    for line in [[head for head, _ in TABLE], *cells]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1])
    return "\n".join(lines) + "\n"


def format_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2) + "\n"


def format_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["path"], lineterminator="\n")
    writer.writeheader()
    # repr keeps every digit, so the CSV parses back to the very float computed
    writer.writerows(
        {k: (repr(v) if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()} for r in rows
    )
    return buf.getvalue()


FORMATTERS = {"table": format_table, "json": format_json, "csv": format_csv}


def predict_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cxr.serving.inference import load_model, predict_files
    from cxr.serving.present import answers

    paths = collect_images(args.paths)
    if not paths:
        parser.error(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(map(str, args.paths))}")
    # Grad-CAM needs the Keras graph's gradients; predictions then come from Keras too (same to 1e-4)
    loaded = load_model(
        resolve_model(args.variant, args.model, project_root()),
        runtime="keras" if args.gradcam is not None else args.runtime,
    )
    if args.site is not None:
        from cxr.serving.site import apply_site

        loaded, cal = apply_site(loaded, args.site)
        print(
            f"note: threshold {cal.threshold:.4f} from site file {args.site} ({cal.rule}, "
            f"{cal.n_normal}+{cal.n_pneumonia} images); refer band off",
            file=sys.stderr,
        )
    if loaded.gate is None:
        print(
            f"note: no OOD gate beside {loaded.path} (models/<v>.ood.npz): no OUT_OF_DISTRIBUTION or UNCERTAIN labels; "
            f"run `dvc repro ood@{loaded.path.stem}` to fit them",
            file=sys.stderr,
        )
    on_image, overlays = None, {}
    if args.gradcam is not None:
        from cxr.evaluation.gradcam import GradCam

        # GradCam fails now, before any work, for a model without convolutions
        on_image, overlays = gradcam_writer(paths, args.gradcam, GradCam(loaded.model))
    rows = answers(predict_files(paths, loaded, args.batch_size, on_image), loaded)
    if on_image is not None:
        for i, row in enumerate(rows):
            row["gradcam"] = overlays.get(i)
            if row["gradcam"] is not None and not row["finding"]:  # out of distribution: no overlay as evidence
                Path(row["gradcam"]).unlink(missing_ok=True)
                row["gradcam"] = None
        kept = sum(r["gradcam"] is not None for r in rows)
        print(f"wrote {kept} Grad-CAM overlay(s) to {args.gradcam}", file=sys.stderr)
    sys.stdout.write(FORMATTERS[args.format](rows))
    sys.stdout.flush()
    failed = sum(r["error"] is not None for r in rows)
    outside = sum(bool(r.get("ood")) for r in rows)
    # the OOD note first: a failure's one `error:` line is always the last line
    if outside:
        print(
            f"{'error' if args.strict and not failed else 'warning'}: {outside} of {len(rows)} "
            "image(s) are not pediatric frontal chest X-rays (OUT_OF_DISTRIBUTION)",
            file=sys.stderr,
        )
    if failed:
        print(f"error: {failed} of {len(rows)} file(s) could not be predicted (see the error column)", file=sys.stderr)
    return 1 if failed or (args.strict and outside) else 0


def serve_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cxr.serving.serve import serve

    serve(
        resolve_model(args.variant, args.model, project_root()),
        args.host,
        args.port,
        args.max_upload_mb,
        args.runtime,
        site=args.site,
    )
    return 0


def calibrate_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cxr.serving.inference import load_model
    from cxr.serving.site import calibrate, check_counts, check_out, read_labelled, summary, write_site

    model = resolve_model(args.variant, args.model, project_root())
    check_out(args.out, model)  # refusals first, before the model loads
    items = read_labelled(args.source, lambda folder: collect_images([folder]))
    check_counts(items, args.min_per_class, args.source)
    loaded = load_model(model, runtime=args.runtime)
    cal, _ = calibrate(items, loaded, args.rule, args.min_per_class, args.source, batch_size=args.batch_size)
    write_site(cal, args.out, model)
    sys.stdout.write(summary(cal))
    print(
        f"wrote {args.out}: use it with `cxr predict --site {args.out}` or `cxr serve --site {args.out}`",
        file=sys.stderr,
    )
    return 0


def cli(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the subcommand; returns the exit status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's info lines are noise here
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args, args.subparser)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `cxr` command: user errors become one line, see cxr.core.errors."""
    run_main(lambda: cli(argv), argv)


if __name__ == "__main__":
    main()
