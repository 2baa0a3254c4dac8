"""The ``var`` command line.  Each subcommand lives beside the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand modules, each with add_parser(subparsers) that sets ``func``
COMMAND_MODULES = [
    "var.sample.cli",
    "var.eval.cli",
    "var.sample.scalekv.cli",
    "var.bench",
    "var.train.cli",
    "var.train.demo",
    "var.doctor",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="var",
        description="Visual autoregressive (next-scale prediction) image generation toolkit",
    )
    parser.add_argument("--version", action="version", version=importlib.import_module("var.doctor").version_line())
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as error:
        # bad input from the user: one clear line, no traceback
        sys.exit(f"var {args.command}: error: {error}")
    except KeyboardInterrupt as interrupt:  # Ctrl-C: no traceback; training says what it saved and how to resume
        if str(interrupt):
            print(f"var {args.command}: {interrupt}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
