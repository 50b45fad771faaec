"""Numbers the papers report, beside the numbers reproduced here.

A benchmark definition may ship a ``published.yaml`` beside its ``benchmark.yaml``: the source (a paper,
or a third-party summary of one, labelled as such), the protocol the numbers were obtained under, the
mapping of its columns to ours, and one row per method with ``[mean, std]`` (std may be omitted).
``stbench leaderboard RUN_DIR --published`` shows them as their own rows, labelled, after ours: they are
never averaged with our rows, never picked as the best row, and the protocol differences are listed
under the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from stbench import config as cfg
from stbench.errors import ConfigError

FILE = "published.yaml"
KINDS = ("paper", "third-party summary")


@dataclass(frozen=True)
class Published:
    path: Path
    source: str
    kind: str
    protocol: dict
    rows: list  # dicts: method -> label, then "COL:mean"/"COL:std" in stbench column names

    def columns(self) -> list[str]:
        """The stbench columns these numbers report, in the file's order."""
        return list(dict.fromkeys(k.rsplit(":", 1)[0] for r in self.rows for k in r if k.endswith(":mean")))


def _pair(value, where: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), math.nan
    if isinstance(value, list) and len(value) in (1, 2) and all(isinstance(v, (int, float)) for v in value):
        return float(value[0]), float(value[1]) if len(value) == 2 else math.nan
    raise ConfigError(f"{where}: expected a number or [mean, std], got {value!r}")


def load(path: Path) -> Published:
    """Read and check one published.yaml."""
    data = cfg.read_yaml(path, "published numbers")
    for key in ("source", "kind", "protocol", "metrics", "rows"):
        if key not in data:
            raise ConfigError(f"{path}: missing key {key!r} (a published.yaml has source, kind, protocol, metrics, rows)")
    if data["kind"] not in KINDS:
        raise ConfigError(f"{path}: kind {data['kind']!r} is not one of {', '.join(KINDS)}")
    metrics = dict(data["metrics"])
    rows = []
    for i, entry in enumerate(data["rows"]):
        where = f"{path}, rows[{i}]"
        if "method" not in entry:
            raise ConfigError(f"{where}: missing 'method'")
        unknown = set(entry) - set(metrics) - {"method", "note"}
        if unknown:
            raise ConfigError(f"{where}: column(s) {', '.join(sorted(unknown))} are not in 'metrics' ({', '.join(metrics)})")
        row = {"method": str(entry["method"]), "note": entry.get("note", "")}
        for theirs, ours in metrics.items():
            if theirs in entry:
                row[f"{ours}:mean"], row[f"{ours}:std"] = _pair(entry[theirs], f"{where}, {theirs}")
        rows.append(row)
    return Published(path, str(data["source"]), str(data["kind"]), dict(data["protocol"]), rows)


def for_benchmark(name: str) -> Optional[Published]:
    """The published numbers shipped beside benchmark definition ``name``, if any."""
    from stbench.benchmark import definitions_dir

    path = definitions_dir() / name / FILE
    return load(path) if path.exists() else None


def label(published: Published, method: str) -> str:
    kind = "published" if published.kind == "paper" else "published, via a third-party summary"
    return f"{method} [{kind}]"


def protocol_lines(published: Published, here: dict) -> list[str]:
    """The source, and its protocol next to this table's, one line per aspect."""
    prompt = here.get("prompt", {})
    ours = {
        "normalisation": here.get("normalisation"),
        "split": f"{here.get('split')} (protocol level {here.get('protocol_level')})",
        "selection": "inner validation (training patients)",
        "scored_spots": "non-prompt spots (all spots in the *_all columns)",
        "prompts": f"{prompt.get('ratio')} {prompt.get('strategy')}",
        "panel": (here.get("panel") or {}).get("file") or "computed per fold",
    }
    lines = [f"Published rows: {published.source} ({published.kind}); never averaged with the rows above. "
             "Protocol differences (published → this table):"]
    for key, theirs in published.protocol.items():
        mine = ours.get(key, "see the header")
        lines.append(f"- {key.replace('_', ' ')}: {theirs} → here: {mine}")
    return lines
