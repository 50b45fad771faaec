"""BLEEP (METHODS.md §5): the contrastive loss by its formula, retrieval (neighbours, aggregations, scale),
recipes, the prompt options, and the plugin end to end with both recipes and the frozen-feature variant."""

import dataclasses
import json
import time

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

from stbench.benchmark import resolve_config
from stbench.errors import ConfigError
from stbench.method import FitContext
from stbench.plugins import load_plugins
from stbench.run import SlideStore, execute, resolve_plan
from stbench_plugins.bleep import RECIPES, BLEEPConfig, bleep_needs, bleep_patches
from stbench_plugins.bleep.model import BLEEP, bleep_loss
from stbench_plugins.bleep.retrieval import ReferenceSet

TINY = dict(backbone="test_resnet", backbone_weights="random", input_px=32, projection_dim=16, epochs=2,
            batch_size=16, k=8)
DATA = ["dataset_options.spots_per_section=60", "dataset_options.n_patients=3"]
VARIANTS = {"triplex": {}, "original": {"recipe": "original"}, "frozen": {"backbone": "frozen"}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plugins():
    return load_plugins(entry_points=False)


def _plan(tmp_path, finetune=False, **settings):
    sets = [f"methods.bleep.{k}={v}" for k, v in {**TINY, **settings}.items()] + DATA
    conf, base = resolve_config("synthetic", sets=sets, shorthands={"finetune": {"enabled": finetune}})
    return resolve_plan(conf, ["bleep"], tmp_path / "run", _plugins(), base)


def _fit(tmp_path, fold=0, **settings):
    """A BLEEP fitted on one fold of the tiny synthetic dataset, with the store and fold."""
    plan = _plan(tmp_path, **settings)
    store = SlideStore(plan)
    store.prepare_features()
    store.prepare_patches()
    f = plan.folds[fold]
    genes = store.panel(f)
    method = BLEEP(dataclasses.replace(plan.methods["bleep"]))
    train, val = [store.slide(s, genes) for s in f.train], [store.slide(s, genes) for s in f.val]
    method.fit(train, val, FitContext(seed=0, genes=np.asarray(genes)))
    return method, store, f, genes, train, val


# --- the loss ------------------------------------------------------------------------------------------


def _loss_by_formula(I, S, tau):
    """§5 written out entry by entry, in float64."""
    B = len(I)
    logits = np.array([[sum(S[i, p] * I[j, p] for p in range(I.shape[1])) / tau for j in range(B)] for i in range(B)])
    sim = np.array([[(I[i] @ I[j] + S[i] @ S[j]) / 2 / tau for j in range(B)] for i in range(B)])
    T = np.array([[np.exp(sim[i, j]) / sum(np.exp(sim[i, m]) for m in range(B)) for j in range(B)] for i in range(B)])

    def ce_soft(l, t):
        log_sm = [l[j] - np.log(sum(np.exp(l[m]) for m in range(len(l)))) for j in range(len(l))]
        return -sum(t[j] * log_sm[j] for j in range(len(l)))

    total = 0.0
    for i in range(B):
        row = ce_soft(logits[i], T[i])  # spot i against all images
        col = ce_soft(logits[:, i], T[:, i])  # image i against all spots (row i of the transposes)
        total += 0.5 * (row + col)
    return total / B


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_loss_equals_its_formula(tau):
    rng = np.random.default_rng(3)
    I, S = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) * 1.5 + 0.3
    got = bleep_loss(torch.tensor(I, dtype=torch.float32), torch.tensor(S, dtype=torch.float32), tau)
    assert float(got) == pytest.approx(_loss_by_formula(I, S, tau), rel=1e-5)


def test_loss_is_not_symmetric_in_its_targets_by_accident():
    # T is a row softmax of a symmetric matrix, so Tᵀ is not T: the two halves differ in general
    rng = np.random.default_rng(0)
    I, S = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    swapped = bleep_loss(torch.tensor(S, dtype=torch.float32), torch.tensor(I, dtype=torch.float32))
    assert float(swapped) == pytest.approx(_loss_by_formula(S, I, 1.0), rel=1e-5)


