"""Opening a dataset plugin from a resolved config: one place for its options and data folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from stbench import config as cfg
from stbench.errors import ConfigError


def open_dataset(plugins, name: str, options: Optional[dict] = None, data_dir=None, where: str = "option --dataset"):
    """The dataset ``name`` built from its plugin's factory, with ``options`` (the config's
    ``dataset_options``, checked against the plugin's options dataclass) and ``data_dir`` (None: the
    plugin looks at its environment variable and cache). ``where`` names the option in errors."""
    spec = plugins.datasets.get(name, where)
    if options and not spec.options:
        raise ConfigError(f"dataset {name} takes no dataset_options")
    built = cfg.build(spec.options, options or {}, "dataset_options") if spec.options else None
    return plugins.datasets.load(name)(Path(data_dir).expanduser() if data_dir else None, built)
