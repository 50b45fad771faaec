"""Saved models (issue 11): every method's save/load round trip, driven by the registry; the refusals
(panel, normalisation, encoder, a changed file, a pickle); resume with --save-models; --fit-all."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass

import anndata
import numpy as np
import pytest

from stbench import models
from stbench.benchmark import resolve_config
from stbench.cli import main
from stbench.errors import ConfigError, DataError
from stbench.method import FittedState, Method
from stbench.plugins import load_plugins
from stbench.predict import PredictRequest, predict
from stbench.results import RunDir
from stbench.run import execute, resolve_plan, whole_dataset_fold
from stbench.specs import MethodSpec

#: collected at import time, so that each registered method is its own test id
METHODS = [name for name, _ in load_plugins(entry_points=False).methods.entries()]
SMALL = ["dataset_options.spots_per_section=60", "dataset_options.n_patients=3"]


def _plan(names, out, sets=(), save_models=True, fit_all=False, plugins=None):
    plugins = plugins or load_plugins(entry_points=False)
    shorthands = {"methods": {n: dict(plugins.methods.get(n).test_settings) for n in names}}
    conf, base = resolve_config("synthetic", sets=SMALL + list(sets), shorthands=shorthands)
    return resolve_plan(conf, list(names), out, plugins, base, save_models=save_models, fit_all=fit_all)


def _class(plugins, name):
    return type(plugins.methods.load(name)(_plan_config(plugins, name)))


def _plan_config(plugins, name):
    from stbench import config as cfg

    spec = plugins.methods.get(name)
    return cfg.build(spec.config, dict(spec.test_settings))


@pytest.mark.parametrize("name", METHODS)
def test_every_method_saves_and_loads_with_identical_predictions(name, tmp_path, one_torch_thread):
    plugins = load_plugins(entry_points=False)
    if not _class(plugins, name).supports_save():
        # a method without save support: one line, naming it, before anything is written
        with pytest.raises(ConfigError) as excinfo:
            _plan([name], tmp_path / "run")
        message = str(excinfo.value)
        assert f"method {name} cannot save its fitted state" in message and "\n" not in message
        assert not (tmp_path / "run").exists()
        return
    out = tmp_path / "run"
    plan = _plan([name], out)
    execute(plan, verbose=False)
    fold = plan.folds[0]
    directory = models.model_dir(out, name, "fold0")
    assert models.is_saved(directory)
    record = json.loads((directory / models.RECORD_FILE).read_text())
    assert record["method"] == name and record["scope"] == "fold" and record["sections"]["test"] == list(fold.test)
    assert record["genes"] == list(plan.dataset.default_panel()) and record["normalisation"] == "cpm_log1p"

    # the saved model, loaded in a fresh process state, predicts each test slide exactly as the run did
    done = predict(PredictRequest(model=directory, out=tmp_path / "pred", dataset="synthetic", slides=list(fold.test),
                                  maps=False), load_plugins(entry_points=False))
    assert [d.name for d in done] == list(fold.test)
    for d in done:
        ran = anndata.read_h5ad(out / "predictions" / name / f"{d.name}.h5ad")
        again = anndata.read_h5ad(d.path)
        assert np.array_equal(again.X, ran.X), f"{name} {d.name}: max diff {np.abs(again.X - ran.X).max()}"
        assert list(again.var_names) == list(ran.var_names)
        assert np.array_equal(again.obs["is_prompt"].to_numpy(), ran.obs["is_prompt"].to_numpy())
        assert again.uns["stbench"]["model_sha256"] == models.file_sha256(directory / models.WEIGHTS_FILE)


# ------------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def ridge_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ridge") / "run"
    plan = _plan(["ridge"], out, fit_all=True)
    execute(plan, verbose=False)
    return out, plan


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_model_is_refused_for_another_panel_normalisation_or_encoder(ridge_run):
    out, plan = ridge_run
    directory = models.model_dir(out, "ridge", "fold0")
    plugins = load_plugins(entry_points=False)
    genes = list(plan.dataset.default_panel())
    identity = json.loads((directory / models.RECORD_FILE).read_text())["encoder"]
    assert models.load(directory, plugins, genes=genes, normalisation="cpm_log1p", encoder=identity).name == "ridge"
    cases = [
        (dict(genes=genes[:-1]), [f"{len(genes)} genes, not the {len(genes) - 1} given"]),
        (dict(genes=genes[1:] + genes[:1]), ["another gene panel", f"gene 1 is {genes[0]} in the model"]),
        (dict(normalisation="log2_raw"), ["normalised with cpm_log1p, not log2_raw"]),
        (dict(encoder={**identity, "weights_id": "0123abcd"}), ["encoder hefeat", "0123abcd", "weights_id differ",
                                                                "--encoder-weights"]),
    ]
    for kwargs, fragments in cases:
        with pytest.raises(ConfigError) as excinfo:
            models.load(directory, plugins, **kwargs)
        message = str(excinfo.value)
        assert "\n" not in message and str(directory) in message
        for fragment in fragments:
            assert fragment in message, message


def test_a_changed_weights_file_is_refused(ridge_run, tmp_path):
    out, _ = ridge_run
    directory = _copy_model(models.model_dir(out, "ridge", "fold0"), tmp_path / "m")
    data = bytearray((directory / models.WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (directory / models.WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(DataError) as excinfo:
        models.load(directory, load_plugins(entry_points=False))
    assert "does not match the SHA-256" in str(excinfo.value) and "\n" not in str(excinfo.value)


class _Boom:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_is_never_unpickled(ridge_run, tmp_path):
    out, _ = ridge_run
    directory = _copy_model(models.model_dir(out, "ridge", "fold0"), tmp_path / "m")
    marker = tmp_path / "code-ran"
    weights = directory / models.WEIGHTS_FILE
    weights.write_bytes(pickle.dumps({"w_": _Boom(marker)}))
    record = json.loads((directory / models.RECORD_FILE).read_text())
    record["weights"].update(sha256=models.file_sha256(weights), bytes=weights.stat().st_size)  # even a matching hash
    (directory / models.RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(DataError) as excinfo:
        models.load(directory, load_plugins(entry_points=False))
    message = str(excinfo.value)
    assert "is not a safetensors file" in message and "no pickled models" in message and "\n" not in message
    assert not marker.exists()


def test_a_folder_that_is_not_a_model_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder, fragment in ((tmp_path / "empty", "holds no model.json"), (tmp_path / "nowhere", "not found")):
        with pytest.raises(DataError) as excinfo:
            models.read_record(folder)
        assert fragment in str(excinfo.value) and "RUN_DIR/models/<method>/<fold k | all>" in str(excinfo.value)
    (tmp_path / "empty" / models.RECORD_FILE).write_text("{not json")
    code = main(["predict", "--model", str(tmp_path / "empty"), "--dataset", "synthetic", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "is not valid JSON" in err and err.count("\n") == 1


def test_metadata_that_is_not_json_fails_at_save_time(tmp_path):
    class Odd(Method):
        def get_state(self):
            return FittedState({"a": np.zeros(2)}, {"when": object()})

        def set_state(self, state, device="cpu"):
            pass

    with pytest.raises(TypeError, match="is not JSON"):
        models.save(tmp_path / "m", Odd(), {"method": "odd"})
    assert not models.is_saved(tmp_path / "m")


# ------------------------------------------------------------------------------------------------
# resume, atomicity, --fit-all


def test_a_unit_counts_as_complete_only_with_its_model(tmp_path):
    out = tmp_path / "run"
    execute(_plan(["mean"], out, save_models=False), verbose=False)  # results, no models
    assert not (out / "models").exists()
    outcome = execute(_plan(["mean"], out), verbose=False)  # the same run asked to keep models: every unit refits
    assert outcome.units_run == 3 and all(models.is_saved(models.model_dir(out, "mean", f"fold{k}")) for k in range(3))
    again = execute(_plan(["mean"], out), verbose=False)
    assert again.units_run == 0 and again.units_skipped == 3

    # a model whose saving was interrupted (no model.json) makes its unit run again; the others stay done
    (models.model_dir(out, "mean", "fold1") / models.RECORD_FILE).unlink()
    rerun = execute(_plan(["mean"], out), verbose=False)
    assert rerun.units_run == 1 and models.is_saved(models.model_dir(out, "mean", "fold1"))
    assert RunDir(out).is_done("mean", 1)


def test_fit_all_fits_on_every_section_and_says_so(ridge_run):
    out, plan = ridge_run
    directory = models.model_dir(out, "ridge", models.ALL)
    record = json.loads((directory / models.RECORD_FILE).read_text())
    assert record["scope"] == "all" and record["fold"] is None and record["sections"]["test"] == []
    assert "no test fold" in record["description"] and "the model to deploy" in record["description"]
    used = sorted(record["sections"]["train"] + record["sections"]["val"])
    assert used == sorted(s.name for s in plan.sections)
    # validation: the split's inner-validation rule (one whole patient for leave_one_patient_out)
    val_patients = {s.patient for s in plan.sections if s.name in record["sections"]["val"]}
    assert len(val_patients) == 1 and record["patients"]["val"] == sorted(val_patients)
    assert not set(record["sections"]["val"]) & set(record["sections"]["train"])
    versions = json.loads((out / "versions.json").read_text())
    assert "ridge/all" in versions["units"]


def test_whole_dataset_validation_follows_each_split_unit(tmp_path):
    sections = lambda plan: sorted(s.name for s in plan.sections)  # noqa: E731
    plan = _plan(["mean"], tmp_path / "a", sets=["split=leave_one_section_out", "protocol_level=section"])
    fold = whole_dataset_fold(plan)
    assert len(fold.val) == 1 and sorted(fold.train + fold.val) == sections(plan) and fold.test == ()
    plan = _plan(["mean"], tmp_path / "b", sets=["split=random_slide", "protocol_level=section",
                                                 "dataset_options.n_patients=5"])
    fold = whole_dataset_fold(plan)
    assert len(fold.val) == 1 and len(fold.train) == 9  # 10 % of 10 slides
    plan = _plan(["mean"], tmp_path / "c", sets=["split_params.inner_val=false"])
    assert whole_dataset_fold(plan).val == ()


def test_fit_all_needs_save_models(tmp_path, capsys):
    code = main(["run", "--methods", "mean", "--fit-all", "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--fit-all" in err and "--save-models" in err and err.count("\n") == 1


@dataclass
class _NoConfig:
    pass


class _Unsaveable(Method):
    def __init__(self, config):
        pass

    def fit(self, train, val, context):
        pass

    def predict(self, slide):
        return np.zeros((slide.n_spots, slide.n_genes), np.float32)


def test_save_models_with_a_method_that_cannot_save_is_one_line(tmp_path, capsys):
    plugins = load_plugins(entry_points=False)
    plugins.methods.add(MethodSpec("unsaveable", _Unsaveable, _NoConfig), "test", "test")
    with pytest.raises(ConfigError) as excinfo:
        _plan(["mean", "unsaveable"], tmp_path / "r", plugins=plugins)
    assert str(excinfo.value).startswith("method unsaveable cannot save its fitted state")
    assert "\n" not in str(excinfo.value)


def test_predict_fine_tunes_a_saved_model_as_the_run_did(tmp_path, one_torch_thread):
    # a run with --finetune saves each fold's model before fine-tuning; predict fine-tunes a copy on the
    # slide's prompts with the run's settings (and the method's saved random state): the run's predictions
    out = tmp_path / "run"
    plan = _plan(["stnet"], out, sets=["finetune.enabled=true"])
    execute(plan, verbose=False)
    test = list(plan.folds[0].test)
    done = predict(PredictRequest(model=models.model_dir(out, "stnet", "fold0"), out=tmp_path / "p", dataset="synthetic",
                                  slides=test, maps=False), load_plugins(entry_points=False))
    untuned = predict(PredictRequest(model=models.model_dir(out, "stnet", "fold0"), out=tmp_path / "q",
                                     dataset="synthetic", slides=test, maps=False, finetune=False),
                      load_plugins(entry_points=False))
    for d, u in zip(done, untuned):
        ran = anndata.read_h5ad(out / "predictions" / "stnet" / f"{d.name}.h5ad").X
        assert d.finetuned and not u.finetuned
        assert np.array_equal(anndata.read_h5ad(d.path).X, ran)
        assert not np.array_equal(anndata.read_h5ad(u.path).X, ran)
