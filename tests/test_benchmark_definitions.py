"""Every shipped benchmark definition resolves, and its published numbers load and name real metrics."""

import pytest

from stbench import benchmark, published
from stbench.plugins import load_plugins


@pytest.mark.parametrize("name", benchmark.available())
def test_every_definition_resolves(name):
    config, base = benchmark.resolve_config(name)
    assert config.benchmark == name and base.name == name
    plugins = load_plugins(entry_points=False)
    assert config.dataset in plugins.datasets and config.split in plugins.splits
    if config.panel.file:
        assert benchmark.panel_path(config.panel.file, base).exists()


@pytest.mark.parametrize("name", [n for n in benchmark.available() if published.for_benchmark(n)])
def test_published_numbers_name_metrics_the_run_computes(name):
    p = published.for_benchmark(name)
    config, _ = benchmark.resolve_config(name)
    columns = {k.rsplit(":", 1)[0] for row in p.rows for k in row if ":" in k}
    assert columns and columns <= set(config.metrics)


def test_hyperst_datasets_have_the_slides_of_hypersts_preprocessing():
    # METHODS.md §1.1: kidney NCBI692-714 (23), colorectum ZEN36-49 (14), lung MISC17-32 (16), skin NCBI460-526
    # without 460-468, 499-502, 511-514 and 523-526 (46)
    counts = {n: len(benchmark.resolve_config(f"hest_{n}")[0].dataset_options["ids"])
              for n in ("kidney", "colorectum", "lung", "skin")}
    assert counts == {"kidney": 23, "colorectum": 14, "lung": 16, "skin": 46}
    skin = benchmark.resolve_config("hest_skin")[0].dataset_options["ids"]
    assert "NCBI469" in skin and "NCBI468" not in skin and "NCBI499" not in skin and "NCBI522" in skin
    p = published.for_benchmark("hest_lung")
    assert p.kind == "third-party summary"
    assert {r["method"]: r["pcc@200_posthoc:mean"] for r in p.rows} == {"TRIPLEX": 0.393, "HyperST": 0.459}
    assert published.label(p, "HyperST") == "HyperST [published, via a third-party summary]"


def test_the_cscc_file_holds_the_cscc_columns_of_table_1():
    rows = {r["method"]: r for r in published.for_benchmark("cscc_hest").rows}
    assert (rows["PHG2ST"]["pcc:mean"], rows["TRIPLEX"]["mae:std"], rows["BLEEP"]["ccc:mean"]) == (0.479, 0.306, 0.170)
