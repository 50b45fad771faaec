"""Benchmark definitions: versioned YAML files in ``benchmarks/<name>/benchmark.yaml``.

``stbench run --dataset her2`` uses the ``her2`` definition; a dataset without a definition runs with the
:class:`~stbench.config.RunConfig` defaults. :func:`resolve_config` applies the precedence stated in
:mod:`stbench.config`.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Optional

from stbench import config as cfg

DEFINITION = "benchmark.yaml"
#: the ways of choosing a gene panel (keys of ``panel``); a config names one
PANEL_CHOICES = ("file", "hvg", "hmhvg", "top_expressed")


def definitions_dir() -> Path:
    return Path(str(importlib.resources.files("stbench_benchmarks")))


def available() -> list[str]:
    root = definitions_dir()
    return sorted(p.parent.name for p in root.glob(f"*/{DEFINITION}"))


def find(name: str) -> Optional[Path]:
    path = definitions_dir() / name / DEFINITION
    return path if path.exists() else None


def resolve_config(dataset: Optional[str] = None, config_file: Optional[str] = None,
                   sets: Optional[list[str]] = None, shorthands: Optional[dict] = None):
    """The resolved :class:`RunConfig` and the folder relative panel files are read from.

    ``dataset`` picks the benchmark definition of that name if there is one (else only sets
    ``dataset``); ``shorthands`` are CLI options such as ``{"prompt": {"ratio": 0.2}}`` that rank with
    ``--set``.
    """
    layers: list[tuple[str, dict]] = []
    base_dir: Optional[Path] = None
    name = dataset or cfg.RunConfig().dataset
    definition = find(name)
    if definition is not None:
        layers.append((f"benchmark definition {definition}", cfg.read_yaml(definition, "benchmark definition")))
        base_dir = definition.parent
    else:
        layers.append(("--dataset", {"dataset": name, "benchmark": name}))
    if config_file:
        path = Path(config_file)
        layers.append((f"config file {path}", cfg.read_yaml(path, "config file")))
        base_dir = base_dir if "panel" not in layers[-1][1] else path.parent
    if sets:
        layers.append(("--set", cfg.parse_set(sets)))
    if shorthands:
        layers.append(("command-line options", shorthands))
    merged: dict = {}
    for source, layer in layers:
        cfg.check_keys(layer, cfg.RunConfig, source)
        panel = layer.get("panel")
        if isinstance(panel, dict) and len(set(PANEL_CHOICES) & set(panel)) == 1:
            # a panel is a file or a computed gene set: a later layer choosing one replaces the others
            layer = {**layer, "panel": {**dict.fromkeys(PANEL_CHOICES), **panel}}
        if isinstance(layer.get("caveats"), list) and isinstance(merged.get("caveats"), list):
            # caveats add up: a config file cannot silently drop the benchmark's own
            layer = {**layer, "caveats": list(dict.fromkeys(merged["caveats"] + layer["caveats"]))}
        merged = cfg.merge(merged, layer)
    return cfg.build(cfg.RunConfig, merged, "resolved config"), base_dir


def panel_path(panel_file: str, base_dir: Optional[Path]) -> Path:
    """A config's ``panel.file``: absolute, or relative to the benchmark definition that named it."""
    path = Path(panel_file)
    return path if path.is_absolute() or base_dir is None else base_dir / path
