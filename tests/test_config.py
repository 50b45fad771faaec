"""Config precedence, strict keys with suggestions, YAML errors."""

import pytest

from stbench import config as cfg
from stbench.benchmark import available, resolve_config
from stbench.errors import ConfigError


def test_benchmarks_ship_with_the_package():
    assert {"her2", "her2_images", "synthetic"} <= set(available())


def test_her2_images_declares_the_section_level_protocol():
    conf, base = resolve_config("her2_images")
    assert (conf.dataset, conf.split, conf.protocol_level) == ("her2", "leave_one_section_out", "section")
    assert (base / conf.panel.file).resolve() == (base.parent / "her2" / "her2st_785.txt").resolve()


def test_precedence_defaults_benchmark_file_set_flags(tmp_path):
    conf, base = resolve_config("her2")
    assert conf.dataset == "her2" and conf.panel.file == "her2st_785.txt" and (base / "her2st_785.txt").exists()
    assert conf.prompt.ratio == 0.1 and conf.seed == 0 and conf.metrics == cfg.DEFAULT_METRICS  # defaults kept
    f = tmp_path / "c.yaml"
    f.write_text("seed: 3\nprompt:\n  ratio: 0.2\n")
    conf, _ = resolve_config("her2", str(f))
    assert (conf.seed, conf.prompt.ratio, conf.prompt.strategy) == (3, 0.2, "random")
    conf, _ = resolve_config("her2", str(f), ["seed=4", "prompt.strategy=poisson_disc"])
    assert (conf.seed, conf.prompt.ratio, conf.prompt.strategy) == (4, 0.2, "poisson_disc")
    conf, _ = resolve_config("her2", str(f), ["seed=4"], {"seed": 5, "prompt": {"ratio": 0.3}})
    assert (conf.seed, conf.prompt.ratio) == (5, 0.3)


def test_a_later_panel_choice_replaces_the_benchmark_panel():
    conf, _ = resolve_config("her2", sets=["panel.hvg=200"])
    assert conf.panel.hvg == 200 and conf.panel.file is None


def test_dataset_without_definition_uses_defaults():
    conf, base = resolve_config("mydata")
    assert conf.dataset == "mydata" and base is None and conf.split == "leave_one_patient_out"


def test_unknown_key_names_the_layer_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"--set: unknown config key 'prompt.ratoi'; did you mean 'ratio'"):
        resolve_config("synthetic", sets=["prompt.ratoi=0.2"])
    f = tmp_path / "c.yaml"
    f.write_text("seeds: 1\n")
    with pytest.raises(ConfigError, match=rf"config file {f}: unknown config key 'seeds'; did you mean 'seed'"):
        resolve_config("synthetic", str(f))


def test_exponent_without_a_dot_is_a_float():
    conf, _ = resolve_config("synthetic", sets=["prompt.ratio=1e-1"])
    assert conf.prompt.ratio == 0.1


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="key 'seed': expected int"):
        resolve_config("synthetic", sets=["seed=abc"])


def test_bad_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("seed: 1\nprompt: [ratio: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line \d+"):
        resolve_config("synthetic", str(f))
    g = tmp_path / "list.yaml"
    g.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        resolve_config("synthetic", str(g))


def test_parse_set_types_and_nesting():
    assert cfg.parse_set(["a.b=1", "a.c=x", "d=0.5", "e=true", "f=null"]) == {"a": {"b": 1, "c": "x"}, "d": 0.5, "e": True, "f": None}
    with pytest.raises(ConfigError, match="key=value"):
        cfg.parse_set(["novalue"])


def test_build_method_config_rejects_unknown_fields():
    from stbench_plugins.prompt_knn import PromptKnnConfig

    assert cfg.build(PromptKnnConfig, {"k": 3}, "methods.prompt_knn").k == 3
    with pytest.raises(ConfigError, match="methods.prompt_knn: unknown config key 'kk'; did you mean 'k'"):
        cfg.build(PromptKnnConfig, {"kk": 3}, "methods.prompt_knn")
