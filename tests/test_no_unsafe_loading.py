"""No pickle-based loading anywhere: checkpoints and cache entries are safetensors / raw arrays.

An AST scan of the project's Python sources fails on

* importing ``pickle``, ``cPickle``, ``_pickle``, ``cloudpickle``, ``dill``, ``joblib``,
  ``shelve`` (``import x``, ``from x import y``, ``__import__("x")``,
  ``importlib.import_module("x")``);
* ``torch.load(...)`` (also ``torch.serialization.load``) without a literal
  ``weights_only=True``;
* ``numpy.load(...)`` with ``allow_pickle`` set to anything but a literal ``False``;
* ``pandas.read_pickle(...)``.

Names are resolved through import aliases (``import numpy as np``, ``from torch import load as
tl``), so renaming does not hide a call. A self-test plants each bad pattern and checks that the
scanner flags it, so the scan cannot pass by seeing nothing.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("apd", "service", "training", "benchmarks", "tests")

PICKLE_MODULES = frozenset(
    {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve"}
)
TORCH_LOADS = frozenset({"torch.load", "torch.serialization.load"})
NUMPY_LOADS = frozenset({"numpy.load"})
ALWAYS_BAD_CALLS = frozenset({"pandas.read_pickle"})


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def _is_pickle_module(name: str) -> bool:
    return name.split(".")[0] in PICKLE_MODULES


def _kwarg(call: ast.Call, name: str) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


class _Scanner(ast.NodeVisitor):
    def __init__(self, path: str) -> None:
        self.path = path
        self.aliases: dict[str, str] = {}  # local name -> fully qualified name
        self.findings: list[Finding] = []

    def _flag(self, node: ast.AST, reason: str) -> None:
        self.findings.append(Finding(self.path, getattr(node, "lineno", 0), reason))

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if _is_pickle_module(a.name):
                self._flag(node, f"imports {a.name}")
            local = a.asname or a.name.split(".")[0]
            self.aliases[local] = a.name if a.asname else a.name.split(".")[0]
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = node.module or ""
        if node.level == 0 and _is_pickle_module(mod):
            self._flag(node, f"imports from {mod}")
        for a in node.names:
            if node.level == 0 and a.name != "*":
                self.aliases[a.asname or a.name] = f"{mod}.{a.name}"
                if a.name in PICKLE_MODULES:  # e.g. from six.moves import cPickle
                    self._flag(node, f"imports {a.name}")
        self.generic_visit(node)

    def _qualname(self, node: ast.expr) -> str | None:
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        head = self.aliases.get(node.id, node.id)
        return ".".join([head, *reversed(parts)])

    def visit_Call(self, node: ast.Call) -> None:
        name = self._qualname(node.func)
        if name is not None:
            self._check_call(node, name)
        self.generic_visit(node)

    def _check_call(self, node: ast.Call, name: str) -> None:
        if _is_pickle_module(name) and name.rsplit(".", 1)[-1] in {"load", "loads", "Unpickler"}:
            self._flag(node, f"calls {name}")
        elif name in TORCH_LOADS:
            if not _is_const(_kwarg(node, "weights_only"), True):
                self._flag(node, f"calls {name} without weights_only=True")
        elif name in NUMPY_LOADS:
            allow = _kwarg(node, "allow_pickle")
            if allow is not None and not _is_const(allow, False):
                self._flag(node, f"calls {name} with allow_pickle not False")
        elif name in ALWAYS_BAD_CALLS:
            self._flag(node, f"calls {name}")
        elif name in {"__import__", "importlib.import_module"} and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                if _is_pickle_module(arg.value):
                    self._flag(node, f"dynamically imports {arg.value}")


def scan_source(source: str, path: str = "<string>") -> list[Finding]:
    scanner = _Scanner(path)
    scanner.visit(ast.parse(source, filename=path))
    return scanner.findings


def project_sources() -> list[Path]:
    files: list[Path] = []
    for d in SCANNED_DIRS:
        base = ROOT / d
        if base.is_dir():
            files += sorted(p for p in base.rglob("*.py") if ".venv" not in p.parts)
    return files


def test_project_has_no_unsafe_loading() -> None:
    files = project_sources()
    # the scan must see the project, not an empty tree: the core package is always there
    assert any(f.parent.name == "apd" and f.name == "checkpoint.py" for f in files)
    findings = [f for p in files for f in scan_source(p.read_text(), str(p.relative_to(ROOT)))]
    assert not findings, "unsafe (pickle-based) loading:\n" + "\n".join(map(str, findings))


BAD_SNIPPETS = {
    "import pickle": "imports pickle",
    "import cPickle as cp": "imports cPickle",
    "import dill": "imports dill",
    "import joblib": "imports joblib",
    "import shelve": "imports shelve",
    "import cloudpickle": "imports cloudpickle",
    "from pickle import loads": "imports from pickle",
    "from joblib import load as jl": "imports from joblib",
    "from six.moves import cPickle": "imports cPickle",
    "import importlib\nm = importlib.import_module('pickle')": "dynamically imports pickle",
    "m = __import__('dill')": "dynamically imports dill",
    "import torch\nsd = torch.load('x.pt')": "without weights_only=True",
    "import torch\nsd = torch.load(f, map_location='cpu', weights_only=False)": "weights_only",
    "from torch import load\nsd = load('x.pt')": "torch.load without",
    "import torch as T\nsd = T.serialization.load('x.pt')": "torch.serialization.load",
    "import numpy as np\na = np.load('x.npy', allow_pickle=True)": "allow_pickle",
    "import numpy\na = numpy.load('x.npy', allow_pickle=flag)": "allow_pickle",
    "from numpy import load as L\na = L('x.npz', allow_pickle=True)": "allow_pickle",
    "import pandas as pd\ndf = pd.read_pickle('x.pkl')": "read_pickle",
    "def f():\n    import pickle as p\n    return p.loads(b'')": "calls pickle.loads",
}


@pytest.mark.parametrize("snippet", list(BAD_SNIPPETS))
def test_scanner_flags_planted_bad_snippet(snippet: str) -> None:
    findings = scan_source(snippet, "planted.py")
    assert findings, f"scanner missed: {snippet!r}"
    assert any(BAD_SNIPPETS[snippet] in f.reason for f in findings), findings


GOOD_SNIPPETS = [
    "import torch\nsd = torch.load('x.pt', weights_only=True)",
    "import numpy as np\na = np.load('x.npy')",
    "import numpy as np\na = np.load('x.npy', allow_pickle=False)",
    "from safetensors.numpy import load_file\nt = load_file('x.safetensors')",
    "import json\nd = json.loads('{}')",
    "s = 'import pickle'  # a string is not an import",
    "from . import pickle_free",
]


@pytest.mark.parametrize("snippet", GOOD_SNIPPETS)
def test_scanner_accepts_safe_loading(snippet: str) -> None:
    assert scan_source(snippet, "ok.py") == []


def test_scanner_flags_a_planted_file(tmp_path: Path) -> None:
    """End to end over files: a bad module among good ones is found, with its line."""
    (tmp_path / "good.py").write_text("import json\n")
    (tmp_path / "bad.py").write_text(
        "import json\n\nimport numpy as np\nx = np.load('a', allow_pickle=True)\n"
    )
    found = [f for p in sorted(tmp_path.glob("*.py")) for f in scan_source(p.read_text(), p.name)]
    assert [(f.path, f.line) for f in found] == [("bad.py", 4)]
