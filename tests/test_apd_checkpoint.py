"""The distiller's checkpoints: round trip, refusal of damaged files, ONNX parity.

A generator built by the training code is written with :func:`write_checkpoint`; the file's
reference generator (:meth:`Checkpoint.generate`) must regenerate the networks the torch
generator makes from the same noise (with the standardisation folded into the last layer and
a float16 basis), the file must refuse truncated, bit-flipped, mismatched and wrong-version
copies with a one-line :class:`CheckpointError`, and export to an ONNX graph that onnxruntime
runs to within 1e-5 relative error of :meth:`Checkpoint.generate`. The target network (MLP or
CNN) and the input convention validate themselves, and the shipped fcNN1 reads unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.numpy import load_file, save_file

from apd.checkpoint import (
    BASIS,
    BASIS_SCALE,
    DIGEST_KEY,
    MEAN,
    MEAN_SCALE,
    META_KEY,
    RESIDUAL_STD,
    RESIDUAL_STD_SCALE,
    VECTOR_GROUP,
    CheckpointError,
    Design,
    InputConvention,
    TargetNetwork,
    content_digest,
    decode_vector,
    encode_basis,
    encode_vector,
    load_checkpoint,
    round_basis,
    round_vector,
)
from apd.networks import MLPSpec, build_spec, get_spec
from apd.uncertainty import PREDICTIVE_SCORES
from training.distillation.calibrate import calibrate
from training.distillation.gan import Generator, WGANGPConfig
from training.distillation.offline import build_subspace_generator
from training.distillation.package import write_checkpoint
from training.distillation.subspace import fit_subspace

SPEC = MLPSpec("tiny", (6, 5, 3))  # P = 6*5 + 5 + 5*3 + 3 = 53


def _subspace_generator(
    basis_dtype: str, components: int = 1, vector_dtype: str = "float"
) -> Generator:
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((40, SPEC.num_params)).astype(np.float32)
    samples[:, :10] *= 5.0  # unequal scales, so the standardisation is not the identity
    sub = fit_subspace(
        samples,
        rank=4,
        basis_dtype=basis_dtype,  # type: ignore[arg-type]
        vector_dtype=vector_dtype,  # type: ignore[arg-type]
    )
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
        (Design.SUBSPACE, "int8", 5),
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
    assert set(ckpt.meta.anomaly.thresholds) == set(PREDICTIVE_SCORES)
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


def _rewrite_meta(
    src: Path, dst: Path, edit: dict[str, object], tensor_edit: dict[str, np.ndarray] | None = None
) -> Path:
    """Copy ``src`` with top-level fields of its ``apd.meta`` JSON (and tensors) replaced and
    the digest recomputed, so the loader must catch the edit itself, not a digest mismatch."""
    tensors = load_file(str(src)) | (tensor_edit or {})
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


def test_an_int8_basis_is_stored_in_8_bits_and_served_as_its_rounding(tmp_path: Path) -> None:
    gen = _subspace_generator("int8")
    path = _write(tmp_path / "int8.safetensors", gen, Design.SUBSPACE, "int8")
    stored = load_file(str(path))
    assert stored[BASIS].dtype == np.int8 and stored[BASIS_SCALE].shape == (4,)
    assert np.abs(stored[BASIS]).max(axis=1).tolist() == [127] * 4  # each row uses its range
    assert gen.basis is not None
    np.testing.assert_allclose(load_checkpoint(path).tensors[BASIS], gen.basis.numpy(), rtol=1e-6)
    # encode(decode(x)) is x: training fits against exactly what the file stores
    again = encode_basis(round_basis(gen.basis.numpy(), "int8"), "int8")
    np.testing.assert_array_equal(again[BASIS], stored[BASIS])


def test_int8_vectors_round_each_group_on_its_own_scale() -> None:
    rng = np.random.default_rng(3)
    # four groups of very different sizes (the last one short), one of them all zeros
    n = VECTOR_GROUP
    v = rng.standard_normal(3 * n + 8) * np.repeat([1e-4, 1.0, 0.0, 30.0], [n, n, n, 8])
    v = v.astype(np.float32)
    stored = encode_vector(MEAN, v, "int8")
    assert stored[MEAN].dtype == np.int8 and stored[MEAN_SCALE].shape == (4,)
    got = decode_vector(stored, MEAN)
    for g in range(4):  # the reference, one group at a time
        part = v[n * g : n * g + n].astype(np.float64)
        peak = np.abs(part).max()
        step = peak / 127 if peak > 0 else 1.0
        want = np.round(part / step) * step
        np.testing.assert_allclose(got[n * g : n * g + n], want, rtol=1e-6, atol=1e-12)
        assert np.abs(got[n * g : n * g + n] - part).max() <= step / 2 * (1 + 1e-6)
    # a standard deviation stays non-negative, and rounding twice is rounding once
    std = encode_vector(RESIDUAL_STD, np.abs(v), "int8")
    assert std[RESIDUAL_STD].min() >= 0
    again = round_vector(RESIDUAL_STD, decode_vector(std, RESIDUAL_STD), "int8")
    np.testing.assert_array_equal(again, decode_vector(std, RESIDUAL_STD))
    # float: the mean as float32 and the residual std as float16, as before
    assert encode_vector(MEAN, v, "float")[MEAN].dtype == np.float32
    assert encode_vector(RESIDUAL_STD, v, "float")[RESIDUAL_STD].dtype == np.float16


def test_int8_vectors_of_the_first_format_still_decode_on_their_groups_of_64() -> None:
    from apd.checkpoint import LEGACY_VECTOR_GROUP, vector_group

    v = np.random.default_rng(4).standard_normal(300).astype(np.float32)
    v[64:128] *= 100.0  # a group of 64 with its own scale: only its own step rounds it
    legacy = encode_vector(MEAN, v, "int8", group=LEGACY_VECTOR_GROUP)
    assert legacy[MEAN_SCALE].shape == (5,) and vector_group(300, 5) == LEGACY_VECTOR_GROUP
    got = decode_vector(legacy, MEAN)
    for g in range(5):  # the reference, one group of 64 at a time
        part = v[64 * g : 64 * g + 64].astype(np.float64)
        step = np.abs(part).max() / 127
        np.testing.assert_allclose(
            got[64 * g : 64 * g + 64], np.round(part / step) * step, rtol=1e-6
        )
    assert vector_group(300, 3) == VECTOR_GROUP and vector_group(300, 4) is None
    with pytest.raises(ValueError, match="scales fit no group"):
        decode_vector({MEAN: legacy[MEAN], MEAN_SCALE: legacy[MEAN_SCALE][:4]}, MEAN)


def test_int8_vectors_are_stored_in_a_quarter_of_the_bytes_and_served_as_trained(
    tmp_path: Path,
) -> None:
    gen = _subspace_generator("int8", vector_dtype="int8")
    path = _write(tmp_path / "v8.safetensors", gen, Design.SUBSPACE, "int8")
    stored = load_file(str(path))
    assert stored[MEAN].dtype == np.int8 and stored[RESIDUAL_STD].dtype == np.int8
    assert stored[MEAN_SCALE].shape == stored[RESIDUAL_STD_SCALE].shape == (1,)  # P = 53
    ckpt = load_checkpoint(path)
    assert ckpt.meta.generator.vector_dtype == "int8"
    assert gen.mean is not None and gen.residual_std is not None
    # the generator trained on exactly the mean and residual std the file serves
    np.testing.assert_allclose(ckpt.tensors[MEAN], gen.mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ckpt.tensors[RESIDUAL_STD], gen.residual_std.numpy(), rtol=1e-6)
    assert MEAN_SCALE not in ckpt.tensors and RESIDUAL_STD_SCALE not in ckpt.tensors
    noise = ckpt.noise(5, seed=0)
    with torch.no_grad():
        want = gen.weights(torch.from_numpy(noise["z"]), torch.from_numpy(noise["eps"])).numpy()
    got = ckpt.generate(noise["z"], noise["eps"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("scale", [0.0, -1.0, np.nan])
def test_refuses_int8_vectors_without_a_positive_scale(tmp_path: Path, scale: float) -> None:
    gen = _subspace_generator("int8", vector_dtype="int8")
    good = _write(tmp_path / "v8.safetensors", gen, Design.SUBSPACE, "int8")
    meta = json.loads(_header(good)[1]["__metadata__"][META_KEY])  # type: ignore[index]
    bad_scale = np.full(1, scale, np.float32)
    bad = _rewrite_meta(good, tmp_path / "bad.safetensors", meta, {MEAN_SCALE: bad_scale})
    with pytest.raises(CheckpointError, match=r"mean_scale|NaN"):
        load_checkpoint(bad)
    negative = -np.abs(load_file(str(good))[RESIDUAL_STD]) - 1
    bad = _rewrite_meta(good, tmp_path / "neg.safetensors", meta, {RESIDUAL_STD: negative})
    with pytest.raises(CheckpointError, match="non-negative"):
        load_checkpoint(bad)
    as_float = {RESIDUAL_STD: load_file(str(good))[RESIDUAL_STD].astype(np.float16)}
    bad = _rewrite_meta(good, tmp_path / "f16.safetensors", meta, as_float)
    with pytest.raises(CheckpointError, match="dtype float16, expected int8"):
        load_checkpoint(bad)


@pytest.mark.parametrize("scale", [0.0, -1.0, np.nan])
def test_refuses_an_int8_basis_without_a_positive_scale(tmp_path: Path, scale: float) -> None:
    good = _write(
        tmp_path / "int8.safetensors", _subspace_generator("int8"), Design.SUBSPACE, "int8"
    )
    meta = json.loads(_header(good)[1]["__metadata__"][META_KEY])  # type: ignore[index]
    bad_scale = np.full(4, scale, np.float32)
    bad = _rewrite_meta(good, tmp_path / "bad.safetensors", meta, {BASIS_SCALE: bad_scale})
    with pytest.raises(CheckpointError, match=r"basis_scale|NaN"):
        load_checkpoint(bad)
    no_scale = load_file(str(good))
    del no_scale[BASIS_SCALE]
    meta_json = json.dumps(meta)
    save_file(
        no_scale,
        str(tmp_path / "none.safetensors"),
        metadata={META_KEY: meta_json, DIGEST_KEY: content_digest(meta_json, no_scale)},
    )
    with pytest.raises(CheckpointError, match=r"missing \['generator\.basis_scale'\]"):
        load_checkpoint(tmp_path / "none.safetensors")


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


# --------------------------------------------------------------------------- the contract's
# target network and input convention

SHIPPED = Path(__file__).resolve().parents[1] / "models/mnist-fcnn1/model.safetensors"


def test_the_shipped_checkpoint_reads_unchanged() -> None:
    """The shipped fcNN1 checkpoint: the file's sha256 is the one its model card publishes,
    its target is the same MLP, its target record serialises to the very JSON in the file
    (an MLP's record has no CNN fields), and its input convention is MNIST's (28 x 28 pixels
    in [0, 1], no preprocessing); it carries the data-support score, the combined default
    flag, probes and the recalibration map that `apd distill` writes."""
    card = (SHIPPED.parent / "MODEL_CARD.md").read_text()
    published = re.search(r"sha256 `([0-9a-f]{64})`", card)
    assert published is not None
    ckpt = load_checkpoint(SHIPPED)
    assert ckpt.sha256 == published.group(1) == hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
    assert ckpt.spec == get_spec("fcnn1")
    _, header, _ = _header(SHIPPED)
    raw = json.loads(header["__metadata__"][META_KEY])  # type: ignore[index]
    assert ckpt.meta.target.model_dump(mode="json") == raw["target"]
    assert "input_shape" not in raw["target"] and set(raw["input"]) <= set(
        InputConvention.model_fields
    )
    assert ckpt.data_support is not None and ckpt.meta.probes is not None
    assert ckpt.meta.anomaly.default_score.value == "combined"
    assert ckpt.meta.recalibration is not None
    convention = ckpt.meta.input
    assert convention.shape == [28, 28] and convention.image_mode == "L"
    assert (convention.scale, convention.shift) == (1.0, 0.0)
    assert convention.class_names == [str(d) for d in range(10)]
    x = np.random.default_rng(0).random((3, 28, 28), dtype=np.float32)
    np.testing.assert_array_equal(convention.preprocess(x), x.reshape(3, 784))


CNN_SPEC = build_spec("cnn:conv3x3,pool2,fc6", (1, 6, 6), 3)


def test_a_cnn_target_round_trips_with_its_layers(tmp_path: Path) -> None:
    target = TargetNetwork.of(CNN_SPEC)
    record = target.model_dump(mode="json")
    assert "layer_sizes" not in record and record["input_shape"] == [1, 6, 6]
    assert [r["output_shape"] for r in record["layers"]] == [[3, 4, 4], [3, 2, 2], [6], [3]]
    assert TargetNetwork.model_validate_json(target.model_dump_json()).spec() == CNN_SPEC
    assert TargetNetwork.of(SPEC).model_dump(mode="json") == {
        "arch": "tiny",
        "layer_sizes": [6, 5, 3],
        "activation": "relu",
        "num_params": 53,
    }
    # a generator for the CNN, written and read back, generates the same networks
    torch.manual_seed(0)
    gen = Generator(3, (7,), CNN_SPEC.num_params)
    x = np.random.default_rng(1).random((20, 36), dtype=np.float32)
    anomaly, _ = calibrate(CNN_SPEC, gen.sample(8, torch.Generator().manual_seed(0)), x)
    path = tmp_path / "cnn.safetensors"
    write_checkpoint(
        path,
        gen,
        CNN_SPEC,
        input_convention=InputConvention(
            shape=[6, 6],
            dtype="uint8",
            value_range=(0, 255),
            scale=1 / 255,
            class_names=list("abc"),
        ),
        design=Design.PAPER,
        basis_dtype="float32",
        anomaly=anomaly,
        model_id="cnn",
        version="0",
        data={},
        sampler={},
        distillation={},
        metrics={},
    )
    ckpt = load_checkpoint(path)
    assert ckpt.spec == CNN_SPEC and ckpt.meta.input.image_mode == "L"
    z = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    with torch.no_grad():
        want = gen.weights(torch.from_numpy(z), None).numpy()
    np.testing.assert_allclose(ckpt.generate(z), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"num_params": 1}, "num_params 1 !="),
        ({"layer_sizes": [36, 3]}, "either layer_sizes"),
        ({"input_shape": None}, "either layer_sizes"),
        ({"input_shape": [1, 7, 7]}, "states output_shape"),
        (
            {
                "layers": [
                    {
                        "type": "conv2d",
                        "out_channels": 3,
                        "kernel_size": 3,
                        "output_shape": [3, 4, 4],
                    }
                ]
            },
            "ends with a dense layer",
        ),
        (
            {"layers": [{"type": "lstm", "units": 3, "output_shape": [3]}]},
            "does not match any of the expected tags",
        ),
    ],
)
def test_inconsistent_cnn_targets_are_refused(edit: dict[str, object], message: str) -> None:
    record = {**TargetNetwork.of(CNN_SPEC).model_dump(mode="json"), **edit}
    with pytest.raises(ValidationError, match=message):
        TargetNetwork.model_validate(record)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"shape": [3], "scale": [1.0, 2.0]}, "scale has 2 values for 3"),
        ({"shape": [2], "scale": [1.0, 0.0]}, "scale must be positive"),
        ({"shape": [2], "shift": [0.0, float("nan")]}, "shift must be finite"),
        ({"value_range": (1.0, 0.0)}, "low <= high"),
        ({"class_names": ["a", "a"]}, "distinct"),
        ({"shape": [0, 3]}, "positive"),
    ],
)
def test_inconsistent_input_conventions_are_refused(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        InputConvention.model_validate(fields)


def test_preprocess_is_raw_times_scale_plus_shift() -> None:
    scale, shift = [0.5, 2.0, 4.0], [1.0, -1.0, 0.25]
    c = InputConvention(shape=[3], scale=scale, shift=shift, description="3 features")
    raw = np.array([[1, 2, 3], [0, 0, 0]], dtype=np.int64)
    want = (raw * np.float32(scale) + np.float32(shift)).astype(np.float32)
    got = c.preprocess(raw)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    images = InputConvention(shape=[2, 2], dtype="uint8", value_range=(0, 255), scale=1 / 255)
    np.testing.assert_allclose(images.preprocess(np.full((1, 2, 2), 255, np.uint8)), 1.0)
    with pytest.raises(ValueError, match=r"\(N, 2, 2\) or \(N, 4\)"):
        images.preprocess(np.zeros((1, 3)))
    # a copy with other statistics preprocesses with them (nothing stale is kept)
    doubled = c.model_copy(update={"scale": [1.0, 4.0, 8.0]})
    np.testing.assert_array_equal(doubled.preprocess(raw)[0], [2.0, 7.0, 24.25])
    target = TargetNetwork.of(SPEC)
    assert target.spec() == SPEC
    wider = target.model_copy(update={"layer_sizes": [6, 7, 3], "num_params": 73})
    assert wider.spec().layer_sizes == (6, 7, 3)


def test_image_files_become_raw_examples() -> None:
    from PIL import Image

    rgb = np.zeros((5, 4, 3), np.uint8)
    rgb[..., 0] = 200  # red
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    colour = InputConvention(shape=[3, 5, 4], dtype="uint8", value_range=(0, 255))
    assert colour.image_mode == "RGB"
    raw = colour.image_to_raw(buf.getvalue())
    assert raw.shape == (3, 5, 4) and raw.dtype == np.uint8
    assert (raw[0] == 200).all() and (raw[1:] == 0).all()
    # MNIST's convention: grey, resized to 28 x 28, pixel / 255
    mnist = InputConvention()
    grey = mnist.image_to_raw(buf.getvalue())
    assert grey.shape == (28, 28) and grey.dtype == np.float32
    np.testing.assert_allclose(grey, round(0.299 * 200) / 255, atol=1 / 255)
    assert InputConvention(shape=[4], description="features").image_mode is None
    with pytest.raises(ValueError, match="not a readable image"):
        mnist.image_to_raw(b"not an image")


def test_the_input_must_fit_the_target(good: Path, tmp_path: Path) -> None:
    wrong = {"shape": [28, 28], "description": "784 values for a 6-input network"}
    with pytest.raises(CheckpointError, match="input shape \\[28, 28\\] holds 784 values"):
        load_checkpoint(_rewrite_meta(good, tmp_path / "a.safetensors", {"input": wrong}))
    names = {"shape": [6], "class_names": ["a", "b"], "description": "x"}
    with pytest.raises(CheckpointError, match="2 class_names for the target network's 3"):
        load_checkpoint(_rewrite_meta(good, tmp_path / "b.safetensors", {"input": names}))
