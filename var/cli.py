"""The ``var`` command line.  Each subcommand lives beside the code it drives and registers itself here.

This module is also the one error layer: a usage error is one line from the parser
(:class:`~var.argtypes.OneLineParser`); an exception the library raises is one line naming the problem
(``--debug`` shows the traceback); Ctrl-C prints what the command saved and how to continue.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator

from var.argtypes import OneLineParser

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
# exceptions that mean "bad input": their message is the whole story
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
DEBUG_HELP = "show the full traceback of an error (for bug reports)"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="var",
        description="Visual autoregressive (next-scale prediction) image generation toolkit",
    )
    parser.add_argument("--version", action="version", version=importlib.import_module("var.doctor").version_line())
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    for command in subparsers.choices.values():  # ``var sample ... --debug`` works as well as ``var --debug sample``
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def one_line(error: BaseException) -> str:
    """An exception as one line: its message (whitespace folded), with the type for unexpected ones."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, USER_ERRORS):
        return text
    return f"{type(error).__name__}: {text} (run again with --debug for the traceback)"


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Defence in depth while a command runs: every ``torch.load``, ours or a library's (torch-fidelity passes
    ``weights_only=False``), loads tensors only and never runs pickled code.  Our own loads say so explicitly."""
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") or "TORCH_FORCE_WEIGHTS_ONLY_LOAD" in os.environ:
        yield  # the user decided
        return
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        with weights_only_loads():
            args.func(args)
    except KeyboardInterrupt as interrupt:  # Ctrl-C: no traceback; the command says what it saved and how to go on
        message = str(interrupt) or ("interrupted" if type(interrupt) is KeyboardInterrupt else "")
        if message:  # (a training run's other processes leave the report to the main one)
            print(f"var {args.command}: {message}", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        if args.debug:
            raise
        sys.exit(f"var {args.command}: error: {one_line(error)}")


if __name__ == "__main__":
    main()
