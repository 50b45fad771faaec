"""One small registry class for every kind of item (methods, datasets, splits, metrics, prompts, encoders).

Each entry remembers the plugin and the package that registered it, so listings show provenance. A
name registered by two plugins is kept aside as a conflict: listings show both, and only a run that
asks for that name fails, with a message naming both plugins. An unknown name gets "did you mean".
A lazily given factory that fails to import fails with the plugin's and the package's name.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterator

from stbench.errors import ConfigError, PluginError
from stbench.specs import resolve


@dataclass(frozen=True)
class Entry:
    spec: Any
    plugin: str
    package: str


class Registry:
    def __init__(self, kind: str):
        self.kind = kind  # singular noun used in messages: "method", "dataset", ...
        self._entries: dict[str, Entry] = {}
        #: names registered by more than one plugin: name -> every entry (none of them is usable)
        self.conflicts: dict[str, list[Entry]] = {}
        #: plugins that failed to load: name -> error; an unknown name mentions them
        self.failed_plugins: dict[str, str] = {}

    def add(self, spec: Any, plugin: str, package: str) -> None:
        name = spec.name
        entry = Entry(spec, plugin, package)
        if name in self.conflicts:
            self.conflicts[name].append(entry)
        elif name in self._entries:
            self.conflicts[name] = [self._entries.pop(name), entry]
        else:
            self._entries[name] = entry

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str, option: str = "") -> Entry:
        if name in self._entries:
            return self._entries[name]
        if name in self.conflicts:
            sides = " and ".join(f"plugin {e.plugin!r} ({e.package})" for e in self.conflicts[name])
            raise PluginError(f"{self.kind} {name!r} is registered by {sides}; uninstall one of them or block it "
                              f"with STBENCH_BLOCK_PLUGINS={self.conflicts[name][-1].plugin}")
        where = f" ({option})" if option else ""
        message = f"unknown {self.kind} {name!r}{where}"
        close = difflib.get_close_matches(name, self._entries, n=3, cutoff=0.5)
        if close:
            message += "; did you mean " + " or ".join(repr(c) for c in close) + "?"
        elif self._entries:
            message += f"; available: {', '.join(self.names())}"
        if self.failed_plugins:
            failed = ", ".join(f"{p} ({err})" for p, err in sorted(self.failed_plugins.items()))
            message += f"; plugins that failed to load and may provide it: {failed}"
        message += " (see 'stbench list')"
        raise ConfigError(message)

    def get(self, name: str, option: str = "") -> Any:
        return self.entry(name, option).spec

    def load(self, name: str, attr: str = "factory") -> Any:
        """The spec's ``attr`` (a factory or function), imported if it was given lazily as a string."""
        entry = self.entry(name)
        try:
            return resolve(getattr(entry.spec, attr))
        except (ImportError, AttributeError) as exc:
            missing = getattr(exc, "name", None)
            fix = f"install the missing package {missing!r}" if isinstance(exc, ModuleNotFoundError) and missing else "reinstall it"
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PluginError(f"{self.kind} {name!r} from plugin {entry.plugin!r} ({entry.package}) failed to import: "
                              f"{type(exc).__name__}: {first}; {fix}, or block the plugin with "
                              f"STBENCH_BLOCK_PLUGINS={entry.plugin}") from None

    def entries(self) -> list[tuple[str, Entry]]:
        return sorted(self._entries.items())
