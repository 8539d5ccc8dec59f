"""Sharing the project through DVC remote storage, against real remotes on this machine.

What docs/sharing.md promises a team, checked end to end on the tiny pipeline:
- a pusher adds a default remote (a local folder, or an S3 bucket on moto's S3 server bound to
  127.0.0.1), commits the remote config and runs `dvc push`;
- a teammate's fresh `git clone` (own, empty DVC cache) runs `dvc pull` and gets every DVC-tracked
  output byte for byte, after which `dvc status` is clean and `dvc repro` reruns nothing;
- S3 credentials travel only through the environment (or `.dvc/config.local`, which git ignores);
- a push killed part-way loses nothing once it is run again;
- a pull with wrong credentials fails with a clear error and leaves the workspace as it was.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from testkit.pipeline import DVC, sh
from testkit.s3server import REGION, S3Server

pytestmark = pytest.mark.slow

# The outputs DVC caches (and so pushes and pulls); every one must come back byte for byte.
MUST_SHARE = ("data/raw", "data/split/manifest.csv", "data/processed", "models")
BUCKET = "cxr-team"
PUSH_TIMEOUT_S = 300


# --- helpers ---------------------------------------------------------------------------------


def clone_with_data(tiny_pipeline, dest: Path) -> Path:
    """The pusher's working copy: a git clone of the tiny pipeline with its outputs checked out.
    It reads the origin's DVC cache through `.dvc/config.local`, so nothing about that cache is
    committed and a clone of this clone starts with an empty cache of its own."""
    sh(dest.parent, "git", "clone", "-q", str(tiny_pipeline.origin), str(dest))
    sh(dest, DVC, "cache", "dir", "--local", str(tiny_pipeline.origin / ".dvc" / "cache"))
    sh(dest, DVC, "checkout", "-q")
    return dest


def teammate_clone(pusher: Path, dest: Path) -> Path:
    """A teammate's `git clone`: the committed remote config, no data, an empty DVC cache."""
    sh(dest.parent, "git", "clone", "-q", str(pusher), str(dest))
    assert not (dest / ".dvc" / "cache").exists() and not (dest / "models").exists()
    return dest


def commit_all(work: Path, message: str) -> None:
    sh(work, "git", "add", "-A")
    sh(work, "git", "commit", "-qm", message)


def cached_outputs(work: Path) -> list[str]:
    """Paths (relative to `work`) of the outputs that DVC caches, read from the project itself."""
    from dvc.repo import Repo

    with Repo(str(work)) as repo:
        return sorted(os.path.relpath(out.fs_path, work) for out in repo.index.outs if out.use_cache)


