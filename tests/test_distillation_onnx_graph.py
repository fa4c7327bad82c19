"""The ONNX generator graph (``apd export``) against Checkpoint.generate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from apd.checkpoint import Checkpoint, load_checkpoint
from tests.service_support import Design, make_checkpoint
from training.distillation.onnx_graph import OPSET, build_generator_onnx


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: the error relative to the scale of the reference."""
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=[("subspace", False), ("subspace", True), ("paper", False)])
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    design: Design = request.param[0]
    folder = tmp_path_factory.mktemp(design)
    return load_checkpoint(
        make_checkpoint(folder / "model.safetensors", design=design, residual=request.param[1])
    )


def noise(ckpt: Checkpoint, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((k, ckpt.noise_dim), dtype=np.float32)
    eps = rng.standard_normal((k, ckpt.num_params), dtype=np.float32)
    return z, eps if ckpt.meta.generator.has_residual else None


def test_graph_is_valid_onnx_with_the_documented_interface(ckpt: Checkpoint) -> None:
    model = onnx.load_from_string(build_generator_onnx(ckpt))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == OPSET
    inputs = {i.name: i for i in model.graph.input}
    expected = {"z", "eps"} if ckpt.meta.generator.has_residual else {"z"}
    assert set(inputs) == expected
    z_dims = inputs["z"].type.tensor_type.shape.dim
    assert z_dims[0].dim_param == "K" and z_dims[1].dim_value == ckpt.noise_dim
    (out,) = model.graph.output
    assert out.name == "theta"
    assert out.type.tensor_type.shape.dim[1].dim_value == ckpt.num_params
    props = {p.key: p.value for p in model.metadata_props}
    assert props["checkpoint_sha256"] == ckpt.sha256
    assert {n.op_type for n in model.graph.node} <= {"MatMul", "Add", "Mul", "Relu"}


@pytest.mark.parametrize("k", [1, 10, 37])
def test_onnxruntime_matches_reference_for_any_batch(ckpt: Checkpoint, k: int) -> None:
    session = ort.InferenceSession(build_generator_onnx(ckpt), providers=["CPUExecutionProvider"])
    z, eps = noise(ckpt, k, seed=k)
    feeds = {"z": z} if eps is None else {"z": z, "eps": eps}
    (theta,) = session.run(["theta"], feeds)
    reference = ckpt.generate(z, eps)
    assert theta.shape == (k, ckpt.num_params) and theta.dtype == np.float32
    assert relative_error(theta, reference) < 1e-5


def test_graph_depends_on_every_part_of_the_generator(ckpt: Checkpoint) -> None:
    """A graph that ignored z (or eps) would still pass a shape test: check it does not."""
    session = ort.InferenceSession(build_generator_onnx(ckpt), providers=["CPUExecutionProvider"])
    z, eps = noise(ckpt, 4)
    feeds = {"z": z} if eps is None else {"z": z, "eps": eps}
    (base,) = session.run(["theta"], feeds)
    (moved,) = session.run(["theta"], {**feeds, "z": z + 1.0})
    assert relative_error(moved, base) > 1e-3
    if eps is not None:
        (moved,) = session.run(["theta"], {**feeds, "eps": eps + 1.0})
        assert relative_error(moved, base) > 1e-3


def test_export_bytes_load_from_disk(ckpt: Checkpoint, tmp_path: Path) -> None:
    """What ``apd export`` writes is a standalone file onnxruntime can run."""
    path = tmp_path / "generator.onnx"
    path.write_bytes(build_generator_onnx(ckpt))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    z, eps = noise(ckpt, 2)
    feeds = {"z": z} if eps is None else {"z": z, "eps": eps}
    assert relative_error(session.run(None, feeds)[0], ckpt.generate(z, eps)) < 1e-5
