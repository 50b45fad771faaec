"""HyperST: the plugin end to end, its LoRA placement, shared backbone, niches, variants and the method API
changes it brought (a method's own backbone, patches as a declared input, needs from the config)."""

import copy
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from stbench.benchmark import resolve_config
from stbench.cli import main
from stbench.plugins import load_plugins
from stbench.run import SlideStore, resolve_plan
from stbench_plugins.hyperst import HyperSTConfig, hyperst_needs
from stbench_plugins.hyperst.model import HyperST, HyperSTNet, build_backbone

TINY = dict(backbone="test_vit", backbone_weights="random", input_px=32, lora_rank=2, lora_blocks=1,
            dim=16, epochs=2, batch_size=16)
DATA = ["--set", "dataset_options.spots_per_section=60", "--set", "dataset_options.n_patients=3"]


def _sets(**extra):
    out = []
    for k, v in {**TINY, **extra}.items():
        out += ["--set", f"methods.hyperst.{k}={v}"]
    return out + DATA


@pytest.mark.parametrize("lattice", ["square", "hex"])
def test_hyperst_runs_on_both_lattices(tmp_path, lattice):
    out = tmp_path / lattice
    assert main(["run", "--methods", "hyperst", "--out", str(out), "--quiet", *_sets(),
                 "--set", f"dataset_options.lattice={lattice}"]) == 0
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 6 and res["pcc"].notna().all() and np.isfinite(res["mae"]).all()
    summary = json.loads(pd.read_csv(out / "fold_results.csv")["fit_summary"][0])
    assert summary["backbone"] == "test_vit" and summary["epochs_run"] == 2


