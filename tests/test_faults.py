"""Faults: a run killed with `kill -9`, or a disk that fills up, loses nothing and leaves nothing
half made.

    .venv/bin/pytest -q tests/test_faults.py        # the kill tests use tiny_pipeline (slow)

- `kill -9` of `dvc repro` (its whole process group) while train@cnn_baseline trains, or while
  preprocess decodes: the next `dvc repro` completes and gives exactly what an uninterrupted run
  gives in another clone (training is deterministic), and nothing of the killed run is left.
- A full disk while preprocess writes its cache (or fetch writes data/raw): one line that says so
  and names the output; the previous output intact, no partial folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from test_errors import (
    ROOT,
    assert_fails_cleanly,
    command,
    script_env,
    snapshot,
    write_params,
)
from testkit.httpserver import LoopbackServer
from testkit.pipeline import DVC, sh
from testkit.synth import Counts, make_archive, write_tree

# ---------------------------------------------------------------- kill -9, then dvc repro


def set_param(work: Path, dotted: str, value: object) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[last] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def param(work: Path, dotted: str) -> object:
    node = yaml.safe_load((work / "params.yaml").read_text())
    for key in dotted.split("."):
        node = node[key]
    return node


def locked_params(work: Path, stage: str) -> dict:
    """The params dvc.lock recorded for the last finished run of `stage`."""
    return yaml.safe_load((work / "dvc.lock").read_text())["stages"][stage]["params"]["params.yaml"]


def kill_group_when(
    work: Path, argv: list[str], log: Path, marker: str | Callable[[], bool], env: dict | None = None
) -> None:
    """Start `argv` in its own process group, wait until `marker` shows in its output (or the
    callable says so), then SIGKILL the whole group (dvc, the stage, its workers) and wait until
    none is left."""
    env = env or {
        **os.environ,
        "PYTHONPATH": str(work),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    env = {**env, "PYTHONUNBUFFERED": "1"}  # so a marker shows when it is printed
    ready = marker if callable(marker) else lambda: marker in log.read_text(errors="replace")
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    while proc.poll() is None and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, f"{' '.join(argv)} ended before {marker!r} showed:\n{log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    for _ in range(500):  # the group's other members are reaped by init, soon
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    pytest.fail(f"processes of {' '.join(argv)} survived kill -9")


def debris(work: Path) -> list[str]:
    """Leftovers of interrupted writes: hidden entries next to the outputs, untracked files in git."""
    hidden = [
        p.relative_to(work).as_posix()
        for folder in ("data", "models", "dvclive", "metrics", "plots")
        if (work / folder).is_dir()
        for p in (work / folder).iterdir()
        if p.name.startswith(".")
    ]
    status = sh(work, "git", "status", "--porcelain", "--untracked-files=all").stdout.splitlines()
    return hidden + [line for line in status if line.startswith("??")]


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_kill_9_while_training_then_repro_gives_the_uninterrupted_result(tiny_pipeline, tmp_path):
    variant, stage = "cnn_baseline", "train@cnn_baseline"
    killed, reference = tiny_pipeline.clone(tmp_path / "killed"), tiny_pipeline.clone(tmp_path / "reference")
    epochs = param(killed, f"variants.{variant}.epochs")
    for work in (killed, reference):
        set_param(work, f"variants.{variant}.epochs", epochs + 1)
    old_model = (killed / "models" / f"{variant}.keras").read_bytes()

    # --no-run-cache: the clones share one DVC cache, so without it a run could be restored, not made.
    kill_group_when(killed, [DVC, "repro", "--no-run-cache", stage], tmp_path / "killed.log", f"Epoch 1/{epochs + 1}")
    assert locked_params(killed, stage)[f"variants.{variant}"]["epochs"] == epochs  # DVC recorded no finished run
    model = killed / "models" / f"{variant}.keras"
    assert not model.exists() or model.read_bytes() == old_model  # never a half-written model

    again = sh(killed, DVC, "repro", "--no-run-cache", stage)
    assert f"Running stage '{stage}'" in again.stdout
    for work in (reference, killed):  # every run made here, none restored from the shared run-cache
        if work == reference:
            assert f"Running stage '{stage}'" in sh(work, DVC, "repro", "--no-run-cache", stage).stdout
        assert (
            f"Running stage 'evaluate@{variant}'"
            in sh(work, DVC, "repro", "--no-run-cache", f"evaluate@{variant}").stdout
        )

    for rel in (f"metrics/{variant}.json", f"dvclive/{variant}/metrics.json"):
        assert json.loads((killed / rel).read_text()) == json.loads((reference / rel).read_text()), rel
    meta = [json.loads((w / "models" / f"{variant}.json").read_text()) for w in (killed, reference)]
    assert (
        all(m.pop("train_seconds") >= 0 for m in meta)
        and meta[0] == meta[1]
        and meta[0]["params"]["epochs"] == epochs + 1
    )
    assert tree(killed / "plots" / variant) == tree(reference / "plots" / variant)  # per-image probabilities included
    assert debris(killed) == []
    assert "changed" not in sh(killed, DVC, "status", f"evaluate@{variant}").stdout


@pytest.mark.slow
def test_kill_9_while_preprocessing_then_repro_gives_the_uninterrupted_result(tiny_pipeline, tmp_path):
    killed, reference = tiny_pipeline.clone(tmp_path / "killed"), tiny_pipeline.clone(tmp_path / "reference")
    before = param(killed, "preprocess.resize")
    after = "pad" if before == "squash" else "squash"
    for work in (killed, reference):
        set_param(work, "preprocess.resize", after)
    old = tree(killed / "data" / "processed")

    kill_group_when(killed, [DVC, "repro", "--no-run-cache", "preprocess"], tmp_path / "killed.log", "decode")
    assert locked_params(killed, "preprocess")["preprocess"]["resize"] == before
    processed = killed / "data" / "processed"
    assert not processed.exists() or tree(processed) == old  # the old cache or none, never a partial one

    again = sh(killed, DVC, "repro", "--no-run-cache", "preprocess")
    assert "Running stage 'preprocess'" in again.stdout
    assert "Running stage 'preprocess'" in sh(reference, DVC, "repro", "--no-run-cache", "preprocess").stdout
    result = tree(processed)
    assert result == tree(reference / "data" / "processed") and result != old
    assert debris(killed) == []
    assert "changed" not in sh(killed, DVC, "status", "preprocess").stdout


# ---------------------------------------------------------------- a full disk


# Runs a stage script with one writer patched: its first `ok` calls work, the next writes a little
# to its destination (argument number `dest`) and then fails as a full disk does (ENOSPC); the
# number of calls goes to calls.txt.
FULL_DISK = """
import errno, importlib, runpy, sys
from pathlib import Path
module, name, ok, dest, script = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
target = importlib.import_module(module)
real = getattr(target, name)
calls = Path("calls.txt")
def writer(*args, **kwargs):
    n = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(n))
    if n <= ok:
        return real(*args, **kwargs)
    args[dest].write(b"half of it")
    raise OSError(errno.ENOSPC, "No space left on device")
