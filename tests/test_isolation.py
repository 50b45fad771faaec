"""What a method can see: a spy method (an installed plugin, faked) records every call the harness makes.

``fit`` never gets a test section of its fold, ``predict`` only masked slides (no truth, no raw counts),
and the training truth is read-only. HVG panels are chosen on each fold's training sections only.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass

import numpy as np
import pytest

import stbench.run
from stbench import hookimpl
from stbench import plugins as plugin_loader
from stbench.cli import main
from stbench.method import Method
from stbench.specs import MethodSpec

#: every call the spy receives, in order: ("fit", fold, {...}) or ("predict", fold, {...})
CALLS: list = []
SMALL = ["--set", "dataset_options.spots_per_section=40", "--set", "dataset_options.n_patients=3"]


@dataclass
class SpyConfig:
    pass


class Spy(Method):
    def __init__(self, config):
        self.fold = None

    def fit(self, train, val, context):
        self.fold = context.fold
        slides = list(train) + list(val)
        writes = []
        for s in slides:
            try:
                s.expr[0, 0] = 123.0
                writes.append("written")
            except ValueError:
                writes.append("refused")
        CALLS.append(("fit", context.fold, {
            "train": sorted(s.name for s in train), "val": sorted(s.name for s in val), "n_genes": len(context.genes),
            "writeable": [bool(s.expr.flags.writeable) for s in slides], "writes": writes,
        }))

    def predict(self, slide):
        CALLS.append(("predict", self.fold, {
            "slide": slide.name, "is_masked": slide.is_masked, "expr_is_none": slide.expr is None,
            "counts_is_none": slide.section is not None and slide.section.counts is None,
            "n_prompts": 0 if slide.prompt_expr is None else len(slide.prompt_expr),
        }))
        return np.random.default_rng(0).normal(size=(slide.n_spots, slide.n_genes))


def _spy_plugin():
    module = types.ModuleType("stbench_spy.plugin")

    @hookimpl
    def stbench_register_methods(register):
        register(MethodSpec("spy", Spy, SpyConfig, description="records what the harness hands over"))

    module.stbench_register_methods = stbench_register_methods
    return module


class _EntryPoint:
    name, value = "spy", "stbench_spy.plugin"
    dist = types.SimpleNamespace(name="stbench-spy", version="0.0.1")

    def load(self):
        return _spy_plugin()


@pytest.fixture
def spy(monkeypatch):
    """The spy installed as a third-party plugin (a faked entry point)."""
    monkeypatch.setattr(plugin_loader, "_entry_points", lambda: [_EntryPoint()])
    monkeypatch.delenv("STBENCH_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    plugin_loader.reset_plugins()
    CALLS.clear()
    yield CALLS
    CALLS.clear()


def _folds(out):
    return {f["index"]: f for f in json.loads((out / "split.json").read_text())["folds"]}


def test_fit_never_sees_test_sections_and_predict_only_masked_slides(spy, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--methods", "spy", "--out", str(out), "--quiet", *SMALL]) == 0
    folds = _folds(out)
    fits = [c for c in spy if c[0] == "fit"]
    predicts = [c for c in spy if c[0] == "predict"]
    assert sorted(fold for _, fold, _ in fits) == sorted(folds), "one fit per fold"
    for _, fold, seen in fits:
        split = folds[fold]
        assert seen["train"] == sorted(split["train"]) and seen["val"] == sorted(split["val"])
        assert not set(seen["train"] + seen["val"]) & set(split["test"]), f"fold {fold} fit on a test section"
        # the training truth is shared across folds and methods: read-only
        assert seen["writeable"] and not any(seen["writeable"])
        assert set(seen["writes"]) == {"refused"}
    assert sorted((fold, p["slide"]) for _, fold, p in predicts) == sorted(
        (i, s) for i, f in folds.items() for s in f["test"]), "predict gets exactly the fold's test slides"
    for _, fold, seen in predicts:
        assert seen["is_masked"] and seen["expr_is_none"] and seen["counts_is_none"], seen
        assert seen["n_prompts"] > 0


def _record_panel_choices(monkeypatch, chooser: str) -> list:
    """The section names each call of ``stbench.run.<chooser>`` chose a panel on, as the run makes them."""
    chosen_on = []
    real = getattr(stbench.run, chooser)

    def recording(sections, n_top, *args, **kwargs):
        chosen_on.append(sorted(s.name for s in sections))
        return real(sections, n_top, *args, **kwargs)

    monkeypatch.setattr(stbench.run, chooser, recording)
    return chosen_on


def test_hvg_panels_are_chosen_on_each_folds_training_sections(spy, tmp_path, monkeypatch):
    chosen_on = _record_panel_choices(monkeypatch, "highly_variable_genes")
    out = tmp_path / "hvg"
    assert main(["run", "--methods", "spy", "--out", str(out), "--quiet", "--set", "panel.hvg=20", *SMALL]) == 0
    folds = _folds(out)
    training = {fold: sorted(f["train"] + f["val"]) for fold, f in folds.items()}
    assert chosen_on and all(names in training.values() for names in chosen_on), chosen_on
    assert sorted(map(tuple, chosen_on)) == sorted({tuple(t) for t in training.values()}), "one panel per fold"
    for fold, f in folds.items():
        assert training[fold] in chosen_on
        assert not set(training[fold]) & set(f["test"])
    # every fit saw its fold's 20-gene panel
    assert [seen["n_genes"] for kind, _, seen in spy if kind == "fit"] == [20] * len(folds)


def test_selection_on_the_test_fold_is_the_one_exemption_and_the_table_says_so(spy, tmp_path, capsys):
    """The sources' protocol (issue 13's protocol study): with selection=test_fold the test slides,
    unmasked, are the validation set; nothing else changes, and every table labels it leaky."""
    out = tmp_path / "leaky"
    assert main(["run", "--methods", "spy", "--out", str(out), "--quiet", "--set", "selection=test_fold", *SMALL]) == 0
    folds = _folds(out)
    for _, fold, seen in (c for c in spy if c[0] == "fit"):
        assert seen["val"] == sorted(folds[fold]["test"])  # the exemption
        assert not set(seen["train"]) & set(folds[fold]["test"])  # training still never sees them
    for _, _, seen in (c for c in spy if c[0] == "predict"):
        assert seen["is_masked"] and seen["expr_is_none"]
    table = " ".join(capsys.readouterr().out.split())  # the terminal header is wrapped
    assert "LEAKY: model selection (checkpoint, penalty, early stopping) on the test slides themselves" in table
    assert main(["run", "--methods", "spy", "--out", str(tmp_path / "bad"), "--quiet", "--set", "selection=test"]) == 2
    assert "unknown selection 'test' (key selection); choose one of inner_val, test_fold" in capsys.readouterr().err


def test_top_expressed_panels_are_chosen_on_each_folds_training_sections(spy, tmp_path, monkeypatch):
    chosen_on = _record_panel_choices(monkeypatch, "top_expressed_genes")
    out = tmp_path / "top"
    assert main(["run", "--methods", "spy", "--out", str(out), "--quiet", "--set", "panel.top_expressed=15", *SMALL]) == 0
    folds = _folds(out)
    assert sorted(map(tuple, chosen_on)) == sorted({tuple(sorted(f["train"] + f["val"])) for f in folds.values()})
    assert [seen["n_genes"] for kind, _, seen in spy if kind == "fit"] == [15] * len(folds)


def test_smoothed_targets_are_scored_and_labelled_leaky(tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "smooth"
    assert main(["run", "--methods", "mean", "--out", str(out), "--quiet", "--set", "smoothing=grid3x3", *SMALL]) == 0
    assert "LEAKY: targets smoothed (grid3x3) before prompts are drawn" in " ".join(capsys.readouterr().out.split())
    assert main(["run", "--methods", "mean", "--out", str(tmp_path / "plain"), "--quiet", *SMALL]) == 0
    a = pd.read_csv(out / "results.csv")["mae"].to_numpy()
    b = pd.read_csv(tmp_path / "plain" / "results.csv")["mae"].to_numpy()
    assert (a < b).all()  # smoothing removes spot noise: the training mean is closer to smoothed targets