# --- retrieval -----------------------------------------------------------------------------------------


def _polar(angles_deg, lengths):
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], 1) * np.asarray(lengths, dtype=np.float64)[:, None]


#: reference spots on a circle; query at 12°: cosine order 10° (idx 1), 0° (idx 0), 25° (idx 2), 45°, 90°, 180°
REF_ANGLES, REF_LENGTHS = [0, 10, 25, 45, 90, 180], [1.0, 2.0, 0.5, 1.0, 3.0, 1.0]
REF_EXPR = np.array([[1, 0], [2, 1], [3, 5], [4, 2], [10, 10], [-5, -5]], dtype=np.float64)


def _constructed():
    ref = ReferenceSet(torch.tensor(_polar(REF_ANGLES, REF_LENGTHS), dtype=torch.float32),
                       torch.tensor(REF_EXPR, dtype=torch.float32))
    query = _polar([12, 170], [1.5, 0.7])
    return ref, query


@pytest.mark.parametrize("chunks", [{}, {"query_chunk": 1, "reference_chunk": 2}])
def test_retrieval_finds_the_neighbours_in_cosine_order(chunks):
    ref, query = _constructed()
    sim, idx, dist = ref.search(torch.tensor(query, dtype=torch.float32), k=3, **chunks)
    assert idx.tolist() == [[1, 0, 2], [5, 4, 3]]  # 170°: 180° (10°), 90° (80°), 45° (125°)
    assert np.allclose(sim.numpy(), np.cos(np.deg2rad([[2, 12, 13], [10, 80, 125]])), atol=1e-6)
    # squared distances between the unnormalised embeddings
    want = ((_polar(REF_ANGLES, REF_LENGTHS)[idx.numpy()] - query[:, None]) ** 2).sum(-1)
    assert np.allclose(dist.numpy(), want, atol=1e-5)


@pytest.mark.parametrize("chunks", [{}, {"query_chunk": 1, "reference_chunk": 2}])
def test_the_three_aggregations_give_the_hand_computed_values(chunks):
    ref, query = _constructed()
    q = torch.tensor(query[:1], dtype=torch.float32)
    # simple: the expression of the nearest spot (10°)
    assert ref.predict(q, k=3, aggregate="simple", **chunks).tolist() == [[2.0, 1.0]]
    # average of 10°, 0° and 25°: ((2 + 1 + 3) / 3, (1 + 0 + 5) / 3)
    assert np.allclose(ref.predict(q, k=3, aggregate="average", **chunks).numpy(), [[2.0, 2.0]])
    # weighted: exp(-(d_j - d_1 + 1)) over unnormalised squared distances, normalised to sum 1
    e = _polar(REF_ANGLES, REF_LENGTHS)
    d = [((e[j] - query[0]) ** 2).sum() for j in (1, 0, 2)]
    w = np.array([np.exp(-(dj - d[0] + 1)) for dj in d])
    want = (w[:, None] * REF_EXPR[[1, 0, 2]]).sum(0) / w.sum()
    got = ref.predict(q, k=3, aggregate="weighted_average", **chunks).numpy()[0]
    assert np.allclose(got, want, atol=1e-5)
    assert not np.allclose(got, [2.0, 2.0])  # the weights matter here
    # k beyond the reference set: every reference spot
    assert np.allclose(ref.predict(q, k=50, aggregate="average", **chunks).numpy(), [REF_EXPR.mean(0)])


def test_an_extended_reference_adds_a_block_without_touching_the_cached_one():
    ref, query = _constructed()
    extra = ref.extended(torch.tensor([[0.0, -1.0]]), torch.tensor([[7.0, 7.0]]))
    assert len(ref) == 6 and len(extra) == 7 and extra.blocks[0] is ref.blocks[0]
    _, idx, _ = extra.search(torch.tensor([[0.1, -2.0]]), k=2, reference_chunk=4)
    assert idx.tolist()[0][0] == 6
    assert extra.predict(torch.tensor([[0.1, -2.0]]), k=1, aggregate="average").tolist() == [[7.0, 7.0]]


