"""The ``apd`` command: dispatches to the serving or the training side without importing the other.

It lives outside the :mod:`apd` contract package, so that no import runs from the contract up
to a side. Each side registers its own subcommands: ``apd serve`` is :mod:`service.cli`; every
other subcommand is a row of :data:`training.cli.COMMANDS` (module and help line), so this
dispatcher lists exactly the commands that run. ``training.cli`` imports no torch: listing the
commands stays quick, and works in a serve-only install.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

SERVE_HELP = "run the inference service on a checkpoint (see: apd serve --help)"


def _training_commands() -> dict[str, tuple[str, str]]:
    """The training side's table, or none where the training code is not installed (the
    runtime image, whose wheel is built without ``training/``)."""
    try:
        from training.cli import COMMANDS
    except ModuleNotFoundError:
        return {}
    return COMMANDS


def _usage() -> str:
    commands = _training_commands()
    rows = [("serve", SERVE_HELP), *((name, help) for name, (_, help) in commands.items())]
    lines = "\n".join(f"  {name:<10} {text}" for name, text in rows)
    return (
        f"usage: apd <command> [options]\n\ncommands:\n{lines}\n\n"
        "Run 'apd <command> --help' for a command's options."
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("apd: error: a command is needed (see: apd --help)", file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = args[0], args[1:]
    if command == "serve":
        from service.cli import main as serve_main

        return serve_main(rest)
    if command in _training_commands():
        try:
            from training.cli import main as training_main

            return training_main(args)
        except ModuleNotFoundError as exc:
            print(
                f"apd {command}: the training stack is not installed ({exc.name} missing); "
                "install it with: pip install -e '.[train]'",
                file=sys.stderr,
            )
            return 2
    known = ", ".join(["serve", *_training_commands()])
    print(f"apd: unknown command {command!r}; commands: {known} (see: apd --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
