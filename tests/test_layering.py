"""The training side is layered like the contract: commands on top import algorithms, never
the reverse. A command module is one ``apd`` dispatches to (:data:`training.cli.COMMANDS`),
the dispatcher itself, or a ``__main__``; every other module under training/ implements
something and must not import one (at module level or inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

from training.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ROOT / "training"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute names (``from a import b`` counts ``a`` and
    ``a.b``, as ``b`` may be a submodule)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module_name(path if path.name == "__init__.py" else path.parent)
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


COMMAND_MODULES = {module for module, _ in COMMANDS.values()} | {"training.cli"}


def is_command(name: str) -> bool:
    return name in COMMAND_MODULES or name.endswith(".__main__")


def test_no_algorithm_module_imports_a_command_module() -> None:
    offenders = {}
    modules = sorted(TRAINING.rglob("*.py"))
    assert len(modules) > 30
    for path in modules:
        name = module_name(path)
        if is_command(name):
            continue
        bad = sorted(m for m in imported(path) if is_command(m))
        if bad:
            offenders[name] = bad
    assert offenders == {}, f"algorithm modules importing commands: {offenders}"


def test_the_check_sees_an_import_of_a_command(tmp_path: Path) -> None:
    """The walk finds the kinds of import that once put ``apd train`` under distillation."""
    fake = TRAINING / "distillation" / "online.py"
    tree = imported(fake)
    assert "training.defaults.SGLDDefaults" in tree  # what it imports now
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    from training.train import SGLDDefaults\n"
        "import training.evaluation.cli\nfrom training.evaluation.report import __main__\n"
    )
    found = {m for m in imported(probe) if is_command(m)}
    assert found == {
        "training.train",
        "training.evaluation.cli",
        "training.evaluation.report.__main__",
    }
