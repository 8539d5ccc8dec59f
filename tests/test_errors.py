"""The error matrix: each failure a user can meet, run end to end through the stage scripts and the
`cxr` command as subprocesses, ends the same way (docs/errors.md lists the messages):

- a non-zero exit status, and as the last stderr line `error: ...` naming the file, URL or
  parameter and what to do;
- no Python traceback (unless --verbose or CXR_DEBUG=1);
- no partial output where DVC would cache it, and nothing the user had is changed.

    .venv/bin/pytest -q tests/test_errors.py          # -m "not slow" skips the cases that need tiny_pipeline

The same failures are checked at unit level in test_fetch.py, test_images.py, test_params.py,
test_inference.py and test_cli.py; here it is the promise a user sees on the command line.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import marshal
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cxr.core.constants import CLASSES, OUT_OF_DISTRIBUTION, UNCERTAIN
from test_fetch import BAD
from testkit.httpserver import LoopbackServer
from testkit.synth import Counts, jpeg_bytes, make_xray, write_tree

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20
TIMEOUT = 300  # a guard against a hang (e.g. a stage blocked on a tripwire), never a speed check
DELETE = object()


# ---------------------------------------------------------------- running commands


def command(script: str, *args: str) -> list[str]:
    """`python stages/<script>.py ARGS`, or the `cxr` command for script "cxr"."""
    if script == "cxr":
        return [sys.executable, "-m", "cxr.serving.cli", *args]
    return [sys.executable, str(ROOT / "stages" / f"{script}.py"), *args]


def script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CXR_DEBUG"}
    return {**env, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def run_all(
    jobs: dict[str, tuple[Path, list[str], dict[str, str]]], parallel: int = 4
) -> dict[str, subprocess.CompletedProcess]:
    """Run independent commands (cwd, argv, env) a few at a time; results by job name."""

    def one(job: tuple[Path, list[str], dict[str, str]]) -> subprocess.CompletedProcess:
        cwd, argv, env = job
        return subprocess.run(argv, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)

    with ThreadPoolExecutor(parallel) as pool:
        return dict(zip(jobs, pool.map(one, jobs.values())))


def assert_fails_cleanly(done: subprocess.CompletedProcess, *expected: str, stdout: bool = False) -> str:
    """The rule: exit ≠ 0, the last stderr line is `error: ...` holding every `expected` text
    (a str, or a regex given as re.Pattern), and no traceback. Returns that line."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode not in (0, None), done.stdout[-1000:] + done.stderr[-2000:]
    assert lines and lines[-1].startswith("error: "), done.stderr[-3000:]
    last = lines[-1]
    for text in expected:
        found = text.search(last) if isinstance(text, re.Pattern) else text in last
        assert found, f"{text!r} not in {last!r}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    if not stdout:
        assert done.stdout.strip() == "", done.stdout[-1000:]
    return last


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: a file's sha256 and mtime, 'dir', or 'fifo' (never opened)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = path.relative_to(root).as_posix()
        if stat.S_ISFIFO(st.st_mode):
            out[rel] = "fifo"
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = "dir"
        else:
            out[rel] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {st.st_mtime_ns}"
    return out


def assert_unchanged(before: dict[str, str], root: Path) -> None:
    """Nothing changed or removed under root; at most empty folders appeared (the parent of an
    output, made before the failure: never cached by DVC and holding nothing)."""
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before
    added = sorted(set(after) - set(before))
    assert all(after[k] == "dir" for k in added) and not [
        k for k in added if any(other.startswith(k + "/") for other in added)
    ], added


def tripwire(path: Path) -> None:
    """A named pipe where a data file belongs: a stage that opened it would block there (and the
    test fail on its timeout) instead of failing fast on a bad parameter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)


def write_params(folder: Path, edit: Callable[[dict], None] | None = None) -> None:
    """The repository's params.yaml, shrunk (one small size, no ImageNet), then `edit(params)`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["transfer"]["weights"] = "none"
    for v in params["variants"].values():
        v.update(image_size=48, epochs=1, batch_size=4)
    if edit is not None:
        edit(params)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def set_key(dotted: str, value: object) -> Callable[[dict], None]:
    """A params edit: set (or, with DELETE, remove) the key `dotted` (e.g. "split.val_fraction")."""

    def edit(params: dict) -> None:
        *parents, last = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value

    return edit


