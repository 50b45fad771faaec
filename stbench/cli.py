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


def _parser(argv: Optional[list[str]] = None) -> argparse.ArgumentParser:
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
    run.add_argument("--prompt-ratio", metavar="R[,R...]",
                     help="share of each test slide's spots given as prompts (benchmark default 0.1); several, "
                          "comma-separated, sweep them in one run (each fold fitted once, predicted at every ratio)")
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
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="where the method x fold units compute: local (this machine, default) or ray (a Ray "
                          "cluster; needs pip install \"stbench[ray]\")")
    run.add_argument("--jobs", type=int, metavar="N",
                     help="with --executor local: run N units at once, each in its own process (default 1)")
    run.add_argument("--ray-address", metavar="auto|HOST:PORT",
                     help="with --executor ray: the cluster to join (auto: the one 'ray start' runs on this machine; "
                          "default: a Ray instance of this run's own)")
    run.add_argument("--quiet", action="store_true", help="no progress on stderr (warnings and errors only)")

    ls = sub.add_parser("list", help="list registered methods, datasets, splits, metrics, prompts, encoders, plugins")
    ls.add_argument("kind", nargs="?", choices=LIST_KINDS, help="what to list (default: everything)")

    sub.add_parser("plugins", help="list plugins, what each registered, and those that failed to load")

    lb = sub.add_parser("leaderboard", help="a table of mean ± std over folds from run directories")
    lb.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    lb.add_argument("--format", default="md", help="md, csv, latex or html (default md)")
    lb.add_argument("--output", help="write the table (every column) to this file (default: print the headline columns)")
    lb.add_argument("--all-columns", action="store_true", help="print every column, not only the headline ones")
    lb.add_argument("--baseline", metavar="ROW",
                    help="also compare every row with this row (a method label of the table), slide by slide")
    lb.add_argument("--compare-on", default="pcc", metavar="METRIC",
                    help="the metric of the paired comparisons with the best row and --baseline (default pcc); "
                         "they are added to files and --all-columns output")
    lb.add_argument("--published", action="store_true",
                    help="add the numbers the papers report (the benchmark's published.yaml) as labelled rows")
    lb.add_argument("--study", action="store_true",
                    help="a protocol study: runs under different protocols, each row labelled by how its protocol differs")

    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", metavar="COMMAND")
    check = dsub.add_parser("check", help="a QC summary of a dataset")
    check.add_argument("name", help="a dataset (stbench list datasets) or a benchmark definition (e.g. cscc_hest)")
    check.add_argument("--data-dir")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key as for a run, e.g. --set dataset_options.where.organ=Skin")
    check.add_argument("--out", help="folder for the overview PNGs (default runs/qc-NAME)")

    pr = sub.add_parser("predict", help="apply a saved model (stbench run --save-models) to new slides or an H&E image")
    pr.add_argument("--model", required=True, metavar="MODEL_DIR", help="RUN_DIR/models/<method>/<fold k | all>")
    pr.add_argument("--dataset", help="predict sections of this dataset (stbench list datasets); counts are optional")
    pr.add_argument("--data-dir", help="the dataset's folder")
    pr.add_argument("--slides", help="comma-separated section names (default: every section the model can read)")
    pr.add_argument("--image", metavar="FILE", help="instead: a plain H&E image; spots are laid over its tissue")
    pr.add_argument("--mpp", type=float, help="with --image: the image's microns per pixel")
    pr.add_argument("--lattice", choices=("hex", "square"), help="with --image: spot lattice (default: the model's dataset's)")
    pr.add_argument("--prompts", metavar="FILE", help="raw counts of some spots, for methods that take prompts (CSV: "
                    "a 'spot' column [and 'slide'], then one column per gene)")
    pr.add_argument("--out", required=True, help="folder for <slide>.h5ad, <slide>.png and metrics.csv")
    pr.add_argument("--genes", help="comma-separated genes for the maps (default: best and worst, or most variable)")
    pr.add_argument("--encoder-weights", metavar="PATH",
                    help="the encoder checkpoint the model was trained with (default: the path the run used)")
    pr.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    pr.add_argument("--no-finetune", action="store_true",
                    help="do not fine-tune on a slide's prompt spots even if the model's run did")
    pr.add_argument("--no-maps", action="store_true", help="write no PNG maps")
    pr.add_argument("--quiet", action="store_true", help="no progress on stderr")

    # commands whose module builds its own arguments: imported only when the command is used, so
    # that 'stbench list' never pays for them (stbench.plots imports matplotlib when it draws)
    plot = sub.add_parser("plot", help="spot maps and PCC distributions of a run's predictions (PNG)")
    fetch = dsub.add_parser("fetch", help="download a dataset from its public source, with checksums")
    command = _command(argv)
    if command == ("plot",):
        _lazy_arguments(plot, *LAZY[("plot",)][:2])
    elif command == ("data", "fetch"):
        _lazy_arguments(fetch, *LAZY[("data", "fetch")][:2])
    else:  # not this command: accept anything, so its module need not be imported to build the parser
        for placeholder in (plot, fetch):
            placeholder.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


#: commands implemented in other modules: (module, argument builder, handler), imported on use
LAZY = {("plot",): ("stbench.plots", "add_plot_arguments", "cmd_plot"),
        ("data", "fetch"): ("stbench.fetch", "add_fetch_arguments", "cmd_fetch")}


def _command(argv: Optional[list[str]]) -> tuple:
    """The subcommand words of ``argv`` (``("data", "fetch")``, ``("plot",)``), options skipped."""
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    if words[:1] == ["data"]:
        return tuple(words[:2])
    return tuple(words[:1])


