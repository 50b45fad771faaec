"""One small registry class for every kind of item (methods, datasets, splits, metrics, prompts, encoders).

Each entry remembers the plugin and the package that registered it, so listings show provenance and a
duplicate name is an error that names both sides. An unknown name gets "did you mean".
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterator

from stbench.errors import ConfigError, PluginError


@dataclass(frozen=True)
class Entry:
    spec: Any
    plugin: str
    package: str


class Registry:
    def __init__(self, kind: str):
        self.kind = kind  # singular noun used in messages: "method", "dataset", ...
        self._entries: dict[str, Entry] = {}
        #: plugins that failed to load: name -> error; an unknown name mentions them
        self.failed_plugins: dict[str, str] = {}

    def add(self, spec: Any, plugin: str, package: str) -> None:
        name = spec.name
        if name in self._entries:
            other = self._entries[name]
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by plugin {other.plugin!r} ({other.package}) "
                f"and by plugin {plugin!r} ({package}); uninstall or block one of them "
                f"(STBENCH_BLOCK_PLUGINS=name)"
            )
        self._entries[name] = Entry(spec, plugin, package)

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

    def entries(self) -> list[tuple[str, Entry]]:
        return sorted(self._entries.items())