def file_hashes(work: Path, roots) -> dict[str, str]:
    """sha256 of every file under `roots` (files or folders), keyed by path relative to `work`."""
    hashes = {}
    for root in roots:
        path = work / root
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            hashes[f.relative_to(work).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return hashes


def shared_bytes(pusher: Path) -> dict[str, str]:
    """What a teammate must get back: every file of every cached output, hashed."""
    outs = cached_outputs(pusher)
    for must in MUST_SHARE:
        assert any(out == must or out.startswith(must + "/") for out in outs), (
            f"{must} is not a DVC-cached output: {outs}"
        )
    hashes = file_hashes(pusher, outs)
    assert any(p.startswith("data/raw/") and p.endswith(".jpeg") for p in hashes)
    assert any(p.startswith("models/") and p.endswith(".keras") for p in hashes)
    return hashes


def workspace_snapshot(work: Path) -> dict[str, str]:
    """Every file of the working copy and its DVC cache (not .git, not DVC's lock/tmp state)."""
    skip = (".git/", ".dvc/tmp/")
    return {p: h for p, h in file_hashes(work, ["."]).items() if not p.startswith(skip)}


def assert_up_to_date(work: Path, env: dict | None = None, repro: bool = True) -> None:
    status = sh(work, DVC, "status", "--json", env=env).stdout.strip()
    assert status in ("{}", ""), f"dvc status is not clean after the pull: {status}"
    if repro:
        done = sh(work, DVC, "repro", env=env)
        assert "Running stage" not in done.stdout + done.stderr, done.stdout[-3000:]


def aws_env(tmp_path: Path, key: str | None, secret: str | None) -> dict:
    """The environment of a dvc subprocess talking to the loopback S3 server: credentials only
    from these variables (or .dvc/config.local), never from a home folder or instance metadata."""
    env = {
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
    }
    if key is not None:
        env |= {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    return env


def add_s3_remote(work: Path, server: S3Server) -> None:
    """`dvc remote add -d` an S3 bucket on the loopback server, committed (no credentials)."""
    sh(work, DVC, "remote", "add", "-d", "team", f"s3://{BUCKET}/store")
    sh(work, DVC, "remote", "modify", "team", "endpointurl", server.endpoint)
    commit_all(work, "team remote on S3")


def assert_denied(message: str) -> None:
    """DVC's error for a remote that refuses the credentials: an ERROR line naming the S3
    remote's bucket/path and the server's 403 Forbidden."""
    errors = [line for line in message.splitlines() if line.startswith("ERROR")]
    assert errors, message
    assert f"s3 ({BUCKET}/store" in errors[0] and "Forbidden" in errors[0], message


@pytest.fixture
def s3():
    server = S3Server().start()
    try:
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.stop()


# --- tests -----------------------------------------------------------------------------------


def test_local_folder_remote_round_trip(tiny_pipeline, tmp_path):
    pusher = clone_with_data(tiny_pipeline, tmp_path / "pusher")
    storage = tmp_path / "storage"
    sh(pusher, DVC, "remote", "add", "-d", "storage", str(storage))
    commit_all(pusher, "default remote")
    expected = shared_bytes(pusher)
    sh(pusher, DVC, "push")
    assert any((storage / "files" / "md5").rglob("*")), "dvc push wrote nothing to the remote"
    assert sh(pusher, DVC, "status", "--cloud", "--json").stdout.strip() in ("{}", "")

    fresh = teammate_clone(pusher, tmp_path / "teammate")
    sh(fresh, DVC, "pull")
    assert file_hashes(fresh, cached_outputs(fresh)) == expected
    assert_up_to_date(fresh)


def test_s3_remote_round_trip_with_credentials_from_the_environment(tiny_pipeline, tmp_path, s3):
    key, secret = "AKIACXRTEAMSHARING01", "cxr-secret-that-must-never-be-committed"
    env = aws_env(tmp_path, key, secret)
    pusher = clone_with_data(tiny_pipeline, tmp_path / "pusher")
    add_s3_remote(pusher, s3)
    expected = shared_bytes(pusher)
    sh(pusher, DVC, "push", env=env)
    stored = s3.keys(BUCKET, "store/")
    assert stored and all(k.startswith("store/files/md5/") for k in stored), stored
    assert sh(pusher, DVC, "status", "--cloud", "--json", env=env).stdout.strip() in ("{}", "")

    fresh = teammate_clone(pusher, tmp_path / "teammate")
    sh(fresh, DVC, "pull", env=env)
    assert file_hashes(fresh, cached_outputs(fresh)) == expected
    assert_up_to_date(fresh, env, repro=False)
    for work in (pusher, fresh):  # the credentials were never written into the project's config
        for config in (work / ".dvc").glob("config*"):
            assert key not in config.read_text() and secret not in config.read_text(), config


def test_push_killed_part_way_then_run_again_loses_nothing(tiny_pipeline, tmp_path, s3):
    env = aws_env(tmp_path, "testing", "testing")
    pusher = clone_with_data(tiny_pipeline, tmp_path / "pusher")
    add_s3_remote(pusher, s3)
    expected = shared_bytes(pusher)

    # Let 5 uploads through, hold the next ones unanswered, then kill the push mid-flight.
    s3.hold_puts_after(5)
    with open(tmp_path / "push1.log", "w+") as log:
        push = subprocess.Popen(
            [DVC, "push", "-j", "2"],
            cwd=pusher,
            env={**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(pusher), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + PUSH_TIMEOUT_S
            while (stats := s3.stats()).held == 0:
                if push.poll() is not None:
                    log.seek(0)
                    pytest.fail(
                        f"dvc push ended ({push.returncode}) before it could "
                        f"be interrupted ({stats}):\n{log.read()[-2000:]}"
                    )
                if time.monotonic() > deadline:
                    pytest.fail(f"dvc push made no progress to interrupt within {PUSH_TIMEOUT_S}s ({stats})")
                time.sleep(0.1)
        finally:
            if push.poll() is None:
                os.killpg(push.pid, signal.SIGKILL)
            push.wait(timeout=60)
    assert push.returncode == -signal.SIGKILL
    s3.release()
    partial = s3.keys(BUCKET, "store/")
    assert len(partial) >= 5

    status = sh(pusher, DVC, "status", "--cloud", "--json", env=env).stdout
    assert "new" in status, f"after the interrupted push the remote should still miss objects:\n{status}"
    sh(pusher, DVC, "push", env=env, timeout=PUSH_TIMEOUT_S)
    complete = s3.keys(BUCKET, "store/")
    assert set(partial) < set(complete), "the first push was not actually interrupted part-way"
    assert sh(pusher, DVC, "status", "--cloud", "--json", env=env).stdout.strip() in ("{}", "")

    fresh = teammate_clone(pusher, tmp_path / "teammate")
    sh(fresh, DVC, "pull", env=env)
    assert file_hashes(fresh, cached_outputs(fresh)) == expected
    assert_up_to_date(fresh, env, repro=False)


def test_pull_with_wrong_credentials_fails_clearly_and_changes_nothing(tiny_pipeline, tmp_path, s3):
    key, secret = s3.make_user("pusher")
    s3.enforce_auth()  # from here on only the IAM user's key is accepted
    pusher = clone_with_data(tiny_pipeline, tmp_path / "pusher")
    add_s3_remote(pusher, s3)
    expected = shared_bytes(pusher)
    sh(pusher, DVC, "push", env=aws_env(tmp_path, key, secret))

    fresh = teammate_clone(pusher, tmp_path / "teammate")
    sh(fresh, DVC, "pull", "data/split/manifest.csv", env=aws_env(tmp_path, key, secret))  # some data already there
    assert (fresh / "data/split/manifest.csv").is_file()
    before = workspace_snapshot(fresh)

    wrong = aws_env(tmp_path, "AKIAWRONGWRONGWRONG0", "not-the-secret")
    failed = sh(fresh, DVC, "pull", env=wrong, check=False)
    message = failed.stdout + failed.stderr
    assert failed.returncode != 0, message
    # e.g. "ERROR: failed to connect to s3 (cxr-team/store/files/md5) - Forbidden: ... (403) ..."
    assert_denied(message)
    assert workspace_snapshot(fresh) == before, "a failed pull changed the workspace or the DVC cache"

    # Per-user keys in .dvc/config.local win over the environment, and git ignores that file.
    sh(fresh, DVC, "remote", "modify", "--local", "team", "access_key_id", "AKIAWRONGWRONGWRONG0")
    sh(fresh, DVC, "remote", "modify", "--local", "team", "secret_access_key", "not-the-secret")
    assert sh(fresh, "git", "status", "--porcelain").stdout == "", ".dvc/config.local must be git-ignored"
    before = workspace_snapshot(fresh)
    failed = sh(fresh, DVC, "pull", env=aws_env(tmp_path, key, secret), check=False)
    assert failed.returncode != 0
    assert_denied(failed.stdout + failed.stderr)
    assert workspace_snapshot(fresh) == before, "a failed pull changed the workspace or the DVC cache"

    # The same pull with the right keys works: the failures above were the credentials' doing.
    sh(fresh, DVC, "remote", "modify", "--local", "team", "access_key_id", key)
    sh(fresh, DVC, "remote", "modify", "--local", "team", "secret_access_key", secret)
    sh(fresh, DVC, "pull", env=aws_env(tmp_path, None, None))
    assert file_hashes(fresh, cached_outputs(fresh)) == expected
    assert_up_to_date(fresh, aws_env(tmp_path, None, None), repro=False)