def _count_torch_calls(fn):
    calls = []

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(func)
            return func(*args, **(kwargs or {}))

    with Count():
        out = fn()
    return out, len(calls)


def test_retrieval_scales_by_matrix_products_not_loops_over_spots():
    rng = np.random.default_rng(0)
    M, Q, P, G, k = 4000, 400, 64, 50, 50
    emb = torch.tensor(rng.normal(size=(M, P)), dtype=torch.float32)
    expr = torch.tensor(rng.normal(size=(M, G)), dtype=torch.float32)
    queries = torch.tensor(rng.normal(size=(Q, P)), dtype=torch.float32)
    ref = ReferenceSet(emb, expr)
    t = time.perf_counter()
    pred = ref.predict(queries, k=k, aggregate="weighted_average")
    assert time.perf_counter() - t < 2.0
    # the number of torch operations does not grow with the number of reference spots or queries
    _, big = _count_torch_calls(lambda: ReferenceSet(emb, expr).predict(queries, k=k, aggregate="weighted_average"))
    few_emb, few_expr, few_queries = emb[:60], expr[:60], queries[:3]
    _, small = _count_torch_calls(lambda: ReferenceSet(few_emb, few_expr).predict(few_queries, k=k,
                                                                                  aggregate="weighted_average"))
    assert big == small < 100
    # and the result is the brute-force one
    e, q = emb.numpy().astype(np.float64), queries.numpy().astype(np.float64)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (e / np.linalg.norm(e, axis=1, keepdims=True)).T
    top = np.argsort(-cos, axis=1)[:, :k]
    _, idx, _ = ref.search(queries, k=k)
    assert (np.sort(idx.numpy(), 1) == np.sort(top, 1)).mean() > 0.999  # ties at float precision aside
    assert pred.shape == (Q, G) and torch.isfinite(pred).all()


# --- configuration: recipes, needs, options ---------------------------------------------------------------


def test_each_recipe_fills_its_defaults():
    for name, values in RECIPES.items():
        cfg = BLEEPConfig(recipe=name)
        assert {k: getattr(cfg, k) for k in values} == values
    triplex, original = BLEEPConfig(), BLEEPConfig(recipe="original")
    assert (triplex.backbone, triplex.projection_dim, triplex.lr, triplex.batch_size, triplex.epochs,
            triplex.patience, triplex.drop_last) == ("resnet18", 512, 1e-4, 128, 1000, 20, False)
    assert (original.backbone, original.projection_dim, original.lr, original.weight_decay, original.batch_size,
            original.drop_last, original.epochs) == ("resnet50", 256, 1e-3, 1e-3, 256, True, 150)
    assert (triplex.k, triplex.aggregate, triplex.match_on, triplex.prompts_in_reference, triplex.dropout,
            triplex.temperature) == (50, "average", "projected", False, 0.1, 1.0)


def test_an_explicit_field_wins_over_the_recipe():
    cfg = BLEEPConfig(recipe="original", lr=5e-4, backbone="resnet18")
    assert (cfg.lr, cfg.backbone, cfg.projection_dim, cfg.batch_size) == (5e-4, "resnet18", 256, 256)
    assert BLEEPConfig(patience=0).patience == 0 and BLEEPConfig(drop_last=True).drop_last is True


def test_an_unknown_recipe_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError) as exc:
        BLEEPConfig(recipe="paper")
    assert "\n" not in str(exc.value) and "methods.bleep.recipe" in str(exc.value) and "'paper'" in str(exc.value)
    with pytest.raises(ConfigError, match="methods.bleep.recipe"):  # through the harness's settings
        _plan(tmp_path, recipe="paper")


def test_needs_and_patches_follow_the_config():
    assert bleep_needs(BLEEPConfig()) == {"expression", "image_patches"}
    assert bleep_needs(BLEEPConfig(backbone="frozen")) == {"expression", "image_features"}
    (request,) = bleep_patches(BLEEPConfig())
    assert (request.kind, request.size_um, request.out_px) == ("spot", 112.0, 224)


