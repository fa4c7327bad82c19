"""The distiller's checkpoints: round trip, refusal of damaged files, ONNX parity.

A generator built by the training code is written with :func:`write_checkpoint`; the file's
reference generator (:meth:`Checkpoint.generate`) must regenerate the networks the torch
generator makes from the same noise (with the standardisation folded into the last layer and
a float16 basis), the file must refuse truncated, bit-flipped, mismatched and wrong-version
copies with a one-line :class:`CheckpointError`, and export to an ONNX graph that onnxruntime
runs to within 1e-5 relative error of :meth:`Checkpoint.generate`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from apd.checkpoint import (
    DIGEST_KEY,
    META_KEY,
    CheckpointError,
    Design,
    InputConvention,
    content_digest,
    load_checkpoint,
)
from apd.networks import MLPSpec
from apd.uncertainty import ScoreName
from training.distillation.calibrate import calibrate
from training.distillation.gan import Generator, WGANGPConfig
from training.distillation.offline import build_subspace_generator
from training.distillation.package import write_checkpoint
from training.distillation.subspace import fit_subspace

SPEC = MLPSpec("tiny", (6, 5, 3))  # P = 6*5 + 5 + 5*3 + 3 = 53


def _subspace_generator(basis_dtype: str, components: int = 1) -> Generator:
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((40, SPEC.num_params)).astype(np.float32)
    samples[:, :10] *= 5.0  # unequal scales, so the standardisation is not the identity
    sub = fit_subspace(samples, rank=4, basis_dtype=basis_dtype)  # type: ignore[arg-type]
    weights = list(rng.uniform(0.5, 1.5, components)) if components > 1 else None
    gen, _ = build_subspace_generator(
        sub, WGANGPConfig(noise_dim=3, generator_hidden=(7,)), torch.device("cpu"), weights
    )
    return gen


def _paper_generator() -> Generator:
    torch.manual_seed(0)
    return Generator(3, (7, 7), SPEC.num_params)


def _write(path: Path, gen: Generator, design: Design, basis_dtype: str) -> Path:
    x = np.random.default_rng(1).random((50, 6), dtype=np.float32)
    anomaly, _ = calibrate(SPEC, gen.sample(8, torch.Generator().manual_seed(0)), x)
    write_checkpoint(
        path,
        gen,
        SPEC,
        input_convention=InputConvention(shape=[6], description="6 features"),
        design=design,
        basis_dtype=basis_dtype,
        anomaly=anomaly,
        model_id="test-tiny",
        version="0",
        data={"mnist_sha256": "0" * 64},
        sampler={"lr": 0.1},
        distillation={"steps": 0},
        metrics={"val_accuracy": 0.5},
        num_samples_default=8,
    )
    return path


@pytest.mark.parametrize(
    ("design", "basis_dtype", "components"),
    [
        (Design.SUBSPACE, "float32", 1),
        (Design.SUBSPACE, "float16", 1),
        (Design.SUBSPACE, "float16", 5),
        (Design.PAPER, "float32", 1),
    ],
)
def test_round_trip_generates_the_same_networks(
    tmp_path: Path, design: Design, basis_dtype: str, components: int
) -> None:
    gen = (
        _subspace_generator(basis_dtype, components)
        if design is Design.SUBSPACE
        else _paper_generator()
    )
    ckpt = load_checkpoint(_write(tmp_path / "m.safetensors", gen, design, basis_dtype))
    assert ckpt.meta.generator.design is design
    assert ckpt.meta.generator.basis_dtype == basis_dtype
    assert set(ckpt.meta.anomaly.thresholds) == set(ScoreName)
    assert ckpt.meta.provenance.code_revision  # a sha or "unknown"
    rng = np.random.default_rng(2)
    z = rng.standard_normal((16, 3)).astype(np.float32)
    eps = rng.standard_normal((16, SPEC.num_params)).astype(np.float32)
    with torch.no_grad():
        want = gen.weights(torch.from_numpy(z), torch.from_numpy(eps)).numpy()
    got = ckpt.generate(z, eps if ckpt.meta.generator.has_residual else None)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "good.safetensors", _subspace_generator("float16"), Design.SUBSPACE, "float16"
    )


def _header(path: Path) -> tuple[int, dict[str, object], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _rewrite_meta(src: Path, dst: Path, edit: dict[str, object]) -> Path:
    """Copy ``src`` with top-level fields of its ``apd.meta`` JSON replaced and the digest
    recomputed, so the loader must catch the edit itself, not a digest mismatch."""
    tensors = load_file(str(src))
    _, header, _ = _header(src)
    meta = json.loads(header["__metadata__"][META_KEY])  # type: ignore[index]
    meta.update(edit)
    meta_json = json.dumps(meta)
    save_file(
        tensors,
        str(dst),
        metadata={META_KEY: meta_json, DIGEST_KEY: content_digest(meta_json, tensors)},
    )
    return dst


def test_refuses_a_truncated_file(good: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"truncated|not a readable") as e:
        load_checkpoint(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)


def test_refuses_a_flipped_bit(good: Path, tmp_path: Path) -> None:
    raw = bytearray(good.read_bytes())
    raw[-7] ^= 0x04  # inside the last tensor's bytes
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="do not match their digest"):
        load_checkpoint(bad)


def test_refuses_a_mismatched_architecture(good: Path, tmp_path: Path) -> None:
    # Claims a 784-100-10 network while the tensors generate 53 weights.
    target = {
        "arch": "fcnn1",
        "layer_sizes": [784, 100, 10],
        "activation": "relu",
        "num_params": 79510,
    }
    bad = _rewrite_meta(good, tmp_path / "arch.safetensors", {"target": target})
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(bad)


def test_refuses_an_unknown_design(good: Path, tmp_path: Path) -> None:
    generator = load_checkpoint(good).meta.generator.model_dump(mode="json")
    bad = _rewrite_meta(
        good, tmp_path / "design.safetensors", {"generator": {**generator, "design": "diffusion"}}
    )
    with pytest.raises(CheckpointError, match=r"generator\.design"):
        load_checkpoint(bad)


def test_the_shipped_checkpoint_loads_with_its_design() -> None:
    shipped = Path(__file__).resolve().parents[1] / "models/mnist-fcnn1/model.safetensors"
    assert load_checkpoint(shipped).meta.generator.design is Design.SUBSPACE


def test_refuses_another_format_version(good: Path, tmp_path: Path) -> None:
    bad = _rewrite_meta(good, tmp_path / "v2.safetensors", {"format_version": 2})
    with pytest.raises(CheckpointError, match="format_version 2 is not supported"):
        load_checkpoint(bad)


def test_onnx_export_matches_the_reference_generator(good: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from training.cli import main
    from training.distillation.export import check_parity
    from training.distillation.onnx_graph import build_generator_onnx

    ckpt = load_checkpoint(good)
    parity = check_parity(ckpt, build_generator_onnx(ckpt), k=64)
    assert parity.relative_error <= 1e-5
    out = tmp_path / "g.onnx"
    assert main(["export", str(good), "--out", str(out)]) == 0
    assert out.stat().st_size > 0
