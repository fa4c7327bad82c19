"""The checkpoint's generator as an ONNX graph, built from its tensors with ``onnx.helper``.

The graph computes exactly :meth:`apd.checkpoint.Checkpoint.generate`::

    h_0 = z;  h_{i+1} = ReLU(h_i @ W_i + b_i)  (no ReLU after the last generator layer)
    theta = [mean +] h_L [@ basis] [+ residual_std * eps]

Inputs ``z (K, noise_dim)`` and, when the generator adds residual noise, ``eps (K, P)``, both
float32 with a dynamic batch dimension ``K``; output ``theta (K, P)`` float32. Initialisers
are the checkpoint's tensors (float32; an fp16 basis is stored upcast, as the checkpoint
loader serves it). Only ``MatMul``, ``Add``, ``Mul`` and ``Relu`` are used, at opset 17, so
any onnxruntime since 1.14 runs it. Building needs the ``onnx`` package, not torch.

Used by ``apd export``; tests check it against :meth:`Checkpoint.generate`.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from apd.checkpoint import BASIS, MEAN, RESIDUAL_STD, Checkpoint

OPSET: Final = 17
IR_VERSION: Final = 8
INPUT_Z: Final = "z"
INPUT_EPS: Final = "eps"
OUTPUT_THETA: Final = "theta"
BATCH_DIM: Final = "K"


def build_generator_onnx(ckpt: Checkpoint) -> bytes:
    """Serialized ONNX model of ``ckpt``'s generator (see the module docstring)."""
    from onnx import TensorProto, checker, helper, numpy_helper

    g = ckpt.meta.generator
    p = ckpt.num_params
    initializers = []
    nodes = []

    def const(name: str, array: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    h = INPUT_Z
    layers = ckpt.generator_layers()
    for i, (w, b) in enumerate(layers):
        w_name = const(f"generator.layers.{i}.weight", w)
        b_name = const(f"generator.layers.{i}.bias", b)
        nodes.append(helper.make_node("MatMul", [h, w_name], [f"layer{i}.matmul"]))
        last = i == len(layers) - 1 and not (g.has_basis or g.has_mean or g.has_residual)
        out = OUTPUT_THETA if last else f"layer{i}.linear"
        nodes.append(helper.make_node("Add", [f"layer{i}.matmul", b_name], [out]))
        h = out
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [h], [f"layer{i}.relu"]))
            h = f"layer{i}.relu"

    # The tail: each optional part is one node; the last one writes ``theta``.
    tail: list[tuple[str, str, list[str]]] = []
    if g.has_basis:
        tail.append(("MatMul", "basis.matmul", [BASIS]))
        const(BASIS, ckpt.tensors[BASIS])
    if g.has_mean:
        tail.append(("Add", "mean.add", [MEAN]))
        const(MEAN, ckpt.tensors[MEAN])
    if g.has_residual:
        const(RESIDUAL_STD, ckpt.tensors[RESIDUAL_STD])
        nodes.append(helper.make_node("Mul", [INPUT_EPS, RESIDUAL_STD], ["residual.scaled"]))
        tail.append(("Add", "residual.add", ["residual.scaled"]))
    for j, (op, name, operands) in enumerate(tail):
        out = OUTPUT_THETA if j == len(tail) - 1 else name
        nodes.append(helper.make_node(op, [h, *operands], [out]))
        h = out

    inputs = [helper.make_tensor_value_info(INPUT_Z, TensorProto.FLOAT, [BATCH_DIM, g.noise_dim])]
    if g.has_residual:
        inputs.append(helper.make_tensor_value_info(INPUT_EPS, TensorProto.FLOAT, [BATCH_DIM, p]))
    output = helper.make_tensor_value_info(OUTPUT_THETA, TensorProto.FLOAT, [BATCH_DIM, p])
    graph = helper.make_graph(
        nodes,
        f"apd_generator_{ckpt.meta.model_id}",
        inputs,
        [output],
        initializer=initializers,
        doc_string=f"APD generator of checkpoint sha256 {ckpt.sha256}",
    )
    model = helper.make_model(
        graph,
        producer_name="apd",
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
    )
    helper.set_model_props(
        model,
        {
            "model_id": ckpt.meta.model_id,
            "version": ckpt.meta.version,
            "checkpoint_sha256": ckpt.sha256,
            "design": ckpt.meta.generator.design,
        },
    )
    checker.check_model(model)
    return bytes(model.SerializeToString())
