"""ilnas command line: parse, resolve the configuration, call. Nothing else."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from ilnas.errors import IlnasError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        print(f"ilnas: error: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ilnas", description="Interleaving learning for differentiable architecture search.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("search", help="search a cell (default: the embedded demo)")
    s.add_argument("--preset", help="a preset name (see `ilnas presets`); default: demo")
    s.add_argument("--config", help="a YAML file overriding the preset")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. search.lam=10 (repeatable)")
    s.add_argument("--out", help="run directory (default: runs/<preset>-<time>)")
    s.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    s.add_argument("--force", action="store_true", help="overwrite an existing run in --out")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    sub.add_parser("presets", help="list the presets")

    d = sub.add_parser("describe", help="print a genotype and the size of its evaluation network")
    d.add_argument("genotype", help="zoo name, genotype.json, run directory, or Genotype(...) literal")
    d.add_argument("--preset", default="eval-cifar10", help="evaluation preset (default: eval-cifar10)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--json", action="store_true", help="print JSON")
    return p


def _search(args: argparse.Namespace) -> None:
    from ilnas.config import from_dict, resolve, SearchRunConfig, validate
    from ilnas.recipes.search import run_search
    from ilnas.runs import RunDir

    if args.resume:
        if not args.out:
            raise IlnasError("--resume needs --out DIR, the run to continue")
        if args.preset or args.config or args.overrides:
            raise IlnasError("--resume takes its configuration from the run's config.yaml; "
                             "drop --preset/--config/--set")
        RunDir.check(Path(args.out), resume=True, force=False)
        cfg = from_dict(SearchRunConfig, RunDir(Path(args.out)).config())
        validate(cfg)
    else:
        cfg = resolve(args.preset or ("demo" if not args.config else None), args.config, args.overrides)
    name = args.preset or "demo"
    out = Path(args.out) if args.out else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"run directory: {out}", flush=True)
    genotype = run_search(cfg, out, resume=args.resume, force=args.force, progress=not args.quiet)
    print(f"genotype = {genotype.to_string()}")


def _presets(args: argparse.Namespace) -> None:
    from ilnas.config import list_presets

    presets = list_presets()
    width = max(map(len, presets))
    for name, description in presets.items():
        print(f"{name:<{width}}  {description}")


def _describe(args: argparse.Namespace) -> None:
    from ilnas.config import resolve
    from ilnas.recipes.describe import describe
    from ilnas.space.genotype import load_genotype

    genotype = load_genotype(args.genotype)
    info = describe(genotype, resolve(args.preset, None, args.overrides, kind="eval"))
    if args.json:
        print(json.dumps(info, indent=1))
        return
    print(f"genotype = {info['genotype']}")
    print(f"network: {info['network']}")
    print(f"parameters: {info['params'] / 1e6:.2f}M (auxiliary head excluded), "
          f"{info['params_total'] / 1e6:.2f}M in all")
    print(f"multiply-adds: {info['macs'] / 1e6:.0f}M at {info['resolution']}x{info['resolution']}")


COMMANDS = {"search": _search, "presets": _presets, "describe": _describe}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except IlnasError as e:
        print(f"ilnas: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ilnas: interrupted", file=sys.stderr)
        return 130
    return 0
