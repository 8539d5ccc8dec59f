"""Queued experiments: a small grid over one variant's parameter, run by DVC's queue worker.

The commands are the ones docs/sharing.md ("Queued experiments") tells users to type:
`dvc exp run --queue -S 'variants.cnn_baseline.epochs=2,3'` queues one experiment per value,
`dvc queue start -j 1` runs them in the background, `dvc queue status` reports progress, and
`dvc exp show --json` lists each experiment with its parameters and metrics.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import yaml

from testkit.pipeline import DVC, sh

pytestmark = pytest.mark.slow

VARIANT = "cnn_baseline"
WAIT_S = 900  # bound on the whole queue run (a hung worker fails the test instead of hanging it)
DONE = {"Success", "Failed"}


def queue_states(work, names) -> dict[str, str]:
    """`dvc queue status` parsed: {experiment name: Queued|Running|Success|Failed}."""
    out = sh(work, DVC, "queue", "status").stdout
    states = {}
    for line in out.splitlines():
        words = line.split()
        for name in names:
            if name in words:
                states[name] = words[-1]
    return states


def walk_experiments(shown: list) -> dict[str, dict]:
    """`dvc exp show --json` → {experiment name: its data} (experiments of every baseline rev)."""
    found = {}
    for row in shown:
        for exp in row.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name"):
                    found[rev["name"]] = rev.get("data") or {}
    return found


def test_queued_grid_runs_each_value_and_exp_show_lists_them(tiny_pipeline, tmp_path):
    work = tiny_pipeline.clone(tmp_path / "clone")
    committed = yaml.safe_load((work / "params.yaml").read_text())["variants"]
    grid = [committed[VARIANT]["epochs"] + 1, committed[VARIANT]["epochs"] + 2]
    values = ",".join(map(str, grid))
    status_before = sh(work, DVC, "status", "--json").stdout
    queued = sh(work, DVC, "exp", "run", "--queue", "-n", "grid", "-S", f"variants.{VARIANT}.epochs={values}")
    names = re.findall(r"Queued experiment '([^']+)'", queued.stdout)
    assert sorted(names) == ["grid-1", "grid-2"], queued.stdout
    assert set(queue_states(work, names).values()) == {"Queued"}, (
        "queued experiments must not run before `dvc queue start`"
    )

    try:
        sh(work, DVC, "queue", "start", "-j", "1")
        deadline = time.monotonic() + WAIT_S
        states = queue_states(work, names)
        while not (len(states) == len(names) and set(states.values()) <= DONE):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"queued experiments still not done after {WAIT_S}s: "
                    f"{states}\n{sh(work, DVC, 'queue', 'status').stdout}"
                )
            time.sleep(2)
            states = queue_states(work, names)
        if set(states.values()) != {"Success"}:
            logs = "\n".join(sh(work, DVC, "queue", "logs", n, check=False).stdout[-2000:] for n in names)
            pytest.fail(f"queued experiments failed: {states}\n{logs}")
    finally:
        sh(work, DVC, "queue", "stop", "--kill", check=False, timeout=120)

    for name in names:  # each run redid only what the parameter feeds (ran, or restored from DVC's run cache)
        log = sh(work, DVC, "queue", "logs", name).stdout
        redone = {a or b for a, b in re.findall(r"Running stage '([^']+)'|Stage '([^']+)' is cached", log)}
        after = {"report", "site_curve"}
        assert redone == {f"train@{VARIANT}", f"evaluate@{VARIANT}", f"ood@{VARIANT}", f"export@{VARIANT}", *after}, (
            log[-3000:]
        )

    shown = walk_experiments(json.loads(sh(work, DVC, "exp", "show", "--json").stdout))
    assert set(names) <= set(shown), sorted(shown)
    epochs = {}
    for name in names:
        data = shown[name]
        params = data["params"]["params.yaml"]["data"]
        epochs[name] = params["variants"][VARIANT]["epochs"]
        # every other variant keeps its committed parameters: the grid touched one parameter only
        assert {v: p for v, p in params["variants"].items() if v != VARIANT} == {
            v: p for v, p in committed.items() if v != VARIANT
        }
        metrics = data["metrics"][f"metrics/{VARIANT}.json"]["data"]
        assert 0 <= metrics["roc_auc"] <= 1
    assert sorted(epochs.values()) == grid
    # the experiments ran in the queue's temporary workspaces: the user's workspace is untouched
    assert yaml.safe_load((work / "params.yaml").read_text())["variants"] == committed
    assert sh(work, DVC, "status", "--json").stdout == status_before
