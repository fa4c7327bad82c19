"""``apd train | distill | calibrate | export | evaluate``: the ``apd`` command's training side.

Each subcommand lives in its own module exposing ``configure(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``apd train --help`` stays quick.
A :class:`~training.errors.UserError` (or a ``ValueError`` from validation) becomes one line
on stderr and exit code 2, never a traceback; so does a usage error (a missing or unknown flag),
with a pointer to the command's ``--help`` instead of argparse's usage dump.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from training.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """A parser whose usage errors are one line naming the problem and where help is; its
    subcommands' parsers are of this class too (``add_subparsers`` uses the parent's)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training.train", "train SGD, MC-Dropout or SGLD on MNIST or your own data"),
    "distill": ("training.distillation.distill", "distil SGLD samples into a generator checkpoint"),
    "calibrate": (
        "training.distillation.recalibrate",
        "calibrate a checkpoint again: data-support score, thresholds, probes",
    ),
    "export": ("training.distillation.export", "export a checkpoint's generator to ONNX"),
    "evaluate": ("training.evaluation.cli", "run the evaluation suite and write a report"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineParser(prog="apd")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    wanted = args[0] if args and args[0] in COMMANDS else None
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            importlib.import_module(module_name).configure(p)
    ns, unknown = parser.parse_known_args(args)
    if unknown:  # named by the subcommand that was given them, not by the top-level parser
        prog = " ".join(
            [
                "apd",
                ns.command,
                *([ns.method] if isinstance(getattr(ns, "method", None), str) else []),
            ]
        )
        OneLineParser(prog=prog).error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(ns, "command_line"):  # a command that records how it was run (evaluate)
        ns.command_line = " ".join(["apd", *args])
    module = importlib.import_module(COMMANDS[ns.command][0])
    try:
        return int(module.run(ns) or 0)
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"apd {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"apd {ns.command}: interrupted", file=sys.stderr)
        return 130
