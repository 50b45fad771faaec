"""Commands implemented in other modules (stbench plot, stbench data fetch) are wired lazily: their module
is imported only when the command is used, a missing one breaks nothing else, and stbench list stays
free of matplotlib."""

import subprocess
import sys
import types

from stbench.cli import main


def _fake(name, builder, handler, calls):
    module = types.ModuleType(name)

    def add_arguments(parser):
        parser.add_argument("target")
        parser.add_argument("--genes")

    def run(args):
        calls.append((args.target, args.genes))
        return 0

    setattr(module, builder, add_arguments)
    setattr(module, handler, run)
    return module


def test_plot_and_fetch_are_dispatched_to_their_modules(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "stbench.plots", _fake("stbench.plots", "add_plot_arguments", "cmd_plot", calls))
    monkeypatch.setitem(sys.modules, "stbench.fetch", _fake("stbench.fetch", "add_fetch_arguments", "cmd_fetch", calls))
    assert main(["plot", "RUN", "--genes", "ERBB2"]) == 0
    assert main(["data", "fetch", "her2", "--genes", "x"]) == 0
    assert calls == [("RUN", "ERBB2"), ("her2", "x")]


def test_a_missing_module_is_one_line_and_breaks_no_other_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "stbench.fetch", None)  # importing it raises ImportError
    monkeypatch.setitem(sys.modules, "stbench.plots", None)
    assert main(["data", "fetch", "her2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'stbench data fetch' is not available" in err and "stbench.fetch" in err
    assert main(["plot", "RUN"]) == 2
    assert "'stbench plot' is not available" in capsys.readouterr().err
    assert main(["list", "methods"]) == 0
    assert "ridge" in capsys.readouterr().out


def test_list_imports_neither_the_plotting_nor_the_predict_modules():
    code = ("import sys; from stbench.cli import main; main(['list', 'methods']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'torch') "
            "or m in ('stbench.plots', 'stbench.fetch', 'stbench.predict', 'stbench.models', 'stbench.lattice')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
