"""``apd serve``: refuses bad settings and checkpoints in one line before serving, and runs
several uvicorn workers that share the settings and report metrics together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.cli import BLAS_THREAD_VARS, limit_blas_threads, main, parse_settings
from tests.service_support import free_port, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("cli") / "model.safetensors")


@pytest.fixture(autouse=True)
def no_apd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("APD_"):
            monkeypatch.delenv(name)


def test_flags_mirror_settings_and_win_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APD_PORT", "9100")
    monkeypatch.setenv("APD_MAX_BATCH", "32")
    settings = parse_settings(
        ["--port", "9200", "--redis-url", "redis://h:1/2", "--cache-hmac-key", "k" * 16]
    )
    assert settings.port == 9200 and settings.max_batch == 32
    assert settings.redis_url == "redis://h:1/2" and settings.hmac_key == b"k" * 16


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--port", "0"], "port"),
        (["--workers", "0"], "workers"),
        (["--redis-url", "redis://h:1/2"], "cache_hmac_key is not"),
        (["--cache-hmac-key", "short"], "at least 16 bytes"),
        (["--memory-budget-mb", "0"], "memory_budget_mb"),
        (["--pool-size", "15"], "pool_size: must be a multiple of 10"),
        (["--max-num-samples", "1001"], "max_num_samples"),
        (["--default-num-samples", "300", "--max-num-samples", "200"], "exceeds max_num_samples"),
        (["--redis-url", "http://localhost"], "redis_url"),
        (["--no-such-flag", "1"], "unrecognized arguments"),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("apd serve: error:") and fragment in err


@pytest.mark.parametrize("kind", ["missing", "garbage", "truncated", "other sha"])
def test_bad_checkpoint_exits_1_before_serving(
    kind: str, ckpt_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.safetensors"
    argv = ["--checkpoint", str(bad), "--port", str(free_port())]
    if kind == "garbage":
        bad.write_bytes(b"\x80\x04 not a checkpoint")
    elif kind == "truncated":
        bad.write_bytes(ckpt_path.read_bytes()[:-1000])
    elif kind == "other sha":
        argv = ["--checkpoint", str(ckpt_path), "--expected-sha256", "0" * 64]
    assert main(argv) == 1  # returns: uvicorn was never started
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("apd serve: error: checkpoint")


def test_the_default_thread_count_is_the_settings_default() -> None:
    from service.cli import DEFAULT_NUM_THREADS
    from service.config import Settings

    assert Settings.model_fields["num_threads"].default == DEFAULT_NUM_THREADS


@pytest.mark.parametrize(
    ("argv", "env", "preset", "expected"),
    [
        ([], None, None, "1"),
        (["--num-threads", "3"], None, None, "3"),
        (["--num-threads=4"], "2", None, "4"),
        ([], "2", None, "2"),
        (["--num-threads", "3"], None, "8", "8"),  # set by the operator: kept
        (["--num-threads", "0"], None, None, None),  # 0: the library's default
    ],
)
def test_blas_threads_follow_num_threads(
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    env: str | None,
    preset: str | None,
    expected: str | None,
) -> None:
    for var in BLAS_THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
        if preset is not None:
            monkeypatch.setenv(var, preset)
    if env is not None:
        monkeypatch.setenv("APD_NUM_THREADS", env)
    limit_blas_threads(argv)
    assert {os.environ.get(var) for var in BLAS_THREAD_VARS} == {expected}


def test_the_serve_command_loads_numpy_only_after_setting_blas_threads() -> None:
    code = "import sys, apd_cli, service.cli; print('numpy' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--host", "--port", "--workers", "--redis-url", "--cache-hmac-key",
                 "--max-batch", "--max-num-samples", "--pool-size", "--cache-ttl-s"):  # fmt: skip
        assert flag in out


def test_two_workers_share_settings_and_metrics(ckpt_path: Path, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "serve.log").open("w+b")
    env = {k: v for k, v in os.environ.items() if not k.startswith("APD_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [sys.executable, "-m", "apd_cli", "serve", "--checkpoint", str(ckpt_path), "--port",
           str(port), "--workers", "2", "--pool-size", "20", "--max-batch", "3",
           "--num-threads", "1", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            deadline = time.monotonic() + 60
            ready = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    ready = client.get("/readyz")
                    if ready.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            assert ready is not None and ready.status_code == 200, log_text(tmp_path / "serve.log")
            assert ready.json()["pool_networks"] == 20  # the flag reached the worker
            limits = client.get("/v1/model").json()["limits"]
            assert limits["max_batch"] == 3
            # Both workers start (each draws the pool: 20 networks) before metrics can show
            # them both.
            text = ""
            while time.monotonic() < deadline:
                text = client.get("/metrics").text
                if "apd_posterior_networks_generated_total 40.0" in text:
                    break
                time.sleep(0.2)
            assert "apd_posterior_networks_generated_total 40.0" in text, text[-3000:]
            for _ in range(10):
                assert client.post("/predict", json={"inputs": [[0.5] * 784]}).status_code == 200
            text = client.get("/metrics").text
            line = 'apd_requests_total{endpoint="/predict",method="POST",status="200"} 10.0'
            assert line in text
            assert "apd_model_info{" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
    assert proc.returncode == 0, log_text(tmp_path / "serve.log")


def log_text(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:]


def test_apd_help_lists_exactly_the_commands_that_run(capsys: pytest.CaptureFixture[str]) -> None:
    """Each listed command answers its own --help (exit 0); an unlisted one is refused."""
    import apd_cli

    assert apd_cli.main(["--help"]) == 0
    listed = [
        line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")
    ]
    assert listed[0] == "serve" and len(listed) >= 5
    for command in listed:
        try:
            code: object = apd_cli.main([command, "--help"])
        except SystemExit as exc:  # argparse's --help
            code = exc.code
        assert code in (0, None), command
    assert apd_cli.main(["calibrated"]) == 2
    assert "unknown command 'calibrated'" in capsys.readouterr().err


def test_apd_help_works_without_the_training_code() -> None:
    """The runtime image's wheel has no training/: `apd --help` lists what runs there."""
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] == 'training':\n"
        "        raise ModuleNotFoundError(name, name='training')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import apd_cli\n"
        "sys.exit(apd_cli.main(['--help']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "serve" in out.stdout and "train " not in out.stdout


def test_the_configuration_table_is_the_settings() -> None:
    """Every setting has its row in docs/configuration.md, with its flag and default; no row
    names a gone setting."""
    from service.config import Settings

    text = (ROOT / "docs" / "configuration.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`"): [c.strip() for c in line.split("|")[1:-1]]
        for line in text.splitlines()
        if line.startswith("| `APD_")
    }
    assert set(rows) == {f"APD_{name.upper()}" for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        _, flag, default, _ = rows[f"APD_{name.upper()}"]
        assert flag == f"`--{name.replace('_', '-')}`", name
        if name != "checkpoint":
            want = (
                "unset"
                if field.default is None
                else f"`{getattr(field.default, 'value', field.default)}`"
            )
            assert default == want, name
