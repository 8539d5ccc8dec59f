"""cxr.evaluation.report (loading, selection, the page), cxr.evaluation.figures, and the evaluate/report stages
on a tiny fake project."""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cxr.core.errors import CxrError
from cxr.evaluation import figures, metrics, report
from cxr.evaluation.stress import stress_summary
from cxr.model.sidecar import Sidecar, ValSummary

ROOT = Path(__file__).resolve().parents[1]


def fake_result(
    name: str, val_auc: float | None, test_quality: float, n: int = 60, seed: int = 0
) -> report.VariantResult:
    """A variant whose test scores separate the classes by `test_quality` (negative: inverted)."""
    rng = np.random.default_rng(seed)
    y = np.array([0, 1, 1] * (n // 3))
    p = np.clip(0.5 + test_quality * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1)
    # normal images in the data's two naming series (IM-…, NORMAL2-IM-…), pneumonia as personN_…
    names = np.where(
        y == 1,
        [f"person{i}_virus_1" for i in range(n)],
        np.where(
            np.arange(n) % 2, [f"IM-{i:04d}-0001" for i in range(n)], [f"NORMAL2-IM-{i:04d}-0001" for i in range(n)]
        ),
    )
    rows = pd.DataFrame(
        {
            "path": [f"data/raw/chest_xray/test/{name}.jpeg" for name in names],
            "subtype": np.where(y == 1, np.where(np.arange(n) % 2, "bacteria", "virus"), "normal"),
            "patient_id": [f"p{i // 2}" for i in range(n)],
        }
    )
    ev = metrics.evaluate_probabilities(
        y, p, rows, 0.5, val_roc_auc=val_auc, bootstrap_samples=30, calibration_bins=5, seed=1
    )
    meta = Sidecar(
        variant=name,
        model="cnn",
        image_size=8,
        resize="squash",
        threshold=0.5,
        threshold_rule="youden",
        val=ValSummary(
            roc_auc=float("nan") if val_auc is None else val_auc, accuracy=0.8, sensitivity=0.8, specificity=0.8, n=12
        ),
        epochs_run=3,
        train_seconds=12.5,
        seed=42,
    )
    return report.VariantResult(name, ev.metrics, meta, ev.tables["predictions"], ev.tables["roc"])


# what train writes to metrics/<v>_stress.json, for four validation images and one shift
STRESS = stress_summary(
    np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8]), {"blur": np.array([0.3, 0.6, 0.7, 0.4])}, 0.5
)

AUDIT = {
    "strategy": "patient_grouped",
    "counts": {
        "train": {
            "images": 100,
            "patients": 50,
            "by_label": {"NORMAL": 26, "PNEUMONIA": 74},
            "by_subtype": {"NORMAL/normal": 26, "PNEUMONIA/bacteria": 50, "PNEUMONIA/virus": 24},
        },
        "val": {"images": 12, "patients": 6, "by_label": {"NORMAL": 4, "PNEUMONIA": 8}, "by_subtype": {}},
        "test": {"images": 48, "patients": 24, "by_label": {"NORMAL": 18, "PNEUMONIA": 30}, "by_subtype": {}},
    },
    "excluded": [{"path": "data/raw/bad.jpeg", "reason": "truncated"}],
    "duplicates": {"groups": 2, "groups_across_train_test": 1},
}


def test_best_is_chosen_by_validation_auc_not_test():
    results = {
        "good_on_test": fake_result("good_on_test", 0.80, 0.6),
        "good_on_val": fake_result("good_on_val", 0.95, 0.1, seed=1),
    }
    assert results["good_on_test"].metrics["roc_auc"] > results["good_on_val"].metrics["roc_auc"]
    summary = report.build_summary(results)
    assert summary["best"] == "good_on_val"
    assert summary["selected_by"] == "validation roc_auc"
    v = summary["variants"]["good_on_test"]
    assert v["val_roc_auc"] == 0.80 and v["train_seconds"] == 12.5 and v["epochs_run"] == 3
    assert v["roc_auc"] == results["good_on_test"].metrics["roc_auc"]
    assert set(v["ci95"]) == {"accuracy", "sensitivity", "specificity", "roc_auc"}
    json.dumps(summary, allow_nan=False)


