"""Loading plugins: the built-ins from code, third parties from the ``stbench`` entry-point group.

Two pluggy behaviours are worked around here (see STYLE.md): a second plugin under a taken name would be
dropped silently, and a plain hook call stops at the first implementation that raises without naming
it. So every plugin is registered under an explicit name (a clash is reported), and every register
hook is called one implementation at a time with the plugin's name bound into ``register``.

A plugin that fails to import is named in a warning and in ``stbench plugins``; it breaks only a run
that asks for something it would have provided (the unknown-name error mentions it).

Environment switches: ``STBENCH_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry points;
``STBENCH_BLOCK_PLUGINS=a,b`` skips the named plugins.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import pluggy

import stbench
from stbench import hookspecs
from stbench.registry import Registry

ENTRY_POINT_GROUP = "stbench"

#: built-in plugins, registered from code in this order
BUILTIN_PLUGINS = (
    "stbench.builtin",
    "stbench_plugins.synthetic",
    "stbench_plugins.her2",
    "stbench_plugins.visium",
    "stbench_plugins.anndata_files",
    "stbench_plugins.hest",
    "stbench_plugins.mean",
    "stbench_plugins.prompt_knn",
    "stbench_plugins.ridge",
    "stbench_plugins.phg2st",
    "stbench_plugins.hyperst",
    "stbench_plugins.triplex",
    "stbench_plugins.stnet",
    "stbench_plugins.bleep",
    "stbench_plugins.hefeat",
    "stbench_plugins.timm_encoders",
)

#: hook name -> registry attribute of :class:`Plugins`
KINDS = {
    "stbench_register_methods": "methods",
    "stbench_register_datasets": "datasets",
    "stbench_register_splits": "splits",
    "stbench_register_metrics": "metrics",
    "stbench_register_prompts": "prompts",
    "stbench_register_encoders": "encoders",
}


@dataclass
class PluginInfo:
    name: str
    module: str
    package: str
    error: Optional[str] = None
    registered: dict = field(default_factory=dict)  # kind -> [names]

    @property
    def ok(self) -> bool:
        return self.error is None


class Plugins:
    """The loaded plugins and one registry per kind of item."""

    def __init__(self):
        self.pm = pluggy.PluginManager("stbench")
        self.pm.add_hookspecs(hookspecs)
        self.methods = Registry("method")
        self.datasets = Registry("dataset")
        self.splits = Registry("split")
        self.metrics = Registry("metric")
        self.prompts = Registry("prompt strategy")
        self.encoders = Registry("encoder")
        self.infos: dict[str, PluginInfo] = {}

    def registries(self) -> dict[str, Registry]:
        return {kind: getattr(self, kind) for kind in KINDS.values()}

    # -- loading -------------------------------------------------------------------------------
    def _fail(self, info: PluginInfo, error: str) -> None:
        info.error = error
        self.infos[info.name] = info
        for registry in self.registries().values():
            registry.failed_plugins[info.name] = error
        warnings.warn(f"plugin {info.name!r} ({info.package}) failed to load: {error}", stacklevel=3)

    def add_module(self, name: str, module, package: str, module_path: str = "") -> None:
        info = PluginInfo(name=name, module=module_path or getattr(module, "__name__", name), package=package)
        if name in self.infos or self.pm.has_plugin(name):
            # the first keeps the name; the second is reported as failed, and nothing else breaks
            other = self.infos.get(name)
            info.name = f"{name} ({package})"
            self._fail(info, f"another plugin is already named {name!r} ({other.module if other else '?'}, "
                             f"{other.package if other else '?'}); rename the entry point of one of them")
            return
        try:
            self.pm.register(module, name=name)
        except Exception as exc:  # pluggy validation errors: wrong hook signature, unknown hook
            self._fail(info, f"{type(exc).__name__}: {exc}")
            return
        self.infos[name] = info

    def collect(self) -> None:
        """Call every register hook, one plugin at a time, and fill the registries."""
        for hook_name, kind in KINDS.items():
            registry = getattr(self, kind)
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                info = self.infos[impl.plugin_name]
                if not info.ok:
                    continue

                def register(spec, _info=info, _registry=registry, _kind=kind):
                    _registry.add(spec, _info.name, _info.package)
                    _info.registered.setdefault(_kind, []).append(spec.name)

                try:
                    impl.function(register=register)
                except Exception as exc:
                    self._fail(info, f"{hook_name} raised {type(exc).__name__}: {exc}")


def _blocked() -> set[str]:
    return {p.strip() for p in os.environ.get("STBENCH_BLOCK_PLUGINS", "").split(",") if p.strip()}


def _entry_points():
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def load_plugins(builtins=BUILTIN_PLUGINS, entry_points: Optional[bool] = None) -> Plugins:
    """Load the built-in plugins and (unless disabled) the installed third-party ones."""
    if entry_points is None:
        entry_points = not os.environ.get("STBENCH_DISABLE_PLUGIN_AUTOLOAD")
    plugins = Plugins()
    blocked = _blocked()
    builtin_package = f"stbench {stbench.__version__}"
    for module_path in builtins:
        name = module_path.rsplit(".", 1)[-1] if module_path.startswith("stbench_plugins.") else module_path
        if name in blocked:
            continue
        info = PluginInfo(name=name, module=module_path, package=builtin_package)
        try:
            module = importlib.import_module(module_path)
        except Exception as exc:
            plugins._fail(info, f"{type(exc).__name__}: {exc}")
            continue
        plugins.add_module(name, module, builtin_package, module_path)
    if entry_points:
        for ep in _entry_points():
            if ep.name in blocked:
                continue
            dist = getattr(ep, "dist", None)
            package = f"{dist.name} {dist.version}" if dist is not None else "unknown package"
            info = PluginInfo(name=ep.name, module=ep.value, package=package)
            try:
                module = ep.load()
            except Exception as exc:
                plugins._fail(info, f"{type(exc).__name__}: {exc}")
                continue
            plugins.add_module(ep.name, module, package, ep.value)
    plugins.collect()
    return plugins


_LOADED: Optional[Plugins] = None


def get_plugins() -> Plugins:
    """The process-wide plugin set, loaded on first use."""
    global _LOADED
    if _LOADED is None:
        _LOADED = load_plugins()
    return _LOADED


def reset_plugins() -> None:
    """Forget the loaded plugins (tests use this after faking entry points)."""
    global _LOADED
    _LOADED = None
