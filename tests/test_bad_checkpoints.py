"""Checkpoints that must not be served: each is refused with a one-line :class:`CheckpointError`.

From one valid tiny checkpoint (fcnn1 target, generator z(8) -> [16] -> c(4) -> basis) we make
truncated, bit-flipped, wrong-architecture, missing-metadata, wrong-format-version and foreign
files, and check that :func:`apd.checkpoint.load_checkpoint` refuses every one with a single
line naming the file and the problem. Then ``apd serve --checkpoint BAD`` must exit non-zero
with that one-line reason on stderr and no traceback.
"""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from apd.checkpoint import (
    BASIS,
    DIGEST_KEY,
    MEAN,
    META_KEY,
    RESIDUAL_STD,
    CheckpointError,
    content_digest,
    load_checkpoint,
)
from tests.harness import (
    ROOT,
    apd_command,
    free_port,
    make_tiny_checkpoint,
    serve_env,
    tiny_meta,
    tiny_tensors,
)

Tensors = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "good.safetensors")


def _meta_dict() -> dict[str, Any]:
    """A tiny checkpoint with every kind of tensor, residual noise included."""
    return json.loads(tiny_meta(residual=True).model_dump_json())


def _write_raw(
    path: Path,
    tensors: Tensors,
    meta: dict[str, Any] | str | None,
    *,
    digest: str | None = "auto",
    extra_header: dict[str, str] | None = None,
) -> Path:
    """A safetensors file with arbitrary APD metadata, bypassing save_checkpoint's checks.

    The digest is computed over the metadata and tensors actually written (``"auto"``), so that the
    loader's error is about the flaw planted, not a digest mismatch.
    """
    header: dict[str, str] = dict(extra_header or {})
    if meta is not None:
        header[META_KEY] = meta if isinstance(meta, str) else json.dumps(meta)
    if digest == "auto":
        header[DIGEST_KEY] = content_digest(header.get(META_KEY, ""), tensors)
    elif digest is not None:
        header[DIGEST_KEY] = digest
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=header)
    return path


def _header_len(data: bytes) -> int:
    return int(struct.unpack("<Q", data[:8])[0])


def _flip_bit(data: bytes, offset: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[offset] ^= 1 << bit
    return bytes(b)


def _refused(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, f"not one line: {msg!r}"
    assert msg.startswith(f"checkpoint {path}"), msg
    assert len(msg) < 600, f"reason too long: {len(msg)} chars"
    for frag in fragments:
        assert frag.lower() in msg.lower(), f"{frag!r} not in {msg!r}"
    return msg


def test_fixture_is_valid(good: Path) -> None:
    ckpt = load_checkpoint(good)
    assert ckpt.meta.target.arch == "fcnn1"
    assert ckpt.meta.generator.output_dim == 4
    theta = ckpt.generate(
        np.zeros((2, ckpt.noise_dim), np.float32), np.zeros((2, ckpt.num_params), np.float32)
    )
    assert theta.shape == (2, ckpt.num_params)


# --------------------------------------------------------------------------- truncated / flipped


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda n, size: 0, id="empty"),
        pytest.param(lambda n, size: 4, id="inside-length-prefix"),
        pytest.param(lambda n, size: 8 + n // 2, id="inside-header"),
        pytest.param(lambda n, size: 8 + n, id="header-only"),
        pytest.param(lambda n, size: 8 + n + 1000, id="early-in-data"),
        pytest.param(lambda n, size: size // 2, id="half"),
        pytest.param(lambda n, size: size - 1, id="last-byte-missing"),
    ],
)
def test_truncated(good: Path, tmp_path: Path, cut: Callable[[int, int], int]) -> None:
    data = good.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: cut(_header_len(data), len(data))])
    _refused(bad)


def test_appended_garbage(good: Path, tmp_path: Path) -> None:
    bad = tmp_path / "appended.safetensors"
    bad.write_bytes(good.read_bytes() + b"\x00" * 16)
    _refused(bad)