def test_select_by_stress_uses_the_stress_figures_not_test():
    a, b = fake_result("steady", 0.90, 0.1), fake_result("brittle", 0.99, 0.6, seed=1)
    a.stress = {"mean": {"roc_auc": 0.85, "specificity": 0.7}}
    b.stress = {"mean": {"roc_auc": 0.80, "specificity": 0.9}}
    results = {"steady": a, "brittle": b}
    assert report.build_summary(results, "val_roc_auc")["best"] == "brittle"
    summary = report.build_summary(results, "stress_roc_auc")
    assert summary["best"] == "steady" and summary["selected_by"] == "mean validation roc_auc under the stress shifts"
    assert summary["variants"]["steady"]["stress_roc_auc"] == 0.85
    assert report.build_summary(results, "stress_specificity")["best"] == "brittle"


def test_pick_best_ties_and_missing():
    assert report.pick_best({"b": 0.9, "a": 0.9, "c": 0.5}) == "a"
    # an incumbent is kept unless the best cuts its error (1 - figure) by more than the margin's share
    assert report.pick_best({"new": 0.9975, "old": 0.9974}, incumbent="old", margin=0.5) == "old"
    assert report.pick_best({"new": 0.9985, "old": 0.9974}, incumbent="old", margin=0.5) == "old"  # cuts 42%
    assert report.pick_best({"new": 0.9975, "old": None}, incumbent="old", margin=0.5) == "new"
    # the same share is the same hurdle near 0.9 as near 0.999, where an additive 0.003 could not be passed
    assert report.pick_best({"new": 0.96, "old": 0.90}, incumbent="old", margin=0.5) == "new"
    assert report.pick_best({"new": 0.94, "old": 0.90}, incumbent="old", margin=0.5) == "old"
    assert report.pick_best({"new": 0.9990, "old": 0.9974}, incumbent="old", margin=0.5) == "new"
    assert report.pick_best({"new": 0.9990, "old": 0.9974}, incumbent="old", margin=0.7) == "old"
    assert report.pick_best({"new": 0.9999, "old": 1.0}, incumbent="old", margin=0.0) == "old"
    assert report.pick_best({"b": 0.9, "a": None}) == "b"
    with pytest.raises(CxrError, match="validation figure report.select_by ranks by"):
        report.pick_best({"a": None})


def test_load_result_names_the_missing_file(tmp_path):
    with pytest.raises(CxrError, match=r"metrics/alpha\.json not found.*evaluate@alpha"):
        report.load_result("alpha", tmp_path)


def test_gradcam_examples_are_the_most_confident_per_outcome():
    pred = pd.DataFrame(
        {
            "path": [f"f{i}" for i in range(8)],
            "probability": [0.95, 0.7, 0.95, 0.6, 0.1, 0.3, 0.2, 0.05],
            "actual": ["PNEUMONIA", "PNEUMONIA", "PNEUMONIA", "NORMAL", "NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA"],
            "predicted": ["PNEUMONIA", "PNEUMONIA", "PNEUMONIA", "PNEUMONIA", "NORMAL", "NORMAL", "NORMAL", "NORMAL"],
        }
    )
    picked = figures.gradcam_examples(pred, 2)
    assert list(zip(picked["outcome"], picked["path"])) == [
        ("TP", "f0"),
        ("TP", "f2"),
        ("FP", "f3"),
        ("TN", "f4"),
        ("TN", "f5"),
        ("FN", "f7"),
        ("FN", "f6"),
    ]
    assert figures.gradcam_examples(pred.iloc[::-1], 2)["path"].tolist() == picked["path"].tolist()


