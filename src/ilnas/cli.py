"""ilnas command line: parse, resolve the configuration, call. Nothing else."""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import functools
import importlib
import io
import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from ilnas import __version__
from ilnas.errors import IlnasError, RunFailed, Stopped


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        print(f"ilnas: error: {_one_line(message)}", file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        """An empty argument (an unset shell variable, most often) is refused: a path read as '' is the current
        directory (``evaluate --out ""`` wrote its files there), and an option given as '' counted as not given."""
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            if any(isinstance(v, str) and not v.strip() for v in (value if isinstance(value, list) else [value])):
                name = action.option_strings[0] if action.option_strings else action.metavar or action.dest.upper()
                self.error(f"{name} is empty (an unset shell variable?)")
        return namespace, extras


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ilnas", description="Interleaving learning for differentiable architecture search.")
    p.add_argument("--version", action="version", version=f"ilnas {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("search", help="search a cell (default: the embedded demo)")
    s.add_argument("--preset", help="a preset name (see `ilnas presets`); default: demo")
    s.add_argument("--config", help="a YAML file overriding the preset")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. engine.lam=10 (repeatable)")
    _run_options(s, "runs/<preset>-<time>")

    t = sub.add_parser("train", help="re-train a genotype from scratch (torchrun for several GPUs)")
    t.add_argument("--genotype", help="zoo name, genotype.json, search run directory, or Genotype(...) literal")
    t.add_argument("--preset", help="an eval-* preset; default: eval-cifar10")
    t.add_argument("--config", help="a YAML file overriding the preset")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _run_options(t, "runs/train-<preset>-<time>")

    sub.add_parser("presets", help="list the presets")

    cm = sub.add_parser("compare", help="a table of runs grouped by everything but the seed (mean ± std)")
    cm.add_argument("runs", nargs="+", metavar="RUN", help="run directories, or directories holding runs")
    fmt = cm.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="print CSV")
    fmt.add_argument("--json", action="store_true", help="print JSON (unrounded numbers)")
    fmt.add_argument("--latex", action="store_true", help="print LaTeX tabulars (booktabs), for a paper")
    cm.add_argument("--paired", action="store_true",
                    help="also compare every two rows over the runs they share (same seeds and task): mean "
                         "difference and its 95%% interval, paired t-test and Wilcoxon p-values, also Holm-adjusted; "
                         "and rank every row among the random cells trained alike (Markdown, LaTeX or JSON)")
    cm.add_argument("--figure", metavar="FILE", help="also draw every row's test errors per task into FILE "
                                                     "(.png, .svg or .pdf)")
    cm.add_argument("--html", metavar="FILE", help="also write the comparison as one self-contained page: the "
                                                   "table, the pairs, the test errors and every row's cells")

    st = sub.add_parser("status", help="where runs stand: finished, running (by whom), failed (why) or "
                                       "interrupted, epochs, pace")
    st.add_argument("runs", nargs="+", metavar="RUN", help="run directories, or directories holding runs")
    st.add_argument("--json", action="store_true", help="print JSON")

    sw = sub.add_parser("sweep", help="run a grid of searches and re-train every found cell (resumable)")
    sw.add_argument("spec", help="a sweep spec (YAML; see the README)")
    sw.add_argument("--out", help="the sweep's directory (default: the spec's out)")
    sw.add_argument("--dry-run", action="store_true", help="print the cells and their commands, run nothing")
    sw.add_argument("--check", action="store_true",
                    help="check every run as it would start (ilnas search/train --check), the spec's parallel "
                         "at a time (at most one per core); nothing written")

    pl = sub.add_parser("plot", help="draw a run's cells, curves and alphas into plots/ and report.html")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories (search or training)")

    c = sub.add_parser("config", help="print the fully resolved configuration of a preset, file and --set")
    c.add_argument("preset", nargs="?", help="a preset name (default: demo, unless --config is given)")
    c.add_argument("--preset", dest="preset_option", metavar="PRESET", help="the same, as search and train take it")
    c.add_argument("--config", help="a YAML file over the preset (it may name a base preset: `base: NAME`)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    ev = sub.add_parser("evaluate", help="a trained model's accuracy on a task or a folder of labelled images")
    ev.add_argument("run", help="a training run directory")
    ev.add_argument("--data", required=True, metavar="TASK_OR_FOLDER",
                    help="a task name (its test split), or a folder of class folders (or holding val/)")
    _model_options(ev)
    ev.add_argument("--out", help="where the results go (default: RUN/evaluations/<data>-<weights>/)")
    ev.add_argument("--data-dir", help="where a task's files are (CIFAR, ImageNet; default: the training run's "
                                       "data.data_dir)")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--json", action="store_true", help="print evaluation.json")

    pr = sub.add_parser("predict", help="the top-k classes of image files by a trained model")
    pr.add_argument("run", help="a training run directory")
    pr.add_argument("images", nargs="+", metavar="IMAGE")
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--batch-size", type=int, default=256, help="images read and classified at a time")
    _model_options(pr)
    pr.add_argument("--json", action="store_true", help="print JSON")

    ex = sub.add_parser("export", help="export a trained model (ONNX, TorchScript, ExportedProgram), checked")
    ex.add_argument("run", help="a training run directory")
    ex.add_argument("--format", required=True, choices=["onnx", "torchscript", "exported-program"])
    ex.add_argument("--weights", choices=["last", "best"], default="last",
                    help="the last epoch's weights (default) or the best test epoch's")
    ex.add_argument("--out", help="the file to write, or a folder (existing, or ending in /) to write it into "
                                  "(default: RUN/export/model.onnx|model.torchscript.pt|model.pt2)")

    d = sub.add_parser("describe", help="print a genotype and the size of its evaluation network")
    d.add_argument("genotype", help="zoo name, genotype.json, run directory, or Genotype(...) literal")
    d.add_argument("--preset", help="evaluation preset (default: eval-cifar10; for a training run, the network it "
                                    "trained, unless --preset or --set is given)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--against", action="append", default=[], metavar="GENOTYPE",
                   help="also say how many (op, input) choices the cell shares with this one (any form the genotype "
                        "argument takes; zoo: every published cell); repeatable")
    d.add_argument("--json", action="store_true", help="print JSON")
    return p


def _run_options(p: argparse.ArgumentParser, default_out: str) -> None:
    """Where a search or training run goes, and what happens to one already there."""
    p.add_argument("--out", help=f"run directory (default: {default_out})")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--force", action="store_true", help="overwrite an existing run in --out")
    p.add_argument("--auto-resume", action="store_true",
                   help="start the run, or continue it where --out holds it unfinished; a finished one is left as "
                        "it is (one command line for a job that may be restarted or requeued)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-report", action="store_true", help="skip plots/ and report.html at the end (see `ilnas plot`)")
    p.add_argument("--check", action="store_true",
                   help="check all a run checks before it writes (configuration, run directory, checkpoint, data, "
                        "operations, network, memory on the device), then stop: nothing is written (a job to "
                        "queue, tried first)")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", choices=["last", "best"], default="last",
                   help="the last epoch's weights (default) or the best test epoch's")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")


def _config_and_out(args: argparse.Namespace, kind: str, default_preset: str, prefix: str) -> tuple[object, Path]:
    """The resolved configuration (from the run's config.yaml when resuming) and the run directory."""
    from ilnas.runs import resume_config
    from ilnas.ranks import world_size

    if args.resume and args.force:
        raise IlnasError("--resume and --force exclude each other")
    if args.auto_resume and (args.resume or args.force):
        raise IlnasError("--auto-resume excludes --resume and --force")
    if args.auto_resume and not args.out:
        raise IlnasError("--auto-resume needs --out DIR, the run to start or continue")
    for flag, value in (("--out", args.out), ("--config", args.config)):
        if value is not None and "\x00" in value:
            raise IlnasError(f"{flag} cannot hold a NUL byte")
    if not args.resume:
        preset = args.preset if args.preset is not None else (default_preset if not args.config else None)
        cfg = _resolve(preset, args.config, args.overrides, kind)
        if not args.out and world_size() > 1:
            raise IlnasError("under torchrun every rank must name the same run directory: pass --out DIR")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path(args.out) if args.out else Path("runs") / f"{prefix}{preset or 'config'}-{stamp}"
        return cfg, out
    if not args.out:
        raise IlnasError("--resume needs --out DIR, the run to continue")
    if args.preset is not None or args.config or args.overrides:
        raise IlnasError("--resume takes its configuration from the run's config.yaml; drop --preset/--config/--set")
    return resume_config(Path(args.out), kind), Path(args.out)


def _search(args: argparse.Namespace) -> None:
    from ilnas.ranks import is_main_rank
    from ilnas.runs import config_dict, read_json

    cfg, out = _config_and_out(args, "search", "demo", "")
    from ilnas.recipes.search import run_search  # after the arguments' checks: a refusal answers before torch loads

    speaks = is_main_rank()
    resume = _resume(args, out, "search", config_dict(cfg))
    if resume is None:
        if speaks:
            print(f"{out} holds this search, finished: nothing to do")
            print(f"genotype = {read_json(out, 'summary.json')['genotype']}")
        return
    if args.check:
        run_search(cfg, out, resume=resume, force=args.force, progress=False, check_only=True)
        if speaks:
            print(_checked(out, resume, args.force))
        return
    genotype = run_search(cfg, out, resume=resume, force=args.force, progress=not args.quiet,
                          report=not args.no_report)
    if speaks:
        print(f"genotype = {genotype.to_string()}")
        _report_line(out)
        from ilnas.config import retraining_presets

        for task, args in retraining_presets(cfg.data.tasks, cfg.data.image_size, cfg.data.folder_pipeline):
            print(f"re-train it on {task}: {shlex.join(['ilnas', 'train', '--genotype', str(out), *args])}")


def _report_line(out: Path) -> None:
    if (out / "report.html").is_file():
        print(f"report: {out / 'report.html'}")


def _checked(out: Path, resume: bool, force: bool) -> str:
    what = "continue the run in" if resume else "replace the run in" if force and out.exists() else "start"
    return f"checked: the run would {what} {out}; nothing was written"


def _resume(args: argparse.Namespace, out: Path, kind: str, config: dict) -> bool | None:
    """Whether the run continues (--resume, or --auto-resume finding it unfinished); None: --auto-resume
    found it finished."""
    if not args.auto_resume:
        return args.resume
    from ilnas.runs import auto_resume

    state = auto_resume(out, kind, config)
    return None if state == "finished" else state == "resume"


def _train(args: argparse.Namespace) -> None:
    from ilnas.ranks import is_main_rank
    from ilnas.runs import config_dict, read_json
    from ilnas.space.genotype import load_genotype, zoo

    cfg, out = _config_and_out(args, "eval", "eval-cifar10", "train-")
    if args.resume:
        if args.genotype:
            raise IlnasError("--resume trains the run's own genotype; drop --genotype")
        genotype, source = load_genotype(str(out / "genotype.json")), None
    elif not args.genotype:
        raise IlnasError("train needs --genotype (a zoo name, genotype.json, run directory or literal)")
    else:
        genotype = load_genotype(args.genotype)
        found = Path(args.genotype)  # a search run or a file: recorded as an absolute path
        is_path = args.genotype not in zoo() and found.exists()
        source = str(found.resolve()) if is_path else args.genotype
        if is_path and out.resolve() in (found.resolve(), *found.resolve().parents):
            raise IlnasError(f"--genotype {args.genotype} lies in --out {out}: the training would replace the run "
                             f"its cell comes from; choose another --out")
    from ilnas.recipes.train import run_train  # after the arguments' checks: a refusal answers before torch loads

    resume = _resume(args, out, "eval", config_dict(cfg, genotype=genotype.to_string()))
    if resume is None:
        result = read_json(out, "result.json")
        if is_main_rank():
            print(f"{out} holds this training run, finished: nothing to do")
    elif args.check:
        run_train(cfg, genotype, out, resume=resume, force=args.force, progress=False, genotype_source=source,
                  check_only=True)
        if is_main_rank():
            print(_checked(out, resume, args.force))
        return
    else:
        result = run_train(cfg, genotype, out, resume=resume, force=args.force, progress=not args.quiet,
                           genotype_source=source, report=not args.no_report)
        if is_main_rank():
            print(f"run directory: {out}")
    if is_main_rank():
        print(f"test error: {100 * result['final_test_error']:.2f}% (best {100 * result['best_test_error']:.2f}%), "
              f"{result['params'] / 1e6:.2f}M parameters")
        _report_line(out)


def _presets(args: argparse.Namespace) -> None:
    from ilnas.config import list_presets
    from ilnas.data.names import task_names
    from ilnas.space.layout import known_ops, known_styles

    presets = list_presets()
    width = max(map(len, presets))
    for name, description in presets.items():
        print(f"{name:<{width}}  {description}")
    print(f"\noperations a search space may list (space.ops): {', '.join(known_ops())}")
    print(f"networks a re-training may build (network.style): {', '.join(known_styles())}")
    print(f"tasks a run may learn (data.tasks): {', '.join(task_names())}")


def _resolve(preset: str | None, config: str | None, overrides: list[str], kind: str | None):
    """The configuration, its task names known (as the run would refuse them, but before torch loads), with a
    warning (from rank 0 of torchrun's) for each --set that the run it describes would never read."""
    from ilnas.config import resolve, to_dict, unread_overrides
    from ilnas.data.names import check_task_name
    from ilnas.ranks import is_main_rank

    cfg = resolve(preset, config, overrides, kind)
    for task in cfg.data.tasks:  # an image folder's path is looked at only by the run
        check_task_name(task)
    for key, why in unread_overrides(to_dict(cfg), overrides) if is_main_rank() else ():
        logging.getLogger("ilnas").warning(f"--set {key} changes nothing: {why}")
    return cfg


def _config(args: argparse.Namespace) -> None:
    import yaml

    from ilnas.config import to_dict

    if args.preset is not None and args.preset_option is not None:
        raise IlnasError(f"two presets given ({args.preset!r} and --preset {args.preset_option!r}): name one")
    preset = args.preset if args.preset is not None else args.preset_option
    preset = preset if preset is not None else (None if args.config else "demo")
    cfg = _resolve(preset, args.config, args.overrides, kind=None)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")


def _plot(args: argparse.Namespace) -> None:
    from ilnas.recipes.report import make_report

    for run in args.runs:
        print(f"report: {make_report(Path(run))}")


def _compare(args: argparse.Namespace) -> None:
    from ilnas.recipes import compare

    if args.paired and args.csv:
        raise IlnasError("--paired adds a second table, which CSV cannot hold: use the Markdown output, --latex or "
                         "--json")
    from ilnas.fileio import atomic_write_bytes
    from ilnas.runs import refuse_among_run_files

    suffix = Path(args.figure).suffix.lower().lstrip(".") if args.figure else None
    if suffix not in (None, "png", "svg", "pdf"):
        raise IlnasError(f"--figure {args.figure}: the file must end in .png, .svg or .pdf")
    if args.html and Path(args.html).suffix.lower() not in (".html", ".htm"):  # not a spec or notes by a slip
        raise IlnasError(f"--html {args.html}: the file must end in .html or .htm")
    for option, name in (("--figure", args.figure), ("--html", args.html)):
        if name:
            refuse_among_run_files([Path(name)], option)

    table = compare.compare(args.runs)
    written = [(option, name, data()) for option, name, data in
               (("--figure", args.figure, lambda: compare.figure_bytes(table, suffix)),
                ("--html", args.html, lambda: compare.as_html(table).encode())) if name]
    for option, name, data in written:  # drawn first, all of them: a failure leaves no file half done
        try:
            atomic_write_bytes(Path(name), data)
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
            raise IlnasError(f"cannot write {option} {name!r} ({getattr(e, 'strerror', None) or e})") from None
    print(compare.as_json(table, args.paired) if args.json else compare.as_csv(table) if args.csv
          else compare.latex(table, args.paired) if args.latex else compare.markdown(table, args.paired), end="")


def _status(args: argparse.Namespace) -> None:
    from ilnas.recipes.status import status, sweep_outlook, table

    rows = status(args.runs)
    outlook = "".join(f"{line}\n" for line in sweep_outlook(args.runs, rows))
    print(json.dumps(rows, indent=1) if args.json else table(rows) + outlook, end="\n" if args.json else "")


def _sweep(args: argparse.Namespace) -> None:
    from ilnas.recipes.sweep import check_sweep, describe_sweep, load_spec, run_sweep

    sweep = load_spec(args.spec, args.out)
    print(describe_sweep(sweep, commands=args.dry_run), end="", flush=True)  # a run: a line per cell as it ends
    if args.check:
        lines, refused = check_sweep(sweep)
        print("\n".join(lines))
        if refused:
            raise IlnasError(f"{refused} of the sweep's runs would be refused (above)")
    elif not args.dry_run:
        summary = run_sweep(sweep)
        print(f"sweep finished in {summary['wall_seconds'] / 60:.1f} min: {sweep.out / 'sweep.json'}; "
              f"`ilnas compare {sweep.out} --paired --html {sweep.out / 'comparison.html'}` for the tables and cells")


def _holds_a_card(spec: str) -> bool:
    """Whether a genotype argument names a training run (its model.json)."""
    from ilnas.card import CARD_FILE

    try:
        return (Path(spec) / CARD_FILE).is_file()
    except (OSError, ValueError):  # a Genotype(...) literal longer than a file name may be, say
        return False


def _describe(args: argparse.Namespace) -> None:
    from ilnas.card import read_card
    from ilnas.space.genotype import load_genotype, parse_genotype, zoo

    others = {name: cell for spec in args.against
              for name, cell in (zoo().items() if spec == "zoo" else [(spec, load_genotype(spec))])}
    if args.preset is None and not args.overrides and _holds_a_card(args.genotype):
        card = read_card(args.genotype)  # the network the run trained, not a CIFAR one
    else:
        card, genotype = None, load_genotype(args.genotype)
        cfg = _resolve(args.preset or "eval-cifar10", None, args.overrides, kind="eval")
    from ilnas.recipes.describe import describe, describe_trained, shared_with  # after the arguments' checks

    info = describe_trained(card) if card is not None else describe(genotype, cfg)
    if others:
        info["shared_with"] = shared_with(parse_genotype(info["genotype"]), others)
    if args.json:
        print(json.dumps(info, indent=1))
        return
    print(f"genotype = {info['genotype']}")
    print(f"network: {info['network']}, for {info['task']}")
    print(f"parameters: {info['params'] / 1e6:.2f}M (auxiliary head excluded), "
          f"{info['params_total'] / 1e6:.2f}M in all")
    from ilnas.report.tables import in_millions

    print(f"multiply-adds: {in_millions(info['macs'])}M at {info['resolution']}x{info['resolution']}")
    for name, n in info.get("shared_with", {}).items():
        print(f"shares {n['shared']} of {n['of']} (op, input) choices with {name} "
              f"(normal {n['normal']}, reduce {n['reduce']})")


def _evaluate(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise IlnasError(f"--batch-size must be positive, got {args.batch_size}")
    from ilnas.data.names import check_data_source

    _require_trained_model(args)
    check_data_source(args.data)
    from ilnas.recipes.evaluate import evaluate

    r = evaluate(args.run, args.data, args.weights, args.out, args.batch_size, args.device, args.data_dir)
    if args.json:
        print(json.dumps(r, indent=1))
        return
    top_k = next(k for k in r if k.startswith("top") and k != "top1")
    print(f"{_one_line(r['data'])}: {r['images']} images, top-1 {100 * r['top1']:.2f}%, {top_k} {100 * r[top_k]:.2f}% "
          f"({args.weights} weights)")
    worst = sorted(r["per_class"].items(), key=lambda kv: kv[1])[:5]
    print("weakest classes: " + ", ".join(f"{c} {100 * a:.1f}%" for c, a in worst))
    print(f"written: {r['out']}/evaluation.json, per_class.csv, confusion.csv, confusion.png")


def _predict(args: argparse.Namespace) -> None:
    _require_trained_model(args)
    from ilnas.recipes.evaluate import predict

    found = predict(args.run, args.images, args.top_k, args.weights, args.device, args.batch_size)
    if args.json:
        print(json.dumps(found, indent=1))
        return
    for item in found:
        print(f"{_one_line(item['image'])}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in item["top"]))


def _export(args: argparse.Namespace) -> None:
    _require_trained_model(args)
    from ilnas.recipes.export import export_model

    r = export_model(args.run, args.format, args.out, args.weights)
    print(f"{r['format']}: {r['path']} (card: {r['card']})")
    print(f"checked with {r['runtime']} at batch sizes {r['batch_sizes_checked']}: max |logit difference| vs "
          f"PyTorch {r['max_abs_difference']:.2e}")


def _require_trained_model(args: argparse.Namespace) -> None:
    """A run that holds no trained model (a typo, a search run, a training not yet finished, a damaged card), or a
    --device that names none, is refused before the command's recipe, and torch, load."""
    from ilnas.card import require_trained_model
    from ilnas.config.schema import check_device_name

    require_trained_model(args.run, args.weights)
    if "device" in args:
        check_device_name(args.device)


COMMANDS = {"search": _search, "train": _train, "presets": _presets, "config": _config, "describe": _describe,
            "plot": _plot, "compare": _compare, "status": _status, "sweep": _sweep, "evaluate": _evaluate,
            "predict": _predict, "export": _export}


def _one_line(text: str) -> str:
    """Messages name user paths, which may hold newlines: escape them so every message is one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class _OutputFailed(IlnasError):
    exit_code = RunFailed.exit_code


class _Output:
    """sys.stdout while a command runs: a write that fails (``> file`` on a full disk, an I/O error) raises
    one line's error, not a traceback from wherever the command printed; ``drop`` discards the rest. A reader
    that left (BrokenPipeError, ``| head``) passes through as it is."""

    def __init__(self, stream):
        self.stream, self.dropped = stream, False

    def write(self, text: str) -> int:
        with self._guard():
            return len(text) if self.dropped else self.stream.write(text)

    def flush(self) -> None:
        with self._guard():
            if not self.dropped:
                self.stream.flush()

    def drop(self) -> None:
        """Discard what is written from now on, and what the stream still buffers (the interpreter's last
        flush would fail on it as well)."""
        self.dropped = True
        with contextlib.suppress(OSError, ValueError):  # io.UnsupportedOperation: a stream without a descriptor
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except BrokenPipeError:
            raise
        except OSError as e:
            raise _OutputFailed(f"cannot write to standard output ({e.strerror or e})") from None


class _Console(logging.Handler):
    """The recipes' log lines as the CLI's own: epoch lines to whatever sys.stdout is at the time, warnings to
    sys.stderr as "ilnas: warning: ..." like the CLI's other warnings (tests and callers redirect both).
    A run whose standard output fails goes on without it, having said so once: its lines are all in
    metrics.jsonl, and a days-long run is not stopped by a full disk that is not its own."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.levelno >= logging.WARNING:
                print(f"ilnas: warning: {_one_line(record.getMessage())}", file=sys.stderr, flush=True)
            else:
                print(record.getMessage(), file=sys.stdout, flush=True)
        except _OutputFailed as e:
            sys.stdout.drop()
            print(f"ilnas: warning: {e}; the run goes on without it (metrics.jsonl holds its lines)",
                  file=sys.stderr, flush=True)
        except Exception:  # a closed or broken stream: logging's own report, as a StreamHandler gives it
            self.handleError(record)


def _log_to_stdout() -> None:
    """The recipes' epoch lines (logger ``ilnas``) go to stdout, as plain lines; their warnings to stderr."""
    logger = logging.getLogger("ilnas")
    if not any(isinstance(h, _Console) for h in logger.handlers):
        logger.addHandler(_Console())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _trace_fatal_signals() -> None:
    """A crash below Python (SIGSEGV, SIGABRT from a C++ terminate, ...) prints every thread's Python stack
    to stderr, so a days-long run, or one rank of several, that dies says where."""
    if faulthandler.is_enabled():  # e.g. under pytest, which routes it already
        return
    try:
        faulthandler.enable(sys.stderr)
    except (AttributeError, ValueError, OSError):  # stderr replaced by an object without a file descriptor
        pass


def _open_standard_streams() -> None:
    """A process started with stdin, stdout or stderr closed (as some daemons and schedulers start theirs)
    gets /dev/null there: otherwise the first file a run opens takes descriptor 1 or 2 and receives what
    torch and faulthandler write to it, and every print raises. Output the terminal cannot encode is escaped."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:  # Python found the descriptor closed at start-up
            setattr(sys, name, open(fd, mode, closefd=False))
    if isinstance(sys.stdout, io.TextIOWrapper):  # a path or class name the terminal's encoding lacks: escaped
        sys.stdout.reconfigure(errors="backslashreplace")  # (stderr's default), not a UnicodeEncodeError


CTRL_C_EXIT = 128 + signal.SIGINT  # what a stop by Ctrl-C returns in-process (a shell shows the same)


def main(argv: Sequence[str] | None = None) -> int:
    """``ilnas ARGV`` in this process: its exit code (130 after a Ctrl-C, which a run stops at after its step)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        _say_interrupted()
        return CTRL_C_EXIT


def program() -> int:
    """``ilnas`` as a program (the console script, ``python -m ilnas``). A Ctrl-C ends it as Python ends an
    unhandled Ctrl-C, after the interpreter's clean-up: killed by SIGINT (a shell reports 130), which tells a
    shell loop or a script running it to stop as well; a second one that stops it at once says "ilnas:
    interrupted", a first one its stop after the step it checkpointed. (An exit code of 130 let a shell loop
    go on to its next command, and was not even reliable: the interpreter has been seen to end so after a
    KeyboardInterrupt this function had caught.)"""
    swallowed: list[BaseException] = []  # Ctrl-Cs that landed in a finaliser, which can only print them
    sys.unraisablehook = functools.partial(_note_unraisable_ctrl_c, swallowed)
    try:
        code = _main(None)
        if swallowed:  # in one run as the command ended (during a run, the step guard raises it again)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        _say_interrupted()
        code = CTRL_C_EXIT
    finally:  # the command has ended: a Ctrl-C in the interpreter's clean-up ends the process at once, as one
        # there after a few milliseconds more does (not in a traceback from the finaliser it lands in)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
    if code == CTRL_C_EXIT:
        sys.excepthook = _quiet_keyboard_interrupt
        raise KeyboardInterrupt
    return code


def _say_interrupted() -> None:
    """Also where the second Ctrl-C lands once the command has ended, after it reported the first one's stop."""
    with contextlib.suppress(OSError, ValueError):
        print("ilnas: interrupted", file=sys.stderr, flush=True)


def _note_unraisable_ctrl_c(swallowed: list[BaseException], unraisable) -> None:
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        swallowed.append(unraisable.exc_value)
    else:
        sys.__unraisablehook__(unraisable)


def _quiet_keyboard_interrupt(kind: type, value: BaseException, tb) -> None:
    """One line was printed instead of the traceback ("ilnas: interrupted", or the stop after a checkpoint)."""
    if not issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)


def _main(argv: Sequence[str] | None) -> int:
    _open_standard_streams()
    args = _parser().parse_args(argv)
    _log_to_stdout()
    _trace_fatal_signals()
    stdout, sys.stdout = sys.stdout, _Output(sys.stdout)
    try:
        return _run(args)
    finally:
        sys.stdout = stdout


PLUGINS = "ILNAS_PLUGINS"


def _import_plugins() -> None:
    """The modules ILNAS_PLUGINS names (comma-separated), imported before the command: where operations of one's
    own are registered (``ilnas.register_op``), so that a search, a sweep's runs, a resume and a re-training in
    another process know them alike (the environment passes on to them)."""
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS, "").split(","))):
        try:
            importlib.import_module(name)
        except (Exception, SystemExit) as e:  # the plugin's own failure, whatever it is (a sys.exit too): one line
            raise IlnasError(f"{PLUGINS}: cannot import {name} ({type(e).__name__}: {_one_line(str(e))})") from None


def _run(args: argparse.Namespace) -> int:
    """The command, every way it can end as an exit code and at most one line."""
    try:
        _import_plugins()
        COMMANDS[args.command](args)
        sys.stdout.flush()
    except _OutputFailed as e:
        sys.stdout.drop()
        print(f"ilnas: error: {e}", file=sys.stderr)
        return e.exit_code
    except IlnasError as e:
        print(f"ilnas: error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except Stopped as e:
        from ilnas.ranks import is_main_rank

        if is_main_rank():  # every rank stopped at the same step; one says so
            print(f"ilnas: {e}", file=sys.stderr)
        return e.exit_code
    except RuntimeError as e:
        from ilnas.distributed import lost_peer
        from ilnas.errors import allocation_failure

        if (failure := allocation_failure(e)) is not None:  # where the command names no setting of its own
            print(f"ilnas: error: {failure}; lower the network's size or the batch size", file=sys.stderr)
            return IlnasError.exit_code
        if not lost_peer(e):
            raise
        print(f"ilnas: error: rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')} stopped: another rank "
              f"of this job is gone (it failed or was stopped: its own message says why)", file=sys.stderr)
        return RunFailed.exit_code
    except BrokenPipeError:  # `ilnas describe ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0
