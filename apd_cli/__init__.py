"""The ``apd`` command: dispatches to the serving or the training side without importing the other.

It lives outside the :mod:`apd` contract package, so that no import runs from the contract up
to a side. ``apd serve`` imports only :mod:`service`; every other subcommand imports
:mod:`training`, whose own table (:data:`training.cli.COMMANDS`) says what each one does.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

TRAINING_COMMANDS = ("train", "distill", "export", "evaluate")
USAGE = """usage: apd <command> [options]

commands:
  serve      run the inference service on a checkpoint (see: apd serve --help)
  train      train SGD, MC-Dropout or SGLD on MNIST
  distill    distil SGLD samples into a generator checkpoint (APD)
  export     export a checkpoint's generator to ONNX
  evaluate   run the evaluation suite and write a report

Run 'apd <command> --help' for a command's options."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "serve":
        from service.cli import main as serve_main

        return serve_main(rest)
    if command in TRAINING_COMMANDS:
        try:
            from training.cli import main as training_main
        except ModuleNotFoundError as exc:
            print(
                f"apd {command}: the training stack is not installed ({exc.name} missing); "
                "install it with: pip install -e '.[train]'",
                file=sys.stderr,
            )
            return 2
        return training_main(args)
    print(f"apd: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