# ---------------------------------------------------------------- archives → stages/fetch.py

# Which archives of test_fetch.py (where fetch() refuses them in-process) go through the stage
# here, and what the one line must say beyond the archive's path: why, and what to do.
ARCHIVES = {
    "html-file": ("is not a zip archive", "check fetch.source"),
    "truncated": ("the zip archive is truncated", "download it again"),
    "empty": ("the archive is empty", "check fetch.source"),
    "no-chest": ("no 'chest_xray' folder", "point fetch.source at"),
    "missing-class": ("CellData/chest_xray/test/NORMAL/ is missing", "fetch it again"),
    "no-test-folder": ("has no test/ folder", "fetch it again"),
    "dotdot": ("'../evil.jpeg' has an absolute or '..' path", "get it from its original source"),
    "dotdot-inside": ("'..' path (zip-slip)", "get it from its original source"),
    "absolute": ("'/tmp/evil.jpeg' has an absolute or '..' path", "get it from its original source"),
    "symlink": ("link.jpeg' is a symbolic link", "get it from its original source"),
    "bomb-declared": ("over fetch.max_uncompressed_mb", "raise the limit if the archive is genuine"),
    "bomb-lying-header": ("bomb.jpeg' is corrupt", "download the archive again"),
    "corrupt-member": ("img-1.jpeg' is corrupt", "download the archive again"),
}
TEXT_FILE = b"chest x-ray data: see https://data.mendeley.com/datasets/rscbjbr9sj\n"


@pytest.fixture(scope="module")
def fetch_runs(tmp_path_factory) -> dict[str, tuple[Path, dict, str, subprocess.CompletedProcess]]:
    """Every archive case through `python stages/fetch.py`, in a project that already holds a
    previous data/raw; name → (project, snapshot before, source, result)."""
    base = tmp_path_factory.mktemp("fetch")
    sources: dict[str, tuple[str | bytes, int, dict[str, str]]] = {
        name: (BAD[name][0], BAD[name][2], {}) for name in ARCHIVES
    }
    sources["text-file"] = (TEXT_FILE, 64 * MB, {})
    sources["debug"] = (BAD["truncated"][0], 64 * MB, {"CXR_DEBUG": "1"})
    with LoopbackServer(b"unused", status=404) as missing, LoopbackServer(b"unused", html=True) as login:
        sources["http-404"] = (missing.url, 64 * MB, {})
        sources["http-html"] = (login.url, 64 * MB, {})
        jobs, state = {}, {}
        for name, (payload, cap, env) in sources.items():
            project = base / name
            if isinstance(payload, bytes):
                source = project / "downloads" / "archive.zip"
                source.parent.mkdir(parents=True)
                source.write_bytes(payload)
                source = str(source)
            else:
                source = payload

            def edit(params: dict, source: str = source, cap: int = cap) -> None:
                params["fetch"].update(source=source, max_uncompressed_mb=cap / MB, timeout_s=10)

            write_params(project, edit)
            (project / "data" / "raw" / "chest_xray").mkdir(parents=True)
            (project / "data" / "raw" / "chest_xray" / "keep.jpeg").write_bytes(b"the previous fetch")
            state[name] = (project, snapshot(project), source)
            jobs[name] = (project, command("fetch"), script_env(**env))
        results = run_all(jobs)
    return {name: (*state[name], results[name]) for name in jobs}


@pytest.mark.parametrize("case", sorted(ARCHIVES) + ["text-file"])
def test_bad_archive_is_one_line_and_keeps_the_previous_data(case, fetch_runs):
    project, before, source, done = fetch_runs[case]
    why, todo = ARCHIVES.get(case, ("is not a zip archive", "check fetch.source"))
    assert_fails_cleanly(done, f"error: {source}", why, todo)
    assert_unchanged(before, project)  # data/raw as it was, no temporary folder left in data/


@pytest.mark.parametrize(
    "case, why",
    [("http-404", "HTTP 404 Not Found; check fetch.source"), ("http-html", "is not a zip archive (got text/html")],
)
def test_http_failure_names_the_url(case, why, fetch_runs):
    project, before, url, done = fetch_runs[case]
    assert url.startswith("http://127.0.0.1:")
    assert_fails_cleanly(done, url, why)
    assert_unchanged(before, project)