def test_uni_without_weights_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("STBENCH_UNI_WEIGHTS", raising=False)
    out = tmp_path / "r"
    assert main(["run", "--methods", "hyperst", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "huggingface.co/MahmoodLab/UNI" in err and "STBENCH_UNI_WEIGHTS" in err
    assert "methods.hyperst.backbone_weights=PATH" in err and not out.exists()


# --- the network ---------------------------------------------------------------------------------------


def test_lora_sits_only_on_the_named_blocks_and_the_rest_of_the_backbone_is_frozen():
    cfg = HyperSTConfig(**{**TINY, "lora_blocks": 2, "lora_rank": 4})
    backbone, weights_id = build_backbone(cfg)
    assert weights_id == "random-init"
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    blocks = {n.split(".")[1] for n in trainable}
    assert blocks == {"4", "5"}  # the last two of test_vit's 6 blocks
    assert all(".attn.qkv." in n for n in trainable)
    # rank 4 on a 64 -> 192 qkv: A (4 x 64) + B (192 x 4) per block
    assert sum(backbone.get_parameter(n).numel() for n in trainable) == 2 * (4 * 64 + 192 * 4)
    net = HyperSTNet(cfg, backbone.num_features, n_genes=5, backbone=backbone)
    heads = sum(p.numel() for n, p in net.named_parameters() if p.requires_grad and not n.startswith("backbone."))
    frozen_heads = [n for n, p in net.named_parameters() if not p.requires_grad and not n.startswith("backbone.")]
    assert heads > 0 and frozen_heads == []  # projectors, encoders, decoder and the scalars all train
    for name in ("log_alpha_img", "log_alpha_gene", "log_curvature", "log_logit_scale"):
        assert net.get_parameter(name).requires_grad


def test_one_backbone_serves_spot_and_niche(monkeypatch):
    cfg = HyperSTConfig(**TINY)
    backbone, _ = build_backbone(cfg)
    net = HyperSTNet(cfg, backbone.num_features, n_genes=5, backbone=backbone).eval()
    calls = []
    backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    spot, niche = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    i_s, i_n = net.image_features(spot, niche)
    assert calls == [6] and i_s.shape == i_n.shape == (3, 16)  # one module, one pass over both
    assert sum(isinstance(m, type(backbone)) for m in net.modules()) == 1


def test_loss_decreases_over_a_few_steps():
    torch.manual_seed(0)
    cfg = HyperSTConfig(**{**TINY, "backbone": "frozen", "dim": 32})
    net = HyperSTNet(cfg, in_dim=8, n_genes=6)
    x = torch.randn(32, 8)
    xn = x + 0.1 * torch.randn(32, 8)
    y = x[:, :6] * 2 + 3
    yn = xn[:, :6] * 2 + 3
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        i_s, i_n = net.image_features(x, xn)
        g_s, g_n = net.gene_features(y, yn)
        out = net.losses(i_s, i_n, g_s, g_n, net.decode(i_s, i_n), y)
        out["total"].backward()
        opt.step()
        losses.append(float(out["total"].detach()))
        assert all(torch.isfinite(v) for v in out.values())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("variant", ["hyperst", "euclidean", "meru", "clip"])
@pytest.mark.parametrize("flags", [{}, {"hea": False}, {"hca": False, "hea": False}, {"hea_gene_image": False},
                                   {"reverse_entailment": True}, {"decoder_input": "spot"}, {"hea_form": "paper"}])
def test_every_variant_and_ablation_gives_finite_losses(variant, flags):
    cfg = HyperSTConfig(**{**TINY, "backbone": "frozen", "variant": variant, **flags})
    net = HyperSTNet(cfg, in_dim=8, n_genes=4)
    x = torch.randn(6, 8)
    i_s, i_n = net.image_features(x, x + 0.1)
    g_s, g_n = net.gene_features(torch.rand(6, 4), torch.rand(6, 4))
    out = net.losses(i_s, i_n, g_s, g_n, net.decode(i_s, i_n), torch.rand(6, 4))
    assert torch.isfinite(out["total"])
    if not flags.get("hea", True):
        assert float(out["hea"].detach()) == 0.0
    if flags.get("hca") is False:
        assert float(out["hca"].detach()) == 0.0 and float(out["total"].detach()) == pytest.approx(float(out["pred"].detach()))


def test_variants_differ_in_geometry():
    cfgs = {v: HyperSTConfig(**{**TINY, "backbone": "frozen", "variant": v}) for v in ("hyperst", "clip")}
    torch.manual_seed(0)
    a = HyperSTNet(cfgs["hyperst"], 8, 4)
    torch.manual_seed(0)
    b = HyperSTNet(cfgs["clip"], 8, 4)
    x = torch.randn(5, 8)
    i_s, _ = a.image_features(x, x)
    lifted_h = a._lift(i_s, a.log_alpha_img)
    lifted_e = b._lift(i_s, b.log_alpha_img)
    assert not torch.allclose(lifted_h, lifted_e)  # expmap0 in the hyperbolic variant only
    torch.testing.assert_close(lifted_e, i_s * a.log_alpha_img.exp())


# --- the method API it brought ------------------------------------------------------------------------


def test_needs_follow_the_config():
    assert "image_patches" in hyperst_needs(HyperSTConfig()) and "image_features" not in hyperst_needs(HyperSTConfig())
    frozen = hyperst_needs(HyperSTConfig(backbone="frozen"))
    assert {"image_features", "niche_features"} <= frozen and "image_patches" not in frozen


def _plan(tmp_path, methods, **hyperst):
    sets = [f"methods.hyperst.{k}={v}" for k, v in {**TINY, **hyperst}.items()]
    sets += ["dataset_options.spots_per_section=60", "dataset_options.n_patients=3"]
    conf, base = resolve_config("synthetic", sets=sets)
    return resolve_plan(conf, methods, tmp_path / "run", load_plugins(entry_points=False), base)


def test_a_run_prepares_only_what_the_chosen_variant_reads(tmp_path):
    trainable = _plan(tmp_path, ["hyperst"])
    assert [r.name for r in trainable.patch_requests] == ["niche-112um-32px", "spot-112um-32px"]
    assert trainable.encoder is None  # no frozen features for a LoRA-tuned backbone
    frozen = _plan(tmp_path, ["hyperst"], backbone="frozen")
    assert frozen.patch_requests == [] and frozen.encoder is not None
    assert {s.kind for s in frozen.patch_specs} == {"spot", "niche"}


def test_a_methods_own_backbone_beside_the_run_wide_encoder(tmp_path):
    plan = _plan(tmp_path, ["hyperst", "phg2st"])  # HyperST's ViT and PHG2ST's frozen hefeat features
    assert plan.encoder.name == "hefeat" and plan.patch_requests
    assert {s.kind for s in plan.patch_specs} == {"spot", "neighbour"}


def test_patches_are_attached_read_only_and_not_copied_by_fine_tuning(tmp_path):
    plan = _plan(tmp_path, ["hyperst"])
    store = SlideStore(plan)
    store.prepare_patches()
    slide = store.slide("P1S1", store.panel(plan.folds[0]))
    patches = slide.patches["spot-112um-32px"]
    assert isinstance(patches.patches, np.memmap) and not patches.patches.flags.writeable
    with pytest.raises(ValueError):
        patches.patches[0, 0, 0, 0, 0] = 1
    masked = slide.masked(np.array([0, 1]))
    assert masked.patches["spot-112um-32px"] is patches
    assert copy.deepcopy(masked).patches["spot-112um-32px"] is patches  # the pixels are never copied
    assert slide.niche_expr is not None and masked.niche_expr is None  # the niche profile is truth too


def test_fine_tuning_uses_the_prediction_loss_on_prompts(tmp_path):
    out = tmp_path / "ft"
    assert main(["run", "--methods", "hyperst", "--out", str(out), "--quiet", "--finetune", *_sets(epochs=1)]) == 0
    assert pd.read_csv(out / "results.csv")["finetuned"].all()


def test_best_checkpoint_option_and_early_stopping(tmp_path):
    plan = _plan(tmp_path, ["hyperst"], epochs=6, patience=1, lr=0.0, checkpoint="best")
    store = SlideStore(plan)
    store.prepare_patches()
    fold = plan.folds[0]
    genes = store.panel(fold)
    from stbench.method import FitContext

    method = HyperST(dataclasses.replace(plan.methods["hyperst"]))
    method.fit([store.slide(s, genes) for s in fold.train], [store.slide(s, genes) for s in fold.val],
               FitContext(seed=0, genes=np.asarray(genes)))
    # lr 0: the validation loss never improves after the first epoch, so training stops after patience
    assert len(method.history) == 2 and all("val_loss" in h for h in method.history)