setattr(target, name, writer)
sys.argv = [script]
runpy.run_path(script, run_name="__main__")
"""


def run_with_full_disk(project: Path, writer: str, dest: int, ok: int, stage: str) -> subprocess.CompletedProcess:
    """`python stages/<stage>.py` with `writer` ("module:function") failing on call ok + 1."""
    argv = [
        sys.executable,
        "-c",
        FULL_DISK,
        *writer.split(":"),
        str(ok),
        str(dest),
        str(ROOT / "stages" / f"{stage}.py"),
    ]
    return subprocess.run(argv, check=False, cwd=project, env=script_env(), capture_output=True, text=True, timeout=300)


def test_full_disk_while_preprocess_writes_keeps_the_previous_cache(tmp_path):
    project = tmp_path / "p"
    write_tree(project / "data" / "raw" / "chest_xray", {"train": Counts(3, 3, 2), "test": Counts(2, 2, 1)})

    def two_sizes(params: dict) -> None:
        params["split"]["val_fraction"] = 0.3
        params["variants"] = {k: params["variants"][k] for k in ("cnn_baseline", "dense_baseline")}
        params["cv"] = {"variants": [], "folds": []}  # no k-fold ensemble of a variant left out
        params["variants"]["dense_baseline"]["image_size"] = 32

    write_params(project, two_sizes)
    for stage in ("split", "preprocess"):
        done = subprocess.run(
            command(stage), check=False, cwd=project, env=script_env(), capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
    before = snapshot(project / "data")
    set_param(project, "preprocess.resize", "pad")

    # 2 sizes × 3 splits = 6 arrays; the disk fills up on the 4th, inside the new cache's temporary folder
    done = run_with_full_disk(project, "numpy:save", 0, 3, "preprocess")
    assert (project / "calls.txt").read_text() == "4"
    assert_fails_cleanly(done, "error: data/processed: no space left on device", "free disk space")
    assert snapshot(project / "data") == before  # the previous cache whole, no partial folder beside it


def test_full_disk_while_fetch_writes_keeps_the_previous_data(tmp_path):
    project = tmp_path / "p"
    archive = make_archive(
        tmp_path / "downloads" / "archive.zip", counts={"train": Counts(2, 2, 1), "test": Counts(1, 1, 1)}
    )
    write_params(project, lambda params: params["fetch"].update(source=str(archive)))
    (project / "data" / "raw" / "chest_xray").mkdir(parents=True)
    (project / "data" / "raw" / "chest_xray" / "keep.jpeg").write_bytes(b"the previous fetch")
    before = snapshot(project / "data")

    done = run_with_full_disk(project, "cxr.data.archive:copy_capped", 1, 5, "fetch")
    assert (project / "calls.txt").read_text() == "6"
    assert_fails_cleanly(done, "error: data/raw: no space left on device", "free disk space")
    assert snapshot(project / "data") == before


# ---------------------------------------------------------------- leftovers of killed writers


def dead_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    return int(
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
        ).stdout
    )


def test_next_write_removes_only_dead_writers_temporaries(tmp_path):
    from cxr.core.io import atomic_dir, atomic_file

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # ends, but is not reaped until wait()
    try:
        for _ in range(1000):
            if Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        out = tmp_path / "out"
        out.mkdir()
        stale = [
            out / f".report.html.{dead_pid()}-ab12.tmp",
            out / f".figures.{zombie.pid}-cd34.tmp",
            out / f".figures.{dead_pid()}-old",
        ]
        for path in stale:
            path.mkdir() if "figures" in path.name else path.write_text("half")
        (stale[1] / "partial.png").write_bytes(b"x")
        live = [
            out / f".report.html.{os.getppid()}-ef56.tmp",
            out / ".report.html.bak",
            out / ".figures.notes",
        ]  # a running writer's; the user's
        for path in live:
            path.write_text("keep")

        with atomic_file(out / "report.html") as fh:
            fh.write("new")
        with atomic_dir(out / "figures") as tmp:
            (tmp / "a.png").write_bytes(b"png")
    finally:
        zombie.wait()
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.html", "figures", *(p.name for p in live)])
    assert (out / "report.html").read_text() == "new" and [p.name for p in (out / "figures").iterdir()] == ["a.png"]


def test_kill_9_while_fetch_downloads_then_fetch_again_leaves_no_download(tmp_path):
    """A whole-archive download (the server ignores Range) killed half way leaves its partial
    archive in data/ (as big as the archive); the next fetch removes it."""
    project = tmp_path / "p"
    data = make_archive(
        tmp_path / "archive.zip", layout="kaggle", counts={"train": Counts(2, 2, 1), "test": Counts(1, 1, 1)}
    ).read_bytes()
    # The connection drops half way; fetch waits a moment before it resumes: the kill lands then.
    with LoopbackServer(data, ranges=False, drop_after=len(data) // 2) as server:
        write_params(project, lambda params: params["fetch"].update(source=server.url))

        def partial() -> bool:
            return any(p.is_dir() and any(p.iterdir()) for p in (project / "data").glob(".raw.*"))

        kill_group_when(project, command("fetch"), tmp_path / "fetch.log", partial, env=script_env())
    assert [p.name for p in (project / "data").iterdir() if p.name.startswith(".raw.")]  # what the kill left
    assert not (project / "data" / "raw").exists()
    with LoopbackServer(data, ranges=False) as server:
        write_params(project, lambda params: params["fetch"].update(source=server.url))
        done = subprocess.run(
            command("fetch"), check=False, cwd=project, env=script_env(), capture_output=True, text=True, timeout=300
        )
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (project / "data").iterdir()) == ["raw"]