def test_read_training_curves(tmp_path):
    base = tmp_path / "plots" / "metrics"
    (base / "train").mkdir(parents=True)
    (base / "eval").mkdir()
    (base / "train" / "loss.tsv").write_text("timestamp\tstep\tloss\n1\t0\t0.9\n2\t1\t0.5\n")
    (base / "eval" / "loss.tsv").write_text("timestamp\tstep\tloss\n1\t0\t1.0\n2\t1\t0.7\n")
    curves = report.read_training_curves(tmp_path)
    assert sorted(curves) == ["eval/loss", "train/loss"]
    assert curves["train/loss"]["value"].tolist() == [0.9, 0.5]
    assert report.read_training_curves(tmp_path / "absent") == {}
    assert figures.plot_training_curves({"v": curves}, tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 0
    assert not figures.plot_training_curves({"v": {}}, tmp_path / "none.png")


def _check_page(page: str) -> None:
    assert "<table class=results>" in page and "<table class=series>" in page
    assert "research and teaching, not for diagnostic use" in page
    assert "10.17632/rscbjbr9sj" in page and "CC BY 4.0" in page
    assert "Guangzhou Women and Children" in page and "aged 1–5" in page
    assert len(re.findall(r"src='data:image/png;base64,[A-Za-z0-9+/=]{100,}'", page)) >= 3
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "<script" not in page


def test_html_is_self_contained_and_escaped(tmp_path):
    results = {"a<b>": fake_result("a<b>", 0.9, 0.5), "plain": fake_result("plain", 0.7, 0.6, seed=2)}
    summary = report.build_summary(results)
    drawn, notes = figures.make_figures(results, {}, tmp_path)
    assert {p.name for p in drawn.values()} == {"roc_all.png", "comparison.png", "confusion_matrices.png"}
    assert notes and "training curves" in notes[0]
    page = report.render_html(
        report.ReportInputs(
            summary, results, AUDIT, "patient_grouped", 0.1, drawn, notes + ["<i>note</i>"], "abc1234", report.machine()
        )
    )
    _check_page(page)
    assert "a&lt;b&gt;" in page and "a<b>" not in page and "&lt;i&gt;note" in page
    assert "abc1234" in page and f"{os.cpu_count()} CPU cores" in page
    # this run's class mix (audit), not the published one
    assert "62.5% pneumonia vs 74.0% in training" in page
    assert "1 excluded as unreadable" in page
    assert "highest validation AUC" in page and "does not change the choice" in page  # plain wins on test


def test_html_without_audit_says_so(tmp_path):
    results = {"a": fake_result("a", 0.9, 0.5)}
    page = report.render_html(
        report.ReportInputs(
            report.build_summary(results),
            results,
            report.read_audit(tmp_path / "no.json"),
            "seed",
            0.1,
            {},
            [],
            "unknown",
            "m",
        )
    )
    assert "No data audit found" in page and "seed notebook" in page
    assert "62.5% pneumonia vs 74.0% in training" in page and "published figures" in page


def test_page_escapes_every_value(tmp_path):
    evil = "<script>alert(1)</script>"
    results = {evil: fake_result(evil, 0.9, 0.5)}
    audit = {
        "counts": {evil: {"images": evil, "by_label": {"NORMAL": 1}}},
        "duplicates": {"groups": 1, "groups_across_train_test": evil},
    }
    png = tmp_path / "f.png"
    png.write_bytes(b"\x89PNG not really")
    page = report.render_html(
        report.ReportInputs(
            report.build_summary(results),
            results,
            audit,
            evil,
            0.1,
            {f"it's {evil}": png},
            [evil],
            evil,
            evil,
            source=evil,
        )
    )
    assert "<script" not in page  # name, note, audit cells, strategy, commit, machine, caption
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 10
    assert "alt='it&#39;s &lt;script&gt;" in page  # a quote cannot end the attribute


def test_series_table_is_specificity_per_normal_series():
    results = {"a": fake_result("a", 0.9, 0.2), "b": fake_result("b", 0.8, 0.1, seed=3)}
    page = report.render_html(
        report.ReportInputs(report.build_summary(results), results, AUDIT, "seed", 0.1, {}, [], "c", "m")
    )
    table = re.search(r"<table class=series>(.*?)</table>", page, re.DOTALL)[1]
    assert re.findall(r"<th>([^<]*)</th>", table) == ["variant", "IM", "NORMAL2-IM"]
    for name, r in results.items():
        pred = r.predictions
        normal = pred[pred["actual"] == "NORMAL"]
        cells = []
        for prefix in ("IM-", "NORMAL2-IM-"):
            part = normal[normal["path"].str.rsplit("/", n=1).str[1].str.startswith(prefix)]
            cells.append(f"<td>{(part['predicted'] == 'NORMAL').mean():.3f} <span class=ci>n={len(part)}</span></td>")
        assert f"<tr><td>{name}</td>{''.join(cells)}</tr>" in table
    # not every normal called normal, so the table is informative here
    assert "<td>1.000" not in table.split("<tr><td>a</td>")[1].split("</tr>")[0]


def test_validation_series_table_comes_from_the_evaluate_metrics():
    results = {"a": fake_result("a", 0.9, 0.2), "b": fake_result("b", 0.8, 0.1, seed=3)}
    results["a"].metrics["val_specificity_by_series"] = {
        "IM": {"n": 40, "specificity": 0.975},
        "NORMAL2-IM": {"n": 90, "specificity": 0.9},
    }
    page = report.render_html(
        report.ReportInputs(report.build_summary(results), results, AUDIT, "seed", 0.1, {}, [], "c", "m")
    )
    table = re.search(r"<table class=series-val>(.*?)</table>", page, re.DOTALL)[1]
    assert (
        "<tr><td>a</td><td>0.975 <span class=ci>n=40</span></td><td>0.900 <span class=ci>n=90</span></td></tr>" in table
    )
    assert "<td>b</td>" not in table  # no validation figures: no row
    del results["a"].metrics["val_specificity_by_series"]
    assert "series-val" not in report.render_html(
        report.ReportInputs(report.build_summary(results), results, AUDIT, "seed", 0.1, {}, [], "c", "m")
    )


def write_result(root: Path, r: report.VariantResult) -> None:
    """The files evaluate and train write for one variant."""
    for folder in ("metrics", "models", f"plots/{r.name}"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "metrics" / f"{r.name}.json").write_text(json.dumps(r.metrics))
    (root / "metrics" / f"{r.name}_stress.json").write_text(json.dumps(STRESS))
    r.sidecar.write(root / "models" / f"{r.name}.json")
    r.predictions.to_csv(root / "plots" / r.name / "predictions.csv", index=False)
    r.roc.to_csv(root / "plots" / r.name / "roc.csv", index=False)


def test_load_result_reads_roc_and_confusion(tmp_path):
    write_result(tmp_path, fake_result("alpha", 0.9, 0.4))
    loaded = report.load_result("alpha", tmp_path)
    pd.testing.assert_frame_equal(loaded.roc, fake_result("alpha", 0.9, 0.4).roc)
    (tmp_path / "plots" / "alpha" / "roc.csv").unlink()
    with pytest.raises(CxrError, match=r"plots/alpha/roc\.csv not found.*evaluate@alpha"):
        report.load_result("alpha", tmp_path)
    write_result(tmp_path, fake_result("alpha", 0.9, 0.4))
    m = json.loads((tmp_path / "metrics" / "alpha.json").read_text())
    del m["confusion"]["fp"]
    (tmp_path / "metrics" / "alpha.json").write_text(json.dumps(m))
    with pytest.raises(CxrError, match=r"metrics/alpha\.json lacks confusion counts"):
        report.load_result("alpha", tmp_path)


def test_figures_draw_what_evaluate_wrote(tmp_path, monkeypatch):
    """ROC lines are roc.csv's points and the matrices metrics.json's counts, not recomputed from predictions."""
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, out_png, tight=True: drawn.append(fig))
    r = fake_result("a", 0.9, 0.4)
    r.roc = pd.DataFrame({"fpr": [0.0, 0.3, 1.0], "tpr": [0.0, 0.9, 1.0], "threshold": [np.inf, 0.5, 0.0]})
    r.metrics["confusion"] = {"tn": 101, "fp": 202, "fn": 303, "tp": 404}
    figures.plot_roc_all({"a": r}, tmp_path / "roc.png")
    figures.plot_confusions({"a": r}, tmp_path / "cm.png")
    roc_line = drawn[0].axes[0].lines[0]
    assert roc_line.get_xdata().tolist() == [0.0, 0.3, 1.0] and roc_line.get_ydata().tolist() == [0.0, 0.9, 1.0]
    # rows actual (NORMAL, PNEUMONIA), columns predicted
    assert [t.get_text() for t in drawn[1].axes[0].texts] == ["101", "202", "303", "404"]


