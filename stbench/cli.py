"""The ``stbench`` command line.

User mistakes (:class:`~stbench.errors.StbenchError`) print one line and exit with status 2, without a
traceback; an interrupted run exits 130 and resumes when the same command is run again.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import warnings
from pathlib import Path
from typing import Optional

from stbench.errors import StbenchError

LIST_KINDS = ("methods", "datasets", "splits", "metrics", "prompts", "encoders", "plugins")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stbench", description="Benchmark harness for spatial gene expression from H&E histology.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run methods on a benchmark and write results")
    run.add_argument("--methods", required=True, help="comma-separated method names (stbench list methods)")
    run.add_argument("--dataset", help="dataset / benchmark definition name (default: synthetic)")
    run.add_argument("--data-dir", help="the dataset's folder (default: $STBENCH_DATA/<folder> or the user cache)")
    run.add_argument("--out", help="run directory (default: runs/<dataset>-<timestamp>); rerun into it to resume")
    run.add_argument("--config", help="a YAML file of config keys (overrides the benchmark definition)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config key, e.g. --set methods.prompt_knn.k=4 (repeatable)")
    run.add_argument("--prompt-ratio", type=float, help="share of each test slide's spots given as prompts (benchmark default 0.1)")
    run.add_argument("--prompt-strategy", help="prompt strategy (benchmark default random; stbench list prompts)")
    run.add_argument("--seed", type=int, help="seed for splits, prompts and training (benchmark default 0)")
    run.add_argument("--encoder", help="image encoder for methods that need image features (default hefeat; stbench list encoders)")
    run.add_argument("--encoder-weights", metavar="PATH|random",
                     help="the encoder's checkpoint file, or 'random' for random initialisation (results are labelled)")
    run.add_argument("--finetune", action="store_true", default=None,
                     help="fine-tune a copy of each fold's model on each test slide's prompts (METHODS.md §9.1)")
    run.add_argument("--device", help="torch device for methods: cpu, cuda, cuda:N (default: cuda when present, else cpu)")
    run.add_argument("--save-models", action="store_true",
                     help="keep each fold's fitted model under RUN_DIR/models/<method>/fold<k> (for stbench predict)")
    run.add_argument("--fit-all", action="store_true",
                     help="with --save-models: also fit one model per method on every section (models/<method>/all)")
    run.add_argument("--quiet", action="store_true", help="no progress on stderr (warnings and errors only)")

    ls = sub.add_parser("list", help="list registered methods, datasets, splits, metrics, prompts, encoders, plugins")
    ls.add_argument("kind", nargs="?", choices=LIST_KINDS, help="what to list (default: everything)")

    sub.add_parser("plugins", help="list plugins, what each registered, and those that failed to load")

    lb = sub.add_parser("leaderboard", help="a table of mean ± std over folds from run directories")
    lb.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    lb.add_argument("--format", default="md", help="md, csv, latex or html (default md)")
    lb.add_argument("--output", help="write the table (every column) to this file (default: print the headline columns)")
    lb.add_argument("--all-columns", action="store_true", help="print every column, not only the headline ones")

    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", metavar="COMMAND")
    check = dsub.add_parser("check", help="a QC summary of a dataset")
    check.add_argument("name")
    check.add_argument("--data-dir")
    check.add_argument("--out", help="folder for the overview PNGs (default runs/qc-NAME)")
    return p


def _shorthands(args) -> dict:
    out: dict = {}
    if args.prompt_ratio is not None:
        out.setdefault("prompt", {})["ratio"] = args.prompt_ratio
    if args.prompt_strategy is not None:
        out.setdefault("prompt", {})["strategy"] = args.prompt_strategy
    if args.seed is not None:
        out["seed"] = args.seed
    if args.data_dir is not None:
        out["data_dir"] = args.data_dir
    if args.finetune:
        out["finetune"] = {"enabled": True}
    if args.encoder is not None:
        out.setdefault("images", {})["encoder"] = args.encoder
    if args.device is not None:
        out["device"] = args.device
    if args.encoder_weights is not None:
        out.setdefault("images", {})["encoder_weights"] = args.encoder_weights
    return out


def cmd_run(args) -> int:
    from stbench import leaderboard
    from stbench.benchmark import resolve_config
    from stbench.plugins import get_plugins
    from stbench.run import execute, resolve_plan

    plugins = get_plugins()
    config, base_dir = resolve_config(args.dataset, args.config, args.set, _shorthands(args))
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))  # unique, in order
    out = Path(args.out) if args.out else Path("runs") / f"{config.benchmark}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    plan = resolve_plan(config, methods, out, plugins, base_dir, save_models=args.save_models, fit_all=args.fit_all)
    if not args.quiet:
        print(f"stbench: {', '.join(methods)} on {config.benchmark} ({len(plan.sections)} sections, "
              f"{len(plan.folds)} folds of {config.split}); writing to {out}", file=sys.stderr)
    outcome = execute(plan, verbose=not args.quiet)
    if outcome.units_skipped:
        print(f"stbench: {outcome.units_skipped} method x fold units were already complete and were skipped", file=sys.stderr)
    rows, meta = leaderboard.summary_rows([out])
    print(leaderboard.render(rows, meta, plugins, "md", compact=True))
    print(f"results: {out / 'results.csv'} (per slide), {out / 'fold_results.csv'} (per fold), predictions in {out / 'predictions'}")
    return 0


def cmd_list(args) -> int:
    from tabulate import tabulate

    from stbench.plugins import get_plugins

    plugins = get_plugins()
    if args.kind == "plugins":
        return cmd_plugins(args)
    kinds = [args.kind] if args.kind else [k for k in LIST_KINDS if k != "plugins"]
    for kind in kinds:
        registry = getattr(plugins, kind)
        rows = [[name, getattr(e.spec, "description", ""), e.plugin, e.package] for name, e in registry.entries()]
        for name, entries in sorted(registry.conflicts.items()):
            rows.append([name, "CONFLICT: registered by " + " and ".join(e.plugin for e in entries) + "; unusable until one is removed",
                         ", ".join(e.plugin for e in entries), ", ".join(e.package for e in entries)])
        print(f"{kind} ({len(rows)})")
        # wrapped to fit 120 columns
        print(tabulate(rows, headers=["name", "description", "plugin", "package"], tablefmt="simple",
                       maxcolwidths=[22, 62, 14, 14]) if rows else "  (none registered)")
        print()
    return 0


def cmd_plugins(args) -> int:
    from tabulate import tabulate

    from stbench.plugins import get_plugins

    plugins = get_plugins()
    rows = []
    conflicts = {name for registry in plugins.registries().values() for name in registry.conflicts}
    for info in plugins.infos.values():
        provided = "; ".join(f"{k}: {', '.join(n + (' (CONFLICT)' if n in conflicts else '') for n in v)}"
                             for k, v in info.registered.items()) or "-"
        rows.append([info.name, info.package, "ok" if info.ok else "FAILED", provided if info.ok else info.error])
    # wrapped to fit 120 columns
    print(tabulate(rows, headers=["plugin", "package", "status", "registered / error"], tablefmt="simple",
                   maxcolwidths=[18, 24, 6, 62]))
    if conflicts:
        print(f"\nnames registered by more than one plugin (a run that asks for one fails): {', '.join(sorted(conflicts))}")
    return 0


def cmd_leaderboard(args) -> int:
    from stbench import atomic, leaderboard
    from stbench.plugins import get_plugins

    table, meta = leaderboard.summary_rows([Path(d) for d in args.run_dirs])
    compact = not args.output and not args.all_columns
    text = leaderboard.render(table, meta, get_plugins(), args.format, compact=compact)
    if args.output:
        atomic.write_text(args.output, text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def cmd_data_check(args) -> int:
    from stbench.datacheck import check_dataset

    def progress(message: str) -> None:
        # one overwritten line on a terminal, one line per section in logs
        if sys.stderr.isatty():
            print(f"\r\033[Kstbench: data check: {message}", end="", file=sys.stderr, flush=True)
        else:
            print(f"stbench: data check: {message}", file=sys.stderr, flush=True)

    try:
        report = check_dataset(args.name, args.data_dir, args.out, progress=progress)
    finally:
        if sys.stderr.isatty():
            print("\r\033[K", end="", file=sys.stderr, flush=True)
    print(report)
    return 0


def _formatwarning(message, category, filename, lineno, line=None):
    # one line, no source location: these warnings are addressed to users, not developers
    return f"stbench: warning: {message}\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    original_format, warnings.formatwarning = warnings.formatwarning, _formatwarning
    handlers = {"run": cmd_run, "list": cmd_list, "plugins": cmd_plugins, "leaderboard": cmd_leaderboard}
    try:
        if args.command == "data":
            if args.data_command != "check":
                parser.parse_args(["data", "--help"])
            return cmd_data_check(args)
        if args.command not in handlers:
            parser.print_help()
            return 2
        return handlers[args.command](args)
    except StbenchError as exc:
        print(f"stbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stbench: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `stbench list | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    finally:
        warnings.formatwarning = original_format


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