def test_unknown_options_and_the_unprojected_dimension_are_config_errors(tmp_path):
    for bad in ({"aggregate": "median"}, {"match_on": "raw"}, {"backbone": "no_such_net"}, {"k": 0}):
        with pytest.raises(ConfigError, match=f"methods.bleep.{next(iter(bad))}"):
            BLEEP(BLEEPConfig(**{**TINY, **bad}))
    with pytest.raises(ConfigError, match="projection_dim=96"):  # test_resnet gives 96-d features, P = 16
        _fit(tmp_path, match_on="unprojected", epochs=1)


# --- the method on the synthetic dataset ---------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_loss_decreases(tmp_path, variant):
    method, *_ = _fit(tmp_path, **{**VARIANTS[variant], "epochs": 5, "lr": 1e-3, "patience": 0})
    losses = [r["train_loss"] for r in method.history]
    assert len(losses) == 5 and losses[-1] < 0.9 * losses[0] and np.isfinite(losses).all()
    assert all("val_loss" in r for r in method.history)


@pytest.mark.parametrize("variant", VARIANTS)
def test_end_to_end_with_resolved_settings_recorded(tmp_path, variant):
    settings = {**VARIANTS[variant], "epochs": 1}
    plan = _plan(tmp_path, **settings)
    execute(plan, verbose=False)
    out = tmp_path / "run"
    res = pd.read_csv(out / "results.csv")
    assert len(res) == sum(len(f.test) for f in plan.folds) and np.isfinite(res["pcc"]).all()
    recorded = json.loads((out / "run.json").read_text())["methods"]["bleep"]
    recipe = RECIPES[settings.get("recipe", "triplex")]
    expected = {**recipe, **TINY, **settings}  # the recipe under what was set explicitly
    assert {k: recorded[k] for k in expected} == expected
    assert recorded["recipe"] == settings.get("recipe", "triplex")
    summary = json.loads(pd.read_csv(out / "fold_results.csv")["fit_summary"][0])
    assert summary["epochs_run"] == 1 and summary["reference_spots"] == 4 * 60  # train + val patients
    pred = anndata.read_h5ad(out / "predictions" / "bleep" / f"{res['slide'][0]}.h5ad").X
    assert (np.ptp(pred, axis=0) > 0).mean() > 0.9  # retrieved expression differs between spots (rare genes aside)


def test_finetune_is_not_applied_to_bleep(tmp_path):
    assert _plugins().methods.get("bleep").finetune is False
    assert BLEEP.supports_finetune()  # the class could: the spec's declaration is what stops it
    execute(_plan(tmp_path, finetune=True, backbone="frozen", epochs=1), verbose=False)
    res = pd.read_csv(tmp_path / "run" / "results.csv")
    assert len(res) and not res["finetuned"].any()


def test_the_reference_set_is_every_training_patient_spot_and_prompts_are_added_only_when_asked(tmp_path):
    method, store, fold, genes, train, val = _fit(tmp_path, backbone="frozen", epochs=1)
    ref = method.reference
    assert len(ref) == sum(s.n_spots for s in (*train, *val))
    assert np.array_equal(ref.blocks[0][2].numpy(), np.concatenate([s.expr for s in (*train, *val)]))

    prompts = np.array([3, 7, 11, 20])
    masked = store.slide(fold.test[0], genes).masked(prompts)
    assert method.reference_for(masked) is ref  # the default: the fold's reference set, unchanged
    pred = method.predict(masked)

    method.config = dataclasses.replace(method.config, prompts_in_reference=True)
    extended = method.reference_for(masked)
    assert len(extended) == len(ref) + len(prompts) and extended.blocks[0] is ref.blocks[0]
    assert np.array_equal(extended.blocks[1][2].numpy(), masked.prompt_expr)
    # the prompt spots take part in the search: a query at a prompt's embedding finds that prompt first
    prompt_emb = method._embed_spots(torch.tensor(masked.prompt_expr))
    _, idx, _ = extended.search(prompt_emb, k=1)
    assert idx[:, 0].tolist() == [len(ref) + j for j in range(len(prompts))]
    assert len(method.reference) == len(ref)  # the cached reference is untouched
    assert pred.shape == (masked.n_spots, len(genes))