def test_cxr_debug_shows_the_traceback_and_still_ends_with_the_line(fetch_runs):
    project, before, source, done = fetch_runs["debug"]
    assert done.returncode == 1 and "Traceback" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {source}: the zip archive is truncated")
    assert_unchanged(before, project)


# ---------------------------------------------------------------- params → the stage that reads them


def cache_split(n: int, size: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """A preprocessed split of n random images, half of each class (for `cxr.data.cache.write_split`)."""
    rng = np.random.default_rng(seed)
    labels = ["NORMAL", "PNEUMONIA"] * (n // 2)
    rows = pd.DataFrame(
        {
            "path": [f"data/raw/chest_xray/train/{lab}/im{seed}-{i}.jpeg" for i, lab in enumerate(labels)],
            "label": labels,
            "subtype": ["normal" if lab == "NORMAL" else "bacteria" for lab in labels],
            "patient_id": [f"p{seed}-{i}" for i in range(n)],
            "split": "train",
            "sha256": [f"{seed:02d}{i:062d}" for i in range(n)],
        }
    )
    return rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8), rows


def params_project(folder: Path, edit: Callable[[dict], None] | str | None, tripwires: bool) -> Path:
    """params.yaml (edited), a raw tree for split, a 48 px cache for train; with `tripwires` the
    first data file each stage opens is a named pipe."""
    from cxr.data.cache import write_split

    if not isinstance(edit, str):
        write_params(folder, edit)
    else:
        folder.mkdir(parents=True)
        (folder / "params.yaml").write_text(edit)
    write_tree(
        folder / "data" / "raw" / "chest_xray", {"train": Counts(2, 2, 1, 1), "test": Counts(1, 1, 1, 1)}, size=(40, 36)
    )
    for split, n in (("train", 8), ("val", 6), ("test", 6)):
        write_split(folder / "data" / "processed" / "48", split, *cache_split(n, 48, seed=len(split)))
    if tripwires:
        (folder / "data" / "processed" / "48" / "train.npy").unlink()
        tripwire(folder / "data" / "processed" / "48" / "train.npy")
        tripwire(folder / "data" / "raw" / "sha256.csv")  # split reads it first
    return folder


PARAM_CASES = {
    # case: (stage and arguments, params edit, texts of the error line)
    "unknown-variant": (
        ["train", "nope"],
        None,
        ["unknown variant 'nope' in params.yaml variants", "known: cnn_augmented, cnn_baseline"],
    ),
    "unknown-backbone": (
        ["train", "transfer_frozen"],
        set_key("transfer.backbone", "alexnet"),
        ["params.yaml transfer.backbone: 'alexnet' is not one of vgg19, vgg16, mobilenet_v2"],
    ),
    "zero-epochs": (
        ["train", "cnn_baseline"],
        set_key("variants.cnn_baseline.epochs", 0),
        ["params.yaml variants.cnn_baseline.epochs: must be a positive integer, got 0"],
    ),
    "negative-epochs": (
        ["train", "cnn_baseline"],
        set_key("variants.cnn_baseline.epochs", -3),
        ["params.yaml variants.cnn_baseline.epochs: must be a positive integer, got -3"],
    ),
    "val-fraction-0": (
        ["split"],
        set_key("split.val_fraction", 0),
        ["params.yaml split.val_fraction: must be between 0 and 1 (exclusive), got 0"],
    ),
    "val-fraction-1": (
        ["split"],
        set_key("split.val_fraction", 1.0),
        ["params.yaml split.val_fraction: must be between 0 and 1 (exclusive), got 1.0"],
    ),
    "val-fraction-negative": (
        ["split"],
        set_key("split.val_fraction", -0.2),
        ["params.yaml split.val_fraction", "got -0.2"],
    ),
    "one-fold": (
        ["split"],
        set_key("split.folds", 1),
        ["params.yaml split.folds: must be 0 (no folds) or an integer of at least 2, got 1"],
    ),
    "image-size-backbone-refuses": (
        ["train", "transfer_frozen"],
        set_key("variants.transfer_frozen.image_size", 16),
        [
            "params.yaml variants.transfer_frozen.image_size: 16 px "
            "is too small for backbone mobilenet_v2; use at least 32"
        ],
    ),
    "missing-train-section": (
        ["train", "cnn_baseline"],
        set_key("train", DELETE),
        ["params.yaml has no 'train' section; add it"],
    ),
    "missing-split-section": (["split"], set_key("split", DELETE), ["params.yaml has no 'split' section; add it"]),
    "unknown-key": (
        ["train", "cnn_baseline"],
        set_key("variants.cnn_baseline.epoch", 3),
        ["params.yaml variants.cnn_baseline: unknown key(s) epoch"],
    ),
    "not-yaml": (["fetch"], "base: {seed: 42\nfetch: [", [re.compile(r"params\.yaml is not valid YAML: .*line \d+")]),
    # Needs the training set's size, so the cache is read (no tripwire), but nothing is written.
    "batch-larger-than-train": (
        ["train", "cnn_baseline"],
        set_key("variants.cnn_baseline.batch_size", 64),
        ["params.yaml variants.cnn_baseline.batch_size: 64 is larger than the training set (8 images); lower it"],
    ),
}


@pytest.fixture(scope="module")
def param_runs(tmp_path_factory) -> dict[str, tuple[Path, dict, subprocess.CompletedProcess]]:
    base = tmp_path_factory.mktemp("params")
    jobs, state = {}, {}
    for name, (argv, edit, _) in PARAM_CASES.items():
        project = params_project(base / name, edit, tripwires=name != "batch-larger-than-train")
        state[name] = (project, snapshot(project))
        jobs[name] = (project, command(*argv), script_env())
    results = run_all(jobs)
    return {name: (*state[name], results[name]) for name in jobs}


@pytest.mark.parametrize("case", sorted(PARAM_CASES))
def test_bad_param_stops_before_any_work(case, param_runs):
    """Params are validated first: the tripwire data files are never opened (a stage that read
    data first would hang on them), nothing is written, and the line names the key."""
    project, before, done = param_runs[case]
    assert_fails_cleanly(done, *PARAM_CASES[case][2])
    assert_unchanged(before, project)
    for output in ("models", "metrics", "plots", "data/split"):
        assert not (project / output).exists()


# ---------------------------------------------------------------- images → split, preprocess, cxr predict


def write_image_cases(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Unusable files and odd but good ones under folder/train (case → path, for each), named like
    the real data so that they would be kept if not refused (IMAGE_REASONS: why each is not)."""
    n, p = folder / "train" / "NORMAL", folder / "train" / "PNEUMONIA"
    n.mkdir(parents=True, exist_ok=True)
    p.mkdir(parents=True, exist_ok=True)
    bad = {
        "truncated": n / "IM-0901-0001.jpeg",
        "zero-byte": n / "IM-0902-0001.jpeg",
        "not-an-image": n / "IM-0903-0001.jpeg",
        "over-pixel-limit": p / "person901_bacteria_1.png",
        "one-pixel": p / "person902_bacteria_1.jpeg",
    }
    whole = jpeg_bytes(make_xray("NORMAL", 5, (300, 280)))
    bad["truncated"].write_bytes(whole[: len(whole) // 2])
    bad["zero-byte"].write_bytes(b"")
    bad["not-an-image"].write_bytes(b"<html><body>404 Not Found</body></html>\n")
    Image.new("L", (8000, 6400)).save(bad["over-pixel-limit"])  # 51.2 MP, over cxr.data.pixels.MAX_PIXELS
    Image.new("L", (1, 1)).save(bad["one-pixel"], format="JPEG")
    good = {"cmyk": n / "IM-0904-0001.jpeg", "16-bit": n / "IM-0905-0001.png", "palette": p / "person903_virus_1.png"}
    picture = make_xray("PNEUMONIA", 7, (80, 72))
    picture.convert("CMYK").save(good["cmyk"], format="JPEG", quality=95)
    wide = np.asarray(picture).astype(np.uint16) * 257 + 3  # not a plain 8-bit copy: the low byte varies
    Image.fromarray(wide).save(good["16-bit"])
    assert Image.open(good["16-bit"]).mode.startswith("I")
    picture.convert("P").save(good["palette"])
    return bad, good


IMAGE_REASONS = {
    "truncated": "cannot decode image (image file is truncated",
    "zero-byte": "cannot decode image (empty file)",
    "not-an-image": "cannot decode image (cannot identify image file",
    "over-pixel-limit": "8000x6400 is over 50,000,000 pixels; downscale it first",
    "one-pixel": "1x1 is too small to be an X-ray",
}


@pytest.fixture(scope="module")
def image_project(tmp_path_factory) -> dict:
    """A raw tree with the bad and odd images, through `stages/split.py` then `stages/preprocess.py`."""
    project = tmp_path_factory.mktemp("images")
    raw = project / "data" / "raw" / "chest_xray"
    write_tree(raw, {"train": Counts(normal=4, bacteria=4, virus=2), "test": Counts(normal=2, bacteria=2, virus=1)})
    bad, good = write_image_cases(raw)

    def edit(params: dict) -> None:
        params["split"]["val_fraction"] = 0.3
        params["variants"] = {"cnn_baseline": params["variants"]["cnn_baseline"]}
        params["cv"] = {"variants": [], "folds": []}  # no k-fold ensemble of a variant left out

    write_params(project, edit)
    split = subprocess.run(
        command("split"), check=False, cwd=project, env=script_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert split.returncode == 0, split.stderr[-2000:]
    before = snapshot(project)
    pre = subprocess.run(
        command("preprocess"),
        check=False,
        cwd=project,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert pre.returncode == 0, pre.stderr[-2000:]

    def rel(path: Path) -> str:
        return path.relative_to(project).as_posix()

    return {
        "project": project,
        "bad": {k: rel(v) for k, v in bad.items()},
        "good": {k: rel(v) for k, v in good.items()},
        "split": split,
        "before_preprocess": before,
    }


def test_split_lists_every_unusable_image_with_its_reason(image_project):
    audit = json.loads((image_project["project"] / "data" / "split" / "audit.json").read_text())
    excluded = {e["path"]: e["reason"] for e in audit["excluded"]}
    assert set(excluded) == set(image_project["bad"].values())
    for case, path in image_project["bad"].items():
        assert excluded[path].startswith(f"{path}: ") and IMAGE_REASONS[case] in excluded[path], excluded[path]
    assert f"excluded {len(excluded)}" in image_project["split"].stdout


def test_no_image_is_silently_kept_or_dropped(image_project):
    project = image_project["project"]
    audit = json.loads((project / "data" / "split" / "audit.json").read_text())
    manifest = pd.read_csv(project / "data" / "split" / "manifest.csv", dtype=str)
    on_disk = {
        p.relative_to(project).as_posix() for p in (project / "data" / "raw" / "chest_xray").rglob("*") if p.is_file()
    }
    listed = (
        set(manifest["path"])
        | {e["path"] for e in audit["excluded"]}
        | set(audit["removed_from_train_as_test_duplicates"])
    )
    assert listed == on_disk and audit["images_found"] == len(on_disk)
    assert not set(manifest["path"]) & set(image_project["bad"].values())


def test_odd_but_good_formats_are_kept_and_cached(image_project):
    project = image_project["project"]
    from cxr.data.cache import load_split
    from cxr.data.images import load_resized

    manifest = pd.read_csv(project / "data" / "split" / "manifest.csv", dtype=str)
    assert set(image_project["good"].values()) <= set(manifest["path"])
    cached = {}
    for split in ("train", "val", "test"):
        part = load_split(project / "data" / "processed" / "48", split)
        cached.update({p: part.x[i] for i, p in enumerate(part.rows["path"])})
    for case, path in image_project["good"].items():
        assert cached[path].std() > 10, case  # a real picture, not a blank
        assert np.array_equal(cached[path], load_resized(project / path, [48])[48]), case
    # one picture in three containers: the same image each time (16-bit is stretched, CMYK lossy)
    pixels = np.stack([cached[image_project["good"][k]].ravel().astype(float) for k in ("cmyk", "16-bit", "palette")])
    assert np.corrcoef(pixels).min() > 0.95


def test_image_spoiled_after_split_stops_preprocess_naming_it(image_project, tmp_path):
    """If a listed image goes bad later (disk error, a hand edit), preprocess refuses, names it,
    and the previous cache stays."""
    project = tmp_path / "p"
    shutil.copytree(image_project["project"], project)
    before = snapshot(project)
    victim = image_project["good"]["cmyk"]
    data = (project / victim).read_bytes()
    (project / victim).write_bytes(data[: len(data) // 3])
    before[victim] = snapshot(project)[victim]
    done = subprocess.run(
        command("preprocess"),
        check=False,
        cwd=project,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert_fails_cleanly(done, f"error: {victim}: cannot decode image")
    assert_unchanged(before, project)


# ---------------------------------------------------------------- models (tiny_pipeline) → evaluate, cxr predict


def walk(node):
    """Every dict in a JSON tree."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def config_of(model: Path) -> dict:
    with zipfile.ZipFile(model) as zf:
        return json.loads(zf.read("config.json"))


@pytest.mark.slow
def test_saved_models_hold_no_code(tiny_pipeline):
    """Every variant's .keras file is config + weights only: no Lambda layer, no serialized Python
    function, so `safe_mode=True` loading (cxr.serving.inference) refuses nothing genuine."""
    variants = yaml.safe_load((tiny_pipeline.origin / "params.yaml").read_text())["variants"]
    for name in variants:
        path = tiny_pipeline.origin / "models" / f"{name}.keras"
        with zipfile.ZipFile(path) as zf:
            assert sorted(zf.namelist()) == ["config.json", "metadata.json", "model.weights.h5"], name
        text = json.dumps(config_of(path))
        assert '"Lambda"' not in text and "__lambda__" not in text and '"function"' not in text, name
        classes = {d.get("class_name") for d in walk(config_of(path))}
        assert classes and not classes & {"Lambda", "__lambda__", "function", "TFOpLambda"}, name
        modules = {d["module"].split(".")[0] for d in walk(config_of(path)) if isinstance(d.get("module"), str)}
        assert modules <= {"keras"}, (name, modules)


def rescaled_variant(origin: Path) -> str:
    """The smallest variant whose model has a Rescaling layer (the one the Lambda tamper replaces)."""
    variants = yaml.safe_load((origin / "params.yaml").read_text())["variants"]
    for name in sorted(variants, key=lambda v: (origin / "models" / f"{v}.keras").stat().st_size):
        if any(d.get("class_name") == "Rescaling" for d in walk(config_of(origin / "models" / f"{name}.keras"))):
            return name
    pytest.fail("no variant with a Rescaling layer")


def rewrite_config(src: Path, dest: Path, change) -> None:
    """Copy a .keras archive with its config.json edited by `change(config)` (a valid zip, CRCs right)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for item in zin.infolist():
            content = zin.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(content)
                change(config)
                content = json.dumps(config).encode()
            zout.writestr(item, content)


def tamper(kind: str, src: Path, dest: Path, canary: Path) -> None:
    """flip: 16 bytes inverted inside the weights; lambda: the Rescaling layer swapped for a Lambda
    whose code writes `canary`; foreign: an activation pointing at subprocess.getoutput."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if kind == "flip":
        data = bytearray(src.read_bytes())
        with zipfile.ZipFile(src) as zf:
            info = zf.getinfo("model.weights.h5")
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)  # the local header's
        middle = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
        data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
        dest.write_bytes(bytes(data))
        return
    if kind == "lambda":
        code = eval(f"lambda x: (open({str(canary)!r}, 'w').write('ran'), x)[1]").__code__  # the payload
        function = {
            "class_name": "__lambda__",
            "config": {
                "code": codecs.encode(marshal.dumps(code), "base64").decode("ascii"),
                "defaults": None,
                "closure": None,
            },
        }

        def change(config: dict) -> None:
            layer = next(d for d in walk(config) if d.get("class_name") == "Rescaling")
            old = layer["config"]
            layer.update(class_name="Lambda", module="keras.layers", registered_name=None)
            layer["config"] = {
                "name": old["name"],
                "trainable": True,
                "dtype": old.get("dtype"),
                "function": function,
                "arguments": {},
            }
    else:

        def change(config: dict) -> None:
            layer = next(
                d
                for d in walk(config)
                if isinstance(d.get("config"), dict) and d["config"].get("activation") == "sigmoid"
            )
            layer["config"]["activation"] = {
                "module": "subprocess",
                "class_name": "function",
                "config": "getoutput",
                "registered_name": "function",
            }

    rewrite_config(src, dest, change)


TAMPERS = ("flip", "lambda", "foreign")


@pytest.fixture(scope="module")
def model_runs(tiny_pipeline, tmp_path_factory) -> dict:
    """Tampered copies of a trained model through `stages/evaluate.py` and `cxr predict --model`,
    and the genuine model through `cxr predict` on a folder of good and bad images, all at once."""
    origin = tiny_pipeline.origin
    variant = rescaled_variant(origin)
    meta = json.loads((origin / "models" / f"{variant}.json").read_text())
    base = tmp_path_factory.mktemp("models")
    sample = next((origin / "data" / "raw" / "chest_xray" / "test" / "NORMAL").iterdir())
    jobs, state = {}, {}
    for kind in TAMPERS:
        project = base / kind
        canary = project / "canary.txt"
        (project / "models").mkdir(parents=True)
        shutil.copy(origin / "params.yaml", project / "params.yaml")
        shutil.copy(origin / "models" / f"{variant}.json", project / "models" / f"{variant}.json")
        tamper(kind, origin / "models" / f"{variant}.keras", project / "models" / f"{variant}.keras", canary)
        for rel in (f"metrics/{variant}.json", f"plots/{variant}", f"data/processed/{meta['image_size']}"):
            copier = shutil.copytree if (origin / rel).is_dir() else shutil.copy
            (project / rel).parent.mkdir(parents=True, exist_ok=True)
            copier(origin / rel, project / rel)
        state[kind] = (project, snapshot(project), canary)
        if kind != "foreign":  # the same load_model: once through cxr predict is enough
            jobs[f"evaluate-{kind}"] = (project, command("evaluate", variant), script_env())
        jobs[f"predict-{kind}"] = (
            project,
            command("cxr", "predict", str(sample), "--model", f"models/{variant}.keras"),
            script_env(),
        )
    images = base / "images"
    bad, good = write_image_cases(images)
    shutil.copy(sample, images / "plain.jpeg")
    good["plain"] = images / "plain.jpeg"
    jobs["predict-images"] = (
        base,
        command(
            "cxr", "predict", str(images), "--model", str(origin / "models" / f"{variant}.keras"), "--format", "json"
        ),
        script_env(),
    )
    results = run_all(jobs, parallel=3)
    return {"variant": variant, "state": state, "results": results, "bad": bad, "good": good}


@pytest.mark.slow
@pytest.mark.parametrize(
    "entry, kind",
    [("evaluate", "flip"), ("evaluate", "lambda"), ("predict", "flip"), ("predict", "lambda"), ("predict", "foreign")],
)
def test_tampered_model_is_refused(entry, kind, model_runs):
    """Refused with one line naming the file, no code from it run, the previous results kept."""
    variant = model_runs["variant"]
    project, before, canary = model_runs["state"][kind]
    done = model_runs["results"][f"{entry}-{kind}"]
    why = {"flip": "Bad CRC-32", "lambda": "Lambda", "foreign": "could not be deserialized"}[kind]
    assert_fails_cleanly(
        done, f"error: models/{variant}.keras: cannot load model (", why, f"`dvc pull models/{variant}.keras`"
    )
    assert not canary.exists()
    assert_unchanged(before, project)  # metrics/ and plots/ of the last good evaluation untouched


@pytest.mark.slow
def test_lambda_tamper_is_live_code(model_runs):
    """The control: without safe mode the tampered file does run its code, so the refusal above
    is what kept it from running."""
    import keras

    project, _, canary = model_runs["state"]["lambda"]
    model = keras.saving.load_model(
        project / "models" / f"{model_runs['variant']}.keras", safe_mode=False, compile=False
    )
    model(np.zeros((1, *model.inputs[0].shape[1:]), "float32"))
    assert canary.read_text() == "ran"
    canary.unlink()


@pytest.mark.slow
def test_predict_reports_each_bad_image_and_predicts_the_rest(model_runs):
    done = model_runs["results"]["predict-images"]
    rows = {Path(r["path"]).name: r for r in json.loads(done.stdout)}
    bad, good = model_runs["bad"], model_runs["good"]
    assert set(rows) == {p.name for p in [*bad.values(), *good.values()]}
    for case, path in bad.items():
        row = rows[path.name]
        assert row["probability"] is None and row["label"] is None, case
        assert row["error"].startswith(f"{path}: ") and IMAGE_REASONS[case] in row["error"], row["error"]
    for case, path in good.items():
        row = rows[path.name]
        # decoded and predicted; the tiny model's OOD gate may also call an odd input out of distribution
        assert (
            row["error"] is None
            and 0 <= row["probability"] <= 1
            and row["label"] in (*CLASSES, UNCERTAIN, OUT_OF_DISTRIBUTION)
        ), case
    assert_fails_cleanly(
        done, f"error: {len(bad)} of {len(rows)} file(s) could not be predicted (see the error column)", stdout=True
    )
