"""Generator and forward backends: noise -> networks -> the K networks' softmax outputs.

Both backends take the same NumPy noise (:func:`service.posterior_pool.block_noise`) and agree
with :meth:`apd.checkpoint.Checkpoint.generate` to within 1e-5 relative error.

* :class:`OnnxRuntimeBackend`: the generator graph from
  :func:`training.distillation.onnx_graph.build_generator_onnx` in an onnxruntime session; the forward is
  NumPy's :func:`apd.networks.forward_probs`.
  Nothing here imports torch.
* :class:`TorchBackend`: torch modules holding the checkpoint's tensors; the forward is
  :func:`training.torch_ops.forward_logits`. torch is imported only when this backend is built.

Each forward evaluates the K networks on the N inputs as one batched pass.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray

from apd.checkpoint import BASIS, MEAN, RESIDUAL_STD, Checkpoint
from apd.networks import MLPSpec, forward_probs
from service.config import Backend

if TYPE_CHECKING:
    import torch

FloatArray = NDArray[np.float32]


class GeneratorBackend(Protocol):
    """Draws networks from the generator and runs them. Thread-safe."""

    kind: Backend

    def generate(self, z: FloatArray, eps: FloatArray | None) -> FloatArray:
        """``z (K, noise_dim)``, ``eps (K, P)`` or None -> ``theta (K, P)`` float32."""
        ...

    def forward_probs(self, theta: FloatArray, x: FloatArray) -> FloatArray:
        """Softmax of K networks ``theta (K, P)`` on inputs ``x (N, D)`` -> ``(K, N, C)``."""
        ...


class OnnxRuntimeBackend:
    kind = Backend.ONNXRUNTIME

    def __init__(self, ckpt: Checkpoint, num_threads: int = 0) -> None:
        import onnxruntime as ort

        from training.distillation.onnx_graph import INPUT_EPS, INPUT_Z, OUTPUT_THETA, build_generator_onnx

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads > 0:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            build_generator_onnx(ckpt), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._spec = ckpt.spec
        self._residual = ckpt.meta.generator.has_residual
        self._names = (INPUT_Z, INPUT_EPS, OUTPUT_THETA)

    def generate(self, z: FloatArray, eps: FloatArray | None) -> FloatArray:
        z_name, eps_name, out_name = self._names
        feeds: dict[str, Any] = {z_name: np.ascontiguousarray(z, dtype=np.float32)}
        if self._residual:
            if eps is None:
                raise ValueError("this generator adds residual noise: pass eps")
            feeds[eps_name] = np.ascontiguousarray(eps, dtype=np.float32)
        (theta,) = self._session.run([out_name], feeds)
        return np.asarray(theta, dtype=np.float32)

    def forward_probs(self, theta: FloatArray, x: FloatArray) -> FloatArray:
        return forward_probs(self._spec, theta, x)


def _torch_generator(ckpt: Checkpoint) -> torch.nn.Module:
    import torch
    from torch import nn

    from training.torch_ops import compose_weights

    class Generator(nn.Module):
        """``theta = mean + MLP(z) @ basis + residual_std * eps`` (absent parts skipped)."""

        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            pairs = ckpt.generator_layers()
            for i, (w, b) in enumerate(pairs):
                linear = nn.Linear(w.shape[0], w.shape[1])
                with torch.no_grad():
                    linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
                    linear.bias.copy_(torch.from_numpy(b))
                layers.append(linear)
                if i < len(pairs) - 1:
                    layers.append(nn.ReLU())
            self.mlp = nn.Sequential(*layers)
            g = ckpt.meta.generator
            self.basis = self._buffer(BASIS) if g.has_basis else None
            self.mean = self._buffer(MEAN) if g.has_mean else None
            self.residual_std = self._buffer(RESIDUAL_STD) if g.has_residual else None

        def _buffer(self, name: str) -> torch.Tensor:
            t = torch.from_numpy(np.array(ckpt.tensors[name], dtype=np.float32))
            self.register_buffer(name.replace(".", "_"), t)
            return t

        def forward(self, z: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
            return compose_weights(self.mlp(z), self.basis, self.mean, self.residual_std, eps)

    return Generator().eval()


class TorchBackend:
    kind = Backend.TORCH

    def __init__(self, ckpt: Checkpoint, num_threads: int = 0) -> None:
        import torch

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        # Cached networks are read-only arrays, shared without copies; torch only reads them
        # here (inference mode, no in-place ops), so its warning about that is noise.
        warnings.filterwarnings(
            "ignore", message="The given NumPy array is not writable", category=UserWarning
        )
        self._torch = torch
        self._spec: MLPSpec = ckpt.spec
        self._generator = _torch_generator(ckpt)

    def generate(self, z: FloatArray, eps: FloatArray | None) -> FloatArray:
        torch = self._torch
        with torch.inference_mode():
            z_t = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
            eps_t = None if eps is None else torch.from_numpy(np.ascontiguousarray(eps, np.float32))
            out: FloatArray = self._generator(z_t, eps_t).numpy()
        return out

    def forward_probs(self, theta: FloatArray, x: FloatArray) -> FloatArray:
        torch = self._torch
        from training.torch_ops import forward_logits

        with torch.inference_mode():
            theta_t = torch.from_numpy(np.ascontiguousarray(theta, dtype=np.float32))
            x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            probs: FloatArray = torch.softmax(forward_logits(self._spec, theta_t, x_t), -1).numpy()
        return probs


def create_backend(kind: Backend, ckpt: Checkpoint, num_threads: int = 0) -> GeneratorBackend:
    """The backend ``kind``; ``num_threads`` 0 keeps the library's default."""
    if kind is Backend.ONNXRUNTIME:
        return OnnxRuntimeBackend(ckpt, num_threads)
    if kind is Backend.TORCH:
        return TorchBackend(ckpt, num_threads)
    raise ValueError(f"unknown backend {kind!r}")
