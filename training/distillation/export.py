"""``apd export CHECKPOINT --out model.onnx``: the generator as an ONNX sampler.

The graph (:func:`training.distillation.onnx_graph.build_generator_onnx`) takes noise
``z (K, noise_dim)`` and, when the generator adds residual noise, ``eps (K, P)``, and returns
``theta (K, P)``, so onnxruntime can serve without torch. After writing, the export is
checked: onnxruntime and the contract's reference generator
(:meth:`apd.checkpoint.Checkpoint.generate`) run on the same noise, and the relative error
``max|theta_onnx - theta_ref| / max|theta_ref|`` must be at most ``--tolerance`` (default
1e-5); it is printed either way.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apd.checkpoint import Checkpoint, load_checkpoint
from training.errors import UserError

from .package import generator_noise

DEFAULT_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Parity:
    num_networks: int
    max_abs_error: float
    relative_error: float  # max |a - b| / max |b|

    def ok(self, tolerance: float) -> bool:
        return self.relative_error <= tolerance


def check_parity(ckpt: Checkpoint, model: bytes, k: int = 100, seed: int = 0) -> Parity:
    """onnxruntime vs :meth:`Checkpoint.generate` on the same ``k`` noise draws."""
    import onnxruntime as ort

    feeds = generator_noise(ckpt, k, seed)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    (onnx_theta,) = sess.run(["theta"], {k_: v for k_, v in feeds.items() if k_ in names})
    ref = ckpt.generate(**feeds)
    err = float(np.abs(np.asarray(onnx_theta) - ref).max())
    return Parity(k, err, err / max(float(np.abs(ref).max()), 1e-30))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="APD checkpoint (.safetensors)")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument("--check-networks", type=int, default=100, help="K for the parity check")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    try:
        from training.distillation.onnx_graph import build_generator_onnx
    except ImportError as exc:
        raise UserError(f"ONNX export is unavailable ({exc})") from None
    if args.check_networks <= 0:
        raise UserError(f"--check-networks must be positive, got {args.check_networks}")
    ckpt = load_checkpoint(args.checkpoint)
    model = build_generator_onnx(ckpt)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(model)
    tmp.replace(out)
    parity = check_parity(ckpt, model, args.check_networks, args.seed)
    verdict = "ok" if parity.ok(args.tolerance) else "FAILED"
    print(
        f"wrote {out} ({len(model) / 1e6:.2f} MB) from {ckpt.path} (sha256 {ckpt.sha256[:12]})\n"
        f"  parity onnxruntime vs Checkpoint.generate on {parity.num_networks} networks: "
        f"max abs error {parity.max_abs_error:.3g}, relative {parity.relative_error:.3g} "
        f"(tolerance {args.tolerance:g}): {verdict}"
    )
    if not parity.ok(args.tolerance):
        raise UserError(
            f"ONNX export of {ckpt.path} differs from Checkpoint.generate by "
            f"{parity.relative_error:.3g} relative (> {args.tolerance:g})"
        )
    return 0