def _lazy_module(module: str, command: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise StbenchError(f"'stbench {command}' is not available: its module {module} cannot be imported "
                           f"({str(exc).splitlines()[0]}); reinstall stbench") from None


def _lazy_arguments(parser: argparse.ArgumentParser, module: str, builder: str) -> None:
    command = parser.prog.split(" ", 1)[1] if " " in parser.prog else parser.prog
    getattr(_lazy_module(module, command), builder)(parser)


def _ratios(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StbenchError(f"--prompt-ratio {text!r}: give a number, or comma-separated numbers such as 0.05,0.1,0.2") from None


def _shorthands(args) -> dict:
    out: dict = {}
    if args.prompt_ratio is not None:
        ratios = _ratios(args.prompt_ratio)
        out.setdefault("prompt", {})["ratios" if len(ratios) > 1 else "ratio"] = ratios if len(ratios) > 1 else ratios[0]
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
    from stbench.executors import make_executor
    from stbench.plugins import get_plugins
    from stbench.run import UnitsFailed, execute, resolve_plan

    executor = make_executor(args.executor, args.jobs, args.ray_address)  # a missing Ray fails here, in one line
    plugins = get_plugins()
    config, base_dir = resolve_config(args.dataset, args.config, args.set, _shorthands(args))
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))  # unique, in order
    out = Path(args.out) if args.out else Path("runs") / f"{config.benchmark}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    plan = resolve_plan(config, methods, out, plugins, base_dir, save_models=args.save_models, fit_all=args.fit_all)
    if not args.quiet:
        print(f"stbench: {', '.join(methods)} on {config.benchmark} ({len(plan.sections)} sections, "
              f"{len(plan.folds)} folds of {config.split}); units {executor.describe()}; writing to {out}", file=sys.stderr)
    try:
        with executor:  # a Ray instance the run starts stops with it
            outcome = execute(plan, verbose=not args.quiet, executor=executor)
    except UnitsFailed as exc:
        print(f"stbench: error: {exc}", file=sys.stderr)
        return 1
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

    runs = [Path(d) for d in args.run_dirs]
    if args.study:
        text = leaderboard.render_study(runs, get_plugins(), args.format)
        if args.output:
            atomic.write_text(args.output, text)
            print(f"wrote {args.output}", file=sys.stderr)
        else:
            print(text, end="")
        return 0
    published = leaderboard.published_for(runs) if args.published else None
    columns = leaderboard.columns_with(published)
    table, meta = leaderboard.summary_rows(runs, columns)
    compact = not args.output and not args.all_columns
    significance = None if compact and not args.baseline else {"metric": args.compare_on, "baseline": args.baseline}
    text = leaderboard.render(table, meta, get_plugins(), args.format, columns=None if compact else columns,
                              compact=compact, significance=significance, published=published)
    if args.output:
        atomic.write_text(args.output, text)
        print(f"wrote {args.output}", file=sys.stderr)
        if meta.get("sweep"):  # a prompt-ratio sweep: its picture beside the table
            from stbench.plots import ratio_sweep

            png = Path(args.output).with_suffix(".sweep.png")
            sweep = meta["sweep"]
            ratio_sweep({m: by["pcc"] for m, by in sweep["table"].items()}, png,
                        title=f"PCC against prompt ratio, {meta['protocol'].get('benchmark')} (non-prompt spots: those "
                              f"prompted at no ratio)")
            print(f"wrote {png}", file=sys.stderr)
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
        report = check_dataset(args.name, args.data_dir, args.out, progress=progress, sets=args.set)
    finally:
        if sys.stderr.isatty():
            print("\r\033[K", end="", file=sys.stderr, flush=True)
    print(report)
    return 0


def cmd_predict(args) -> int:
    from stbench.plugins import get_plugins
    from stbench.predict import PredictRequest, predict

    names = lambda text: [x.strip() for x in text.split(",") if x.strip()] if text else None  # noqa: E731
    request = PredictRequest(
        model=Path(args.model), out=Path(args.out), dataset=args.dataset, data_dir=args.data_dir,
        slides=names(args.slides), image=Path(args.image) if args.image else None, mpp=args.mpp, lattice=args.lattice,
        prompts=Path(args.prompts) if args.prompts else None, device=args.device,
        encoder_weights=args.encoder_weights, finetune=not args.no_finetune, genes=names(args.genes),
        maps=not args.no_maps)
    progress = None if args.quiet else (lambda msg: print(f"stbench: {msg}", file=sys.stderr, flush=True))
    done = predict(request, get_plugins(), progress)
    for d in done:
        score = ""
        if d.row is not None and "pcc" in d.row:
            score = f", PCC {d.row['pcc']:.3f} on {d.row['n_scored']} non-prompt spots"
        print(f"{d.name}: {d.n_spots} spots -> {d.path}{score}" + (f"; maps {d.map_path}" if d.map_path else ""))
    if any(d.row is not None for d in done):
        print(f"metrics: {Path(args.out) / 'metrics.csv'}")
    return 0


def _formatwarning(message, category, filename, lineno, line=None):
    # one line, no source location: these warnings are addressed to users, not developers
    return f"stbench: warning: {message}\n"


def main(argv: Optional[list[str]] = None) -> int:
    original_format, warnings.formatwarning = warnings.formatwarning, _formatwarning
    handlers = {"run": cmd_run, "list": cmd_list, "plugins": cmd_plugins, "leaderboard": cmd_leaderboard,
                "predict": cmd_predict}
    try:
        parser = _parser(argv)  # may import a lazy command's module (its arguments), which may fail in one line
        args = parser.parse_args(argv)
        command = _command(argv)
        if command in LAZY:
            module, _, handler = LAZY[command]
            return getattr(_lazy_module(module, " ".join(command)), handler)(args)
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