# ------------------------------------------------------------------- stages on a fake project

PARAMS = {
    "base": {"seed": 42},
    "fetch": {"source": "unused"},
    "split": {"strategy": "patient_grouped", "val_fraction": 0.1},
    "preprocess": {"resize": "squash", "workers": 1},
    "train": {"patience": 2, "threshold_rule": "youden"},
    "transfer": {"backbone": "mobilenet_v2", "alpha": 0.35, "weights": "none"},
    "variants": {
        # "dense": params.yaml refuses the seed's cnn below 46 px; the model files themselves are tiny conv nets
        name: {
            "model": "dense",
            "image_size": 8,
            "epochs": 1,
            "batch_size": 8,
            "optimizer": "rmsprop",
            "learning_rate": 0.001,
        }
        for name in ("alpha", "beta")
    },
    "evaluate": {"bootstrap_samples": 40, "calibration_bins": 5},
    "report": {"gradcam_per_outcome": 1},
}
# alpha ranks test images well but had the lower validation AUC; beta is inverted on test.
VAL_AUC = {"alpha": 0.70, "beta": 0.95}
SLOPE = {"alpha": 20.0, "beta": -20.0}


def run_stage(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def tiny_model(slope: float):
    """P(pneumonia) = sigmoid(slope · (mean brightness − 0.45)) through a 1×1 conv (for Grad-CAM)."""
    import keras

    inp = keras.Input((8, 8, 1))
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.Conv2D(1, 1, name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="head")(x)
    model = keras.Model(inp, out)
    model.get_layer("conv").set_weights([np.ones((1, 1, 1, 1), "float32"), np.zeros(1, "float32")])
    model.get_layer("head").set_weights([np.array([[slope]], "float32"), np.array([-0.45 * slope], "float32")])
    return model


def make_project(root: Path) -> None:
    """params.yaml, a 48-image test cache (2 images per patient), two tiny models, audit, one DVCLive log."""
    from cxr.data.cache import write_split

    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    rng = np.random.default_rng(0)
    subtypes = ["normal"] * 18 + ["bacteria"] * 16 + ["virus"] * 14
    y = np.array([s != "normal" for s in subtypes])
    # per-image brightness varies as much as the class effect, so the classes overlap (AUC < 1)
    offset = rng.normal(40 * y, 20)[:, None, None, None]
    x = np.clip(rng.normal(95, 25, (48, 8, 8, 1)) + offset, 0, 255).astype(np.uint8)
    rows = pd.DataFrame(
        {
            "path": [
                f"data/raw/chest_xray/test/{'PNEUMONIA' if t else 'NORMAL'}/im{i:03d}.jpeg" for i, t in enumerate(y)
            ],
            "label": np.where(y, "PNEUMONIA", "NORMAL"),
            "subtype": subtypes,
            "patient_id": [f"pt{i // 2}" for i in range(48)],
            "split": "test",
            "sha256": [f"{i:064x}" for i in range(48)],
        }
    )
    write_split(root / "data" / "processed" / "8", "test", x, rows)
    # validation: the same images under validation names (IM-… and NORMAL2-IM-… normals, for the series table)
    val_rows = rows.assign(
        split="val",
        path=[
            f"data/raw/chest_xray/train/{p.split('/')[-2]}/{'NORMAL2-IM' if i % 3 else 'IM'}-{i:04d}-0001.jpeg"
            for i, p in enumerate(rows["path"])
        ],
    )
    write_split(root / "data" / "processed" / "8", "val", x, val_rows)
    for name in ("alpha", "beta"):
        (root / "models").mkdir(exist_ok=True)
        tiny_model(SLOPE[name]).save(root / "models" / f"{name}.keras")
        sidecar = {
            "variant": name,
            "model": "cnn",
            "image_size": 8,
            "resize": "squash",
            "threshold": 0.5,
            "threshold_rule": "youden",
            "val": {"roc_auc": VAL_AUC[name], "accuracy": 0.8, "sensitivity": 0.8, "specificity": 0.8, "n": 12},
            "epochs_run": 1,
            "train_seconds": 2.0,
            "seed": 42,
            "params": {},
        }
        (root / "models" / f"{name}.json").write_text(json.dumps(sidecar))
        (root / "metrics").mkdir(exist_ok=True)
        (root / "metrics" / f"{name}_stress.json").write_text(json.dumps(STRESS))
    (root / "data" / "split").mkdir(parents=True)
    (root / "data" / "split" / "audit.json").write_text(json.dumps(AUDIT))
    log = root / "dvclive" / "alpha" / "plots" / "metrics" / "train"
    log.mkdir(parents=True)
    (log / "loss.tsv").write_text("timestamp\tstep\tloss\n1\t0\t0.8\n2\t1\t0.6\n")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    make_project(root)
    return root


def run_in_process(cwd: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """Run a stage script as `python SCRIPT ARGS` would, in this process (no second TensorFlow start-up)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", list(args))
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(args[0], run_name="__main__")
    return exit_.value.code


def test_evaluate_and_report_stages(project, monkeypatch):
    done = run_stage(project, str(ROOT / "stages" / "evaluate.py"), "alpha")
    assert done.returncode == 0, done.stderr[-2000:]
    assert run_in_process(project, monkeypatch, str(ROOT / "stages" / "evaluate.py"), "beta") == 0
    m = json.loads((project / "metrics" / "alpha.json").read_text())
    assert (
        set(m["val_specificity_by_series"]) == {"IM", "NORMAL2-IM"}
        and sum(v["n"] for v in m["val_specificity_by_series"].values()) == 18
    )
    assert m["n_test"] == 48 and m["n_patients_test"] == 24 and m["threshold"] == 0.5 and m["val_roc_auc"] == 0.70
    assert m["roc_auc"] > 0.8  # brighter = pneumonia, as built
    assert m["ci95"]["roc_auc"][0] <= m["roc_auc"] <= m["ci95"]["roc_auc"][1]
    assert json.loads((project / "metrics" / "beta.json").read_text())["roc_auc"] < 0.2
    pred = pd.read_csv(project / "plots" / "alpha" / "predictions.csv")
    assert len(pred) == 48 and set(pred["actual"]) == {"NORMAL", "PNEUMONIA"}
    for table in ("roc", "pr", "calibration"):
        assert len(pd.read_csv(project / "plots" / "alpha" / f"{table}.csv")) > 1

    done = run_stage(project, str(ROOT / "stages" / "report.py"))
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((project / "metrics" / "summary.json").read_text())
    assert summary["best"] == "beta"  # by validation AUC, although alpha is far better on test
    assert summary["variants"]["alpha"]["roc_auc"] == m["roc_auc"]
    figures = {p.name for p in (project / "plots" / "figures").iterdir()}
    assert {"roc_all.png", "comparison.png", "confusion_matrices.png", "training_curves.png"} <= figures
    page = (project / "plots" / "report.html").read_text()
    _check_page(page)
    assert "gradcam_grid.png" in figures, done.stderr[-2000:]
    assert not list(project.rglob("*.tmp*"))  # no leftovers of atomic writes


def test_stage_errors_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    done = run_stage(tmp_path, str(ROOT / "stages" / "evaluate.py"), "gamma")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "unknown variant 'gamma'" in done.stderr
    capsys.readouterr()
    assert run_in_process(tmp_path, monkeypatch, str(ROOT / "stages" / "report.py")) == 1
    assert capsys.readouterr().err.startswith("error: metrics/alpha.json not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_model_card_names_each_backbone_s_pretrained_weights():
    """The sidecar records the starting weights (starting_weights); the card lists them per variant."""
    from types import SimpleNamespace

    from cxr.evaluation.report import pretrained_weights
    from cxr.model.efficientnet_lite import WEIGHTS, starting_weights

    lite = starting_weights("efficientnet_lite2", "imagenet")
    pinned = {k: WEIGHTS["lite2"][k] for k in ("package", "version", "sha256", "licence")}
    assert lite == {"backbone": "efficientnet_lite2", **pinned}
    assert "Apache-2.0" in lite["licence"] and len(lite["sha256"]) == 64 and lite["version"] == "0.1.0"
    keras_apps = starting_weights("mobilenet_v2", "imagenet")
    assert keras_apps == {"backbone": "mobilenet_v2", "package": "keras (Keras Applications)"}
    assert starting_weights("efficientnet_lite0", "none") == {} == starting_weights("mobilenet_v2", "my.h5")

    def result(weights):
        return SimpleNamespace(sidecar=SimpleNamespace(weights=weights))

    rows = pretrained_weights({"probe": result(lite), "frozen": result(keras_apps), "cnn": result({})})
    assert rows == [{"variant": "frozen", **keras_apps}, {"variant": "probe", **lite}]


def test_default_report_compares_the_default_pipeline_and_all_compares_every_model(project, tmp_path, monkeypatch):
    """params.yaml `pipeline.default` names what the default report compares (and may pick); `report.py
    all` compares every variant, by the same rule, into metrics/all and plots/all."""
    work = tmp_path / "split"
    shutil.copytree(project, work)
    assert run_stage(work, str(ROOT / "stages" / "evaluate.py"), "alpha").returncode == 0
    assert run_stage(work, str(ROOT / "stages" / "evaluate.py"), "beta").returncode == 0
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["pipeline"] = {"default": {"alpha": params["variants"]["alpha"]}, "screened": {"beta": {}}}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_in_process(work, monkeypatch, str(ROOT / "stages" / "report.py")) == 0
    default = json.loads((work / "metrics" / "summary.json").read_text())
    assert set(default["variants"]) == {"alpha"} and default["best"] == "alpha"  # beta is not a candidate here
    assert run_in_process(work, monkeypatch, str(ROOT / "stages" / "report.py"), "all") == 0
    every = json.loads((work / "metrics" / "all" / "summary.json").read_text())
    assert set(every["variants"]) == {"alpha", "beta"} and every["best"] == "beta"
    assert (work / "plots" / "all" / "report.html").is_file() and (work / "plots" / "all" / "figures").is_dir()
    assert json.loads((work / "metrics" / "summary.json").read_text()) == default  # untouched by `all`
    for bad, says in (("screened", "unknown report 'screened'"), (None, "pipeline.default names no variant")):
        if bad is None:
            params["pipeline"]["default"] = {}
            (work / "params.yaml").write_text(yaml.safe_dump(params))
        done = run_stage(work, str(ROOT / "stages" / "report.py"), *([bad] if bad else []))
        assert done.returncode == 1 and says in done.stderr and done.stderr.count("\n") == 1, done.stderr