def test_bit_flips_in_tensor_data_are_caught(good: Path, tmp_path: Path) -> None:
    """Any flipped bit in the tensor bytes breaks the digest: 40 positions spread over them."""
    data = good.read_bytes()
    start = 8 + _header_len(data)
    rng = np.random.default_rng(1234)
    offsets = sorted({start, len(data) - 1, *rng.integers(start, len(data), 38).tolist()})
    bad = tmp_path / "flipped.safetensors"
    for off in offsets:
        bad.write_bytes(_flip_bit(data, off, bit=int(off % 8)))
        _refused(bad, "digest")


def test_bit_flip_in_length_prefix(good: Path, tmp_path: Path) -> None:
    data = good.read_bytes()
    bad = tmp_path / "flipped.safetensors"
    for bit in (0, 3, 7, 12, 40):
        bad.write_bytes(_flip_bit(data, bit // 8, bit % 8))
        _refused(bad)


def test_bit_flip_in_tensor_table(good: Path, tmp_path: Path) -> None:
    """A flipped bit in a tensor's dtype / shape / offsets in the JSON header."""
    data = good.read_bytes()
    header = data[8 : 8 + _header_len(data)]
    bad = tmp_path / "flipped.safetensors"
    for needle, index in ((b'"F32"', 2), (b'"shape":[4,', 9), (b'"data_offsets":[1272160', 17)):
        pos = 8 + header.index(needle) + index
        bad.write_bytes(_flip_bit(data, pos, 0))
        _refused(bad)


def test_bit_flip_in_metadata_is_caught(good: Path, tmp_path: Path) -> None:
    data = good.read_bytes()
    needle = b'mutual_information\\":0.05'
    pos = data.index(needle) + len(needle) - 1  # the '5' of the calibrated threshold
    flipped = _flip_bit(data, pos, 1)  # '5' (0x35) -> '7' (0x37): still valid JSON
    bad = tmp_path / "meta-flipped.safetensors"
    bad.write_bytes(flipped)
    _refused(bad)


# --------------------------------------------------------------------------- wrong architecture


def _tensors() -> Tensors:
    return tiny_tensors(tiny_meta(residual=True))


def test_num_params_inconsistent_with_layer_sizes(tmp_path: Path) -> None:
    meta = _meta_dict()
    meta["target"]["num_params"] = 79510 + 1
    _refused(_write_raw(tmp_path / "a.safetensors", _tensors(), meta), "num_params")


def test_layer_sizes_disagree_with_tensors(tmp_path: Path) -> None:
    """Self-consistent metadata for a wider network, tensors for fcnn1: the basis is too short."""
    meta = _meta_dict()
    meta["target"]["layer_sizes"] = [784, 200, 10]
    meta["target"]["num_params"] = 784 * 200 + 200 + 200 * 10 + 10
    _refused(_write_raw(tmp_path / "a.safetensors", _tensors(), meta), BASIS, "shape")


def test_generator_hidden_sizes_disagree_with_tensors(tmp_path: Path) -> None:
    meta = _meta_dict()
    meta["generator"]["hidden_sizes"] = [32]
    _refused(_write_raw(tmp_path / "a.safetensors", _tensors(), meta), "shape")


def test_noise_dim_disagrees_with_tensors(tmp_path: Path) -> None:
    meta = _meta_dict()
    meta["generator"]["noise_dim"] = 9
    _refused(_write_raw(tmp_path / "a.safetensors", _tensors(), meta), "generator.layers.0.weight")


def test_missing_tensor(tmp_path: Path) -> None:
    t = _tensors()
    del t[RESIDUAL_STD]
    _refused(_write_raw(tmp_path / "a.safetensors", t, _meta_dict()), "missing", RESIDUAL_STD)


def test_unexpected_tensor(tmp_path: Path) -> None:
    t = _tensors()
    t["generator.layers.2.weight"] = np.zeros((4, 4), np.float32)
    _refused(_write_raw(tmp_path / "a.safetensors", t, _meta_dict()), "unexpected")


def test_wrong_dtype(tmp_path: Path) -> None:
    t = _tensors()
    t[MEAN] = t[MEAN].astype(np.float64)
    _refused(_write_raw(tmp_path / "a.safetensors", t, _meta_dict()), MEAN, "dtype")


def test_non_finite_weights(tmp_path: Path) -> None:
    t = _tensors()
    t[BASIS][1, 17] = np.nan
    _refused(_write_raw(tmp_path / "a.safetensors", t, _meta_dict()), "NaN")


def test_negative_residual_std(tmp_path: Path) -> None:
    t = _tensors()
    t[RESIDUAL_STD][3] = -0.5
    _refused(_write_raw(tmp_path / "a.safetensors", t, _meta_dict()), RESIDUAL_STD)


def test_no_basis_but_output_dim_is_not_num_params(tmp_path: Path) -> None:
    meta = _meta_dict()
    meta["generator"]["has_basis"] = False
    t = _tensors()
    del t[BASIS]
    _refused(_write_raw(tmp_path / "a.safetensors", t, meta), "without a basis")


# --------------------------------------------------------------------------- missing metadata


def test_no_metadata_at_all(tmp_path: Path) -> None:
    bad = tmp_path / "plain.safetensors"
    save_file(_tensors(), str(bad))
    _refused(bad, "not an APD checkpoint")


def test_meta_key_missing(tmp_path: Path) -> None:
    _refused(_write_raw(tmp_path / "a.safetensors", _tensors(), None), "not an APD checkpoint")


def test_digest_key_missing(tmp_path: Path) -> None:
    bad = _write_raw(tmp_path / "a.safetensors", _tensors(), _meta_dict(), digest=None)
    _refused(bad, "not an APD checkpoint")


@pytest.mark.parametrize("field", ["anomaly", "target", "generator", "provenance", "model_id"])
def test_required_metadata_field_missing(tmp_path: Path, field: str) -> None:
    meta = _meta_dict()
    del meta[field]
    _refused(_write_raw(tmp_path / "a.safetensors", _tensors(), meta), field)


def test_threshold_for_default_score_missing(tmp_path: Path) -> None:
    meta = _meta_dict()
    del meta["anomaly"]["thresholds"]["mutual_information"]
    _refused(_write_raw(tmp_path / "a.safetensors", _tensors(), meta), "threshold")


@pytest.mark.parametrize("raw", ["{not json", "[1, 2, 3]", '"a string"', ""])
def test_metadata_not_an_object(tmp_path: Path, raw: str) -> None:
    _refused(_write_raw(tmp_path / "a.safetensors", _tensors(), raw))


# --------------------------------------------------------------------------- format / foreign


@pytest.mark.parametrize("version", [0, 2, 99])
def test_wrong_format_version(tmp_path: Path, version: int) -> None:
    meta = _meta_dict()
    meta["format_version"] = version
    _refused(_write_raw(tmp_path / "a.safetensors", _tensors(), meta), "format_version")


def test_foreign_format_name(tmp_path: Path) -> None:
    meta = _meta_dict()
    meta["format"] = "some-other-generator"
    _refused(_write_raw(tmp_path / "a.safetensors", _tensors(), meta), "some-other-generator")


# The bytes of a pickle stream (protocol 4, the int 1). It must be refused as "not safetensors"
# without ever reaching an unpickler; written as literal bytes, since this repo imports no pickle.
PICKLE_BYTES = b"\x80\x04K\x01."


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(PICKLE_BYTES, id="pickle"),
        pytest.param(b"PK\x03\x04" + b"\x00" * 100, id="zip-like-torch-save"),
        pytest.param(b'{"format": "apd-generator"}', id="json"),
        pytest.param(
            bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), id="noise"
        ),
        pytest.param(struct.pack("<Q", 1 << 40) + b"{}", id="huge-header-length"),
    ],
)
def test_foreign_files(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "foreign.safetensors"
    bad.write_bytes(content)
    _refused(bad)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    _refused(tmp_path / "nope.safetensors", "no such file")
    _refused(tmp_path, "no such file")


# --------------------------------------------------------------------------- apd serve refuses


def _bad_files(good: Path, tmp_path: Path) -> dict[str, Path]:
    data = good.read_bytes()
    n = _header_len(data)
    out: dict[str, Path] = {}
    out["truncated"] = tmp_path / "truncated.safetensors"
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["bit-flipped"] = tmp_path / "flipped.safetensors"
    out["bit-flipped"].write_bytes(_flip_bit(data, 8 + n + 4096, 3))
    arch = _meta_dict()
    arch["target"]["layer_sizes"] = [784, 200, 10]
    arch["target"]["num_params"] = 784 * 200 + 200 + 200 * 10 + 10
    out["wrong-architecture"] = _write_raw(tmp_path / "arch.safetensors", _tensors(), arch)
    out["missing-metadata"] = _write_raw(tmp_path / "nometa.safetensors", _tensors(), None)
    version = _meta_dict()
    version["format_version"] = 2
    out["wrong-format-version"] = _write_raw(tmp_path / "v2.safetensors", _tensors(), version)
    out["missing-file"] = tmp_path / "does-not-exist.safetensors"
    return out


def test_apd_serve_refuses_bad_checkpoints(good: Path, tmp_path: Path) -> None:
    """Exit code non-zero, the loader's one-line reason on stderr, no traceback, quickly."""
    for kind, path in _bad_files(good, tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        reason = str(info.value)
        proc = subprocess.run(
            [
                *apd_command(),
                "serve",
                "--checkpoint",
                str(path),
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
            ],
            cwd=ROOT,
            env=serve_env({"APD_REDIS_URL": ""}),
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        stderr = proc.stderr.decode(errors="replace")
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert proc.returncode not in (0, None), f"{kind}: exit code {proc.returncode}"
        assert proc.returncode > 0, f"{kind}: killed by signal {-proc.returncode}"
        assert "Traceback" not in stderr, f"{kind}: traceback on stderr:\n{stderr}"
        assert len(lines) == 1, f"{kind}: expected one line on stderr, got:\n{stderr}"
        assert reason in lines[0], f"{kind}: {lines[0]!r} does not give the reason {reason!r}"
        assert proc.returncode == 1, f"{kind}: exit code {proc.returncode} (1: bad checkpoint)"


# ---- a checkpoint proves itself: probes, and finite answers without them ----------------


def _shipped_raw() -> tuple[Tensors, str]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = ROOT / "models" / "mnist-fcnn1" / "model.safetensors"
    with safe_open(str(path), framework="np") as f:
        meta = (f.metadata() or {})[META_KEY]
    return load_file(str(path)), meta


def _last_generator_weight(tensors: Tensors) -> str:
    return max(
        (k for k in tensors if k.startswith("generator.layers.") and k.endswith(".weight")),
        key=lambda k: int(k.split(".")[2]),
    )


@pytest.mark.parametrize(
    ("factor", "why"), [(1e30, "not finite"), (1.5, "differ from the stored answer")]
)
def test_a_diverged_or_altered_shipped_checkpoint_is_refused(
    tmp_path: Path, factor: float, why: str
) -> None:
    """The shipped model's last generator weight scaled (the digest recomputed, as anyone who
    can write the file can): its probes no longer answer as stored, so it is refused."""
    tensors, meta = _shipped_raw()
    name = _last_generator_weight(tensors)
    tensors[name] = (tensors[name].astype(np.float64) * factor).astype(np.float32)
    assert np.isfinite(tensors[name]).all()  # every tensor is finite: the old check passed
    _refused(_write_raw(tmp_path / "bad.safetensors", tensors, meta), "probe", why)


def test_a_diverged_checkpoint_without_probes_is_refused(tmp_path: Path) -> None:
    """A checkpoint written before probes existed must still give finite answers."""
    record = tiny_meta(residual=False)
    meta = json.loads(record.model_dump_json())
    tensors = tiny_tensors(record)
    name = _last_generator_weight(tensors)
    tensors[name] = tensors[name] * np.float32(1e30)
    tensors[BASIS] = tensors[BASIS] * np.float32(1e30)
    _refused(_write_raw(tmp_path / "bad.safetensors", tensors, meta), "non-finite", "diverged")
