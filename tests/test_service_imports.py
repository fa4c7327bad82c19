"""The layering: nothing under service/ imports training; nothing under apd/ (the contract)
imports a side, torch or onnx at module level; and the service serves without torch, onnx or
onnxruntime loaded."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.service_support import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SERVICE = ROOT / "service"


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import``/``from ... import`` in ``path`` names (any nesting)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def test_scanner_sees_every_import_form(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import training\nfrom training.cli import main\n"
        "def f():\n    import training.distillation as t\n"
        "import importlib\nimportlib.import_module('training.train')\n"
    )
    names = imported_modules(probe)
    assert {"training", "training.cli", "training.distillation", "training.train"} <= names


def test_service_never_imports_training() -> None:
    files = sorted(SERVICE.rglob("*.py"))
    assert len(files) > 5, "service/ not found"
    offenders = {
        str(f.relative_to(ROOT)): sorted(
            n for n in imported_modules(f) if n == "training" or n.startswith("training.")
        )
        for f in files
    }
    assert not {f: n for f, n in offenders.items() if n}


def module_level_imports(path: Path) -> set[str]:
    """Modules imported by ``path``'s top-level statements (not inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_contract_imports_no_side_and_no_framework() -> None:
    files = sorted((ROOT / "apd").rglob("*.py"))
    assert len(files) >= 4, "apd/ not found"
    banned = ("service", "training", "torch", "onnx", "onnxruntime", "apd_cli")
    offenders = {
        str(f.relative_to(ROOT)): sorted(
            n for n in module_level_imports(f) if n.split(".")[0] in banned
        )
        for f in files
    }
    assert not {f: n for f, n in offenders.items() if n}


PROBE = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient
    from service.config import Settings
    from service.api.app import create_app

    settings = Settings(checkpoint=sys.argv[1], pool_size=10)
    with TestClient(create_app(settings)) as client:
        response = client.post("/predict", json={"inputs": [[0.5] * 784], "num_samples": 10})
    roots = ("torch", "training", "onnx", "onnxruntime")
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in roots)
    print(json.dumps({"status": response.status_code, "heavy": heavy}))
    """
)


def test_the_service_serves_without_torch_onnx_or_training(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "model.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith("APD_")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(ckpt)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["status"] == 200
    assert report["heavy"] == [], f"imported: {report['heavy']}"


# What each layer of service/ may import (docs/architecture.md): calls go down or stay level.
LAYERS = {
    "core": ("service.core", "service.infra"),
    "infra": ("service.infra", "service.core.limits"),
    "codecs": ("service.codecs", "service.core"),
    # a transport beside service.api, never above it
    "grpc": ("service.grpc", "service.codecs", "service.core", "service.infra", "service.config"),
}


def test_service_layers_import_only_downwards() -> None:
    offenders = {}
    for layer, allowed in LAYERS.items():
        for f in sorted((SERVICE / layer).rglob("*.py")):
            bad = sorted(
                n
                for n in imported_modules(f)
                if n.startswith("service.") and not n.startswith(allowed)
            )
            if bad:
                offenders[str(f.relative_to(ROOT))] = bad
    assert not offenders, offenders
