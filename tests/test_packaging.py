"""Packaging: the serving lock, the wheel, and the default checkpoint of an installed ``apd``.

* ``requirements/serve.lock`` (which the Docker image and ``make serve`` install with
  ``--require-hashes``) pins exactly the ``[serve]`` closure the tests run with: every package
  that ``apd[serve]`` brings in, at the version installed here, and nothing else.
* The wheel carries every file of its packages, the shipped model (installed under
  ``<prefix>/share/apd/``) and the LICENSE; installed from the wheel, outside the source tree,
  ``apd serve`` finds the model as its default and answers as the source tree does.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from service.codecs.examples import mnist_example
from service.config import DEFAULT_CHECKPOINT, SHIPPED_CHECKPOINT, installed_copy
from tests.deploy_support import PYPROJECT, ROOT, installed_closure, normalise, project_requirements

LOCK = ROOT / "requirements" / "serve.lock"
SHIPPED = ROOT / SHIPPED_CHECKPOINT
INSTALLED_MODEL = Path("share", "apd", *SHIPPED_CHECKPOINT.parent.parts)
PACKAGES = ("apd", "apd_cli", "service", "training")

_PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*\\?")
_HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}\s*\\?")


def read_lock(text: str) -> dict[str, tuple[str, int]]:
    """``name -> (version, number of hashes)`` of a ``--generate-hashes`` lock; anything
    else in it (an unpinned line, an option, a hash without a pin) is an error."""
    pins: dict[str, tuple[str, int]] = {}
    current: str | None = None
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := _PIN.fullmatch(line):
            current = normalise(m[1])
            assert current not in pins, f"line {n}: {current} pinned twice"
            pins[current] = (m[2], 0)
        elif _HASH.fullmatch(line) and current is not None:
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
        else:
            raise AssertionError(f"line {n} of the lock is neither a pin nor a hash: {raw!r}")
    return pins


def test_read_lock_is_strict() -> None:
    good = "# c\nfoo-bar==1.2 \\\n    --hash=sha256:" + "a" * 64 + "\nbaz==3\n"
    assert read_lock(good) == {"foo-bar": ("1.2", 1), "baz": ("3", 0)}
    for bad in ("foo>=1.2\n", "-e .\n", "--hash=sha256:" + "a" * 64 + "\n", "a==1\na==2\n"):
        with pytest.raises(AssertionError):
            read_lock(bad)


def test_lock_pins_exactly_the_tested_serving_closure() -> None:
    pins = read_lock(LOCK.read_text())
    closure, missing = installed_closure(project_requirements(["serve"]))
    assert not missing, f"required by apd[serve] but not installed here: {sorted(missing)}"
    assert "torch" not in closure and "apd" not in pins
    assert sorted(set(closure) - set(pins)) == [], "apd[serve] needs these; the lock lacks them"
    assert sorted(set(pins) - set(closure)) == [], "locked, but apd[serve] does not need them"
    differ = {n: (pins[n][0], v) for n, v in closure.items() if pins[n][0] != v}
    assert not differ, f"lock != tested (locked, installed): {differ}; run `make lock`"
    unhashed = sorted(n for n, (_, hashes) in pins.items() if hashes == 0)
    assert not unhashed, f"no hash for {unhashed}: `pip install --require-hashes` refuses them"
    # The lock honours apd's own bounds, e.g. uvicorn <0.55 (service/infra/http_server.py
    # subclasses its private h11 protocol).
    for req in project_requirements(["serve"]):
        assert req.specifier.contains(pins[normalise(req.name)][0]), (req, pins[req.name])


def test_license_is_declared_and_shipped() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["license"] == "MIT"
    assert "LICENSE" in project["license-files"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


# --------------------------------------------------------------------------------------
# The default checkpoint


def test_source_tree_serves_its_own_model_by_default() -> None:
    assert DEFAULT_CHECKPOINT == SHIPPED and SHIPPED.is_file()


def _fake_install(site: Path, record: list[str]) -> md.Distribution:
    info = site / "apd-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.4\nName: apd\nVersion: 0.1.0\n")
    (info / "RECORD").write_text("".join(f"{path},,\n" for path in record))
    return md.PathDistribution(info)


def test_installed_copy_is_found_through_the_record(tmp_path: Path) -> None:
    # A venv's layout: <prefix>/lib/python3.11/site-packages and <prefix>/share/apd/...
    prefix = tmp_path / "venv"
    site = prefix / "lib" / "python3.11" / "site-packages"
    model = prefix / INSTALLED_MODEL / SHIPPED_CHECKPOINT.name
    model.parent.mkdir(parents=True)
    model.write_bytes(b"stand-in")
    relative = f"../../../{INSTALLED_MODEL.as_posix()}/{SHIPPED_CHECKPOINT.name}"
    dist = _fake_install(site, ["apd/__init__.py", relative, "apd-0.1.0.dist-info/RECORD"])
    assert installed_copy(dist) == model.resolve()
    # RECORD names it but the file is gone; or RECORD never named it: no copy.
    model.unlink()
    assert installed_copy(dist) is None
    other = _fake_install(tmp_path / "other", ["apd/__init__.py"])
    assert installed_copy(other) is None


# --------------------------------------------------------------------------------------
# The wheel, installed outside the source tree


def _checkout_files() -> list[str]:
    """What a clone of this working tree holds: tracked files and untracked, unignored ones."""
    proc = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in proc.stdout.splitlines() if (ROOT / f).is_file()]


@pytest.mark.slow
def test_wheel_carries_the_model_and_an_install_serves_it(tmp_path: Path) -> None:
    import httpx
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.config import Settings
    from tests import harness

    # Built from a copy of the checkout: setuptools builds in the source tree, and a stale
    # build/ there would leak into the wheel.
    src = tmp_path / "src"
    files = _checkout_files()
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("apd-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        data = f"apd-0.1.0.data/data/{INSTALLED_MODEL.as_posix()}"
        assert zf.read(f"{data}/{SHIPPED_CHECKPOINT.name}") == SHIPPED.read_bytes()
        for extra in ("MODEL_CARD.md", "model.fidelity.json"):
            assert f"{data}/{extra}" in names
        assert zf.read("apd-0.1.0.dist-info/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        metadata = zf.read("apd-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata
    packaged = [f for f in files if f.split("/", 1)[0] in PACKAGES]
    lost = sorted(set(packaged) - names)
    assert not lost, f"files of the packages that the wheel leaves out (package-data?): {lost}"

    # A fresh venv holding the wheel alone; its dependencies are read from this environment's
    # site-packages through a .pth (appended after the venv's own, so the wheel's apd wins).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run(
        [*pip, "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "zz_test_deps.pth").write_text(str(Path(httpx.__file__).parents[1]) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("APD_")}
    env.pop("PYTHONPATH", None)
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    where = subprocess.run(
        [
            python,
            "-c",
            "import json, service.config as c; "
            "print(json.dumps([c.__file__, str(c.DEFAULT_CHECKPOINT)]))",
        ],
        cwd=outside,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    module, default = (Path(p) for p in json.loads(where.stdout))
    assert module.is_relative_to(site), module
    assert default == (venv / INSTALLED_MODEL / SHIPPED_CHECKPOINT.name).resolve(), default

    request = {"inputs": [mnist_example()], "num_samples": 100, "seed": 7}
    port = harness.free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [venv / "bin" / "apd", "serve", "--host", harness.LOOPBACK, "--port", str(port)],
            cwd=outside,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://{harness.LOOPBACK}:{port}"
        assert harness.wait_for_port(port, 60.0, proc), log.read_text()[-3000:]
        ready = httpx.get(base + "/readyz", timeout=30.0)
        assert ready.status_code == 200, log.read_text()[-3000:]
        shipped_sha = hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
        assert ready.json()["checkpoint_sha256"] == shipped_sha
        answer = httpx.post(base + "/predict", json=request, timeout=30.0)
        assert answer.status_code == 200, answer.text
    finally:
        harness.stop_process(proc)
    with TestClient(create_app(Settings(checkpoint=SHIPPED, redis_url=None))) as client:
        source = client.post("/predict", json=request).json()
    # The same answer; its floats to float32 rounding (`apd serve` runs one BLAS thread, this
    # process the library's default, and GEMMs sum in another order: up to 2e-5 apart).
    assert _same_answer(answer.json(), source), (answer.json(), source)


def _same_answer(a: object, b: object, rel: float = 1e-4) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_answer(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_answer(x, y, rel) for x, y in zip(a, b, strict=True))
    if type(a) is float and type(b) is float:
        return abs(a - b) <= max(rel * max(abs(a), abs(b)), 1e-15)
    return bool(a == b) and type(a) is type(b)


def _setup_plan(env: dict[str, str]) -> list[str]:
    """`make setup`'s commands, not run (``make -n``; ``-B``: also where .venv is set up)."""
    out = subprocess.run(
        ["make", "-n", "-B", "setup"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def _torch_line(plan: list[str]) -> str:
    [line] = [x for x in plan if re.search(r"pip install .*'torch==", x)]
    return line


def test_setup_installs_the_pinned_cpu_torch_from_pytorchs_index_without_local_wheels(
    tmp_path: Path,
) -> None:
    """An ordinary machine (no pip configuration, no wheel folder): the exact CPU build, from
    PyTorch's CPU wheel index, before anything else can pull a CUDA build."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"PIP_CONFIG_FILE": os.devnull, "HOME": str(tmp_path)}
    plan = _setup_plan(env)
    line = _torch_line(plan)
    pinned = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["train"]
    [torch_pin] = [r for r in pinned if r.startswith("torch==")]
    assert f"'{torch_pin}+cpu'" in line, (line, torch_pin)
    assert line.endswith("--extra-index-url https://download.pytorch.org/whl/cpu"), line
    # torch comes before the extras that depend on it
    extras = next(i for i, x in enumerate(plan) if "-e '.[serve,train" in x)
    assert plan.index(line) < extras


def test_setup_takes_torch_from_a_local_wheel_folder_when_pip_has_one(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(wheels), "HOME": str(tmp_path)}
    line = _torch_line(_setup_plan(env))
    assert "'torch==2.13.0+cpu'" in line and "index-url" not in line, line
