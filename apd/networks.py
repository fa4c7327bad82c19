"""Target networks as specs over flat parameter vectors, and the batched forward in NumPy.

A posterior sample is one flat vector ``theta`` of length ``spec.num_params``. Two families
of networks, one type :data:`NetworkSpec` (``MLPSpec | CNNSpec``), both read from and written
to checkpoints and sample stores by :meth:`to_dict` / :func:`spec_from_dict`.

**MLP** (:class:`MLPSpec`, ``layer_sizes = (D, hidden..., C)``). For each layer ``l`` in
order, the weight ``W_l`` of shape ``(fan_in, fan_out)`` in row-major order, then the bias
``b_l`` of shape ``(fan_out,)``. A layer computes ``h @ W_l + b_l``; every layer but the
last is followed by the activation (ReLU), and the last produces logits.

**CNN** (:class:`CNNSpec`, an input shape ``(C, H, W)`` and a list of layers, the last a
:class:`Dense` of ``num_classes`` units). Layers with parameters take their slice of
``theta`` in order, weight then bias, each row-major:

* :class:`Conv2d` ``(out_channels O, kernel_size k, padding p)``: weight ``(O, C_in, k, k)``
  (PyTorch's ``Conv2d`` layout), bias ``(O,)``; stride 1, zero padding ``p`` on each side,
  cross-correlation as in every deep-learning library: ``out[o, i, j] = b[o] + sum_{c, u, v}
  W[o, c, u, v] * in[c, i + u - p, j + v - p]``. Followed by ReLU.
* :class:`MaxPool2d` ``(size s)``: no parameters; max over non-overlapping ``s x s``
  windows (stride ``s``), trailing rows and columns that do not fill a window are dropped
  (PyTorch's default ``floor`` mode).
* :class:`Dense` ``(units)``: weight ``(fan_in, units)``, bias ``(units,)``, ``h @ W + b`` as
  in an MLP; the first dense layer reads the feature map flattened in ``(C, H, W)``
  row-major order (PyTorch's ``x.flatten(1)`` on ``NCHW``). Followed by ReLU except the last.

In both families the first layer's weight and bias are the first two slices of ``theta``
(``spec.offsets()[0]``), and the first layer is linear in them: this is what the factored
forward (:mod:`apd.factored`) relies on.

Inputs are always ``x (N, D)`` with ``D = spec.input_dim``; a CNN reads each row as its
``(C, H, W)`` image in row-major order. The batched forward evaluates K networks on N inputs
in one pass of batched products (no Python loop over networks; a CNN's networks go through in
chunks that bound the working set): the input is broadcast to all K networks, which is what
makes serving many posterior samples cheap. Internally a CNN's feature maps are channels-last,
``(K, N, H, W, C)``, so that a convolution is one batched matrix product over im2col patches.

Architectures are named by strings (:func:`build_spec`): ``fcnn1`` and ``fcnn2`` (the
paper's MLPs), ``mlp:W1[,W2...]``, ``cnn:LAYER[,LAYER...]`` with ``LAYER`` one of
``conv{O}x{k}[p{p}]``, ``pool{s}``, ``fc{W}`` (the output layer of ``num_classes`` units is
appended), and the named CNNs ``al-cnn`` and ``lenet5`` (:data:`NAMED_ARCHITECTURES`).
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

FloatArray = NDArray[np.float32]


class Activation(enum.StrEnum):
    """Hidden-layer nonlinearity of a target network."""

    RELU = "relu"


@dataclass(frozen=True)
class MLPSpec:
    """A fully connected network: ``layer_sizes = (in, hidden..., out)``."""

    name: str
    layer_sizes: tuple[int, ...]
    activation: Activation = Activation.RELU

    def __post_init__(self) -> None:
        if len(self.layer_sizes) < 2 or any(int(s) <= 0 for s in self.layer_sizes):
            raise ValueError(f"layer_sizes must be >= 2 positive ints, got {self.layer_sizes}")

    @property
    def input_dim(self) -> int:
        return self.layer_sizes[0]

    @property
    def num_classes(self) -> int:
        return self.layer_sizes[-1]

    @property
    def num_layers(self) -> int:
        return len(self.layer_sizes) - 1

    @property
    def layer_shapes(self) -> list[tuple[tuple[int, int], tuple[int]]]:
        """``[((fan_in, fan_out), (fan_out,)), ...]`` for each layer."""
        pairs = zip(self.layer_sizes[:-1], self.layer_sizes[1:], strict=True)
        return [((i, o), (o,)) for i, o in pairs]

    @property
    def num_params(self) -> int:
        return sum(i * o + o for (i, o), _ in self.layer_shapes)

    def offsets(self) -> list[tuple[slice, slice]]:
        """Slices of the flat vector holding each layer's ``(W, b)``."""
        out: list[tuple[slice, slice]] = []
        start = 0
        for (i, o), _ in self.layer_shapes:
            w = slice(start, start + i * o)
            b = slice(w.stop, w.stop + o)
            out.append((w, b))
            start = b.stop
        return out

    def fan_ins(self) -> list[int]:
        """Inputs of one unit of each layer (the scale of PyTorch's default init)."""
        return list(self.layer_sizes[:-1])

    @property
    def max_activations(self) -> int:
        """The most values one input's activations take in any layer, per network."""
        return max(self.layer_sizes[1:])

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "layer_sizes": list(self.layer_sizes),
            "activation": self.activation.value,
            "num_params": self.num_params,
        }


# --------------------------------------------------------------------------- CNN layers


@dataclass(frozen=True)
class Conv2d:
    """``O`` filters of ``k x k``, stride 1, zero padding ``p`` on each side; then ReLU."""

    out_channels: int
    kernel_size: int
    padding: int = 0

    @property
    def token(self) -> str:
        pad = f"p{self.padding}" if self.padding else ""
        return f"conv{self.out_channels}x{self.kernel_size}{pad}"

    def to_dict(self) -> dict[str, object]:
        return {
            "type": "conv2d",
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "padding": self.padding,
        }


@dataclass(frozen=True)
class MaxPool2d:
    """Max over non-overlapping ``size x size`` windows (floor mode)."""

    size: int

    @property
    def token(self) -> str:
        return f"pool{self.size}"

    def to_dict(self) -> dict[str, object]:
        return {"type": "maxpool2d", "size": self.size}


@dataclass(frozen=True)
class Dense:
    """``h @ W + b`` with ``units`` outputs; ReLU after it unless it is the last layer."""

    units: int

    @property
    def token(self) -> str:
        return f"fc{self.units}"

    def to_dict(self) -> dict[str, object]:
        return {"type": "dense", "units": self.units}


Layer = Conv2d | MaxPool2d | Dense


@dataclass(frozen=True)
class CNNSpec:
    """A small convolutional network: ``input_shape = (C, H, W)`` and ``layers``, the last a
    :class:`Dense` with ``num_classes`` units (module docstring for the layout and maths)."""

    name: str
    input_shape: tuple[int, int, int]
    layers: tuple[Layer, ...]
    activation: Activation = Activation.RELU
    # Derived in __post_init__: each layer's output shape, (C, H, W) or (units,).
    output_shapes: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.input_shape)
        if len(shape) != 3 or any(s <= 0 for s in shape):
            raise ValueError(f"a CNN's input_shape must be (C, H, W) > 0, got {self.input_shape}")
        if not self.layers or not isinstance(self.layers[0], Conv2d):
            raise ValueError("a CNN starts with a conv layer (use mlp:... for dense networks)")
        if not isinstance(self.layers[-1], Dense):
            raise ValueError("a CNN ends with a dense layer (its logits)")
        shapes: list[tuple[int, ...]] = []
        cur: tuple[int, ...] = shape
        for layer in self.layers:
            where = f"{layer.token} (input {'x'.join(map(str, cur))})"
            if isinstance(layer, Dense):
                if layer.units <= 0:
                    raise ValueError(f"{where}: units must be positive")
                cur = (layer.units,)
            elif len(cur) != 3:
                raise ValueError(f"{where}: conv and pool layers cannot follow a dense layer")
            elif isinstance(layer, Conv2d):
                o, k, p = layer.out_channels, layer.kernel_size, layer.padding
                if o <= 0 or k <= 0 or p < 0:
                    raise ValueError(f"{where}: need channels, kernel > 0 and padding >= 0")
                h, w = cur[1] + 2 * p - k + 1, cur[2] + 2 * p - k + 1
                if h <= 0 or w <= 0:
                    raise ValueError(f"{where}: a {k}x{k} kernel does not fit")
                cur = (o, h, w)
            else:
                s = layer.size
                if s <= 0 or cur[1] < s or cur[2] < s:
                    raise ValueError(f"{where}: a {s}x{s} pool does not fit")
                cur = (cur[0], cur[1] // s, cur[2] // s)
            shapes.append(cur)
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "output_shapes", tuple(shapes))

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    @property
    def num_classes(self) -> int:
        last = self.layers[-1]
        assert isinstance(last, Dense)
        return last.units

    @property
    def arch(self) -> str:
        """The ``cnn:...`` string of the hidden layers (the output layer is implied)."""
        return "cnn:" + ",".join(layer.token for layer in self.layers[:-1])

    def _inputs(self) -> list[tuple[int, ...]]:
        return [self.input_shape, *self.output_shapes[:-1]]

    @property
    def layer_shapes(self) -> list[tuple[tuple[int, ...], tuple[int]]]:
        """``[(weight shape, (bias,)), ...]`` for each layer with parameters, in order:
        ``(O, C_in, k, k)`` for a conv layer, ``(fan_in, units)`` for a dense layer."""
        out: list[tuple[tuple[int, ...], tuple[int]]] = []
        for layer, shape_in in zip(self.layers, self._inputs(), strict=True):
            if isinstance(layer, Conv2d):
                k = layer.kernel_size
                out.append(((layer.out_channels, shape_in[0], k, k), (layer.out_channels,)))
            elif isinstance(layer, Dense):
                out.append(((math.prod(shape_in), layer.units), (layer.units,)))
        return out

    @property
    def num_params(self) -> int:
        return sum(math.prod(w) + b[0] for w, b in self.layer_shapes)

    def offsets(self) -> list[tuple[slice, slice]]:
        """Slices of the flat vector holding each parametrised layer's ``(W, b)``."""
        out: list[tuple[slice, slice]] = []
        start = 0
        for w_shape, (o,) in self.layer_shapes:
            w = slice(start, start + math.prod(w_shape))
            b = slice(w.stop, w.stop + o)
            out.append((w, b))
            start = b.stop
        return out

    def fan_ins(self) -> list[int]:
        """Inputs of one unit of each parametrised layer (``C_in k k`` for a conv)."""
        return [math.prod(w[1:]) if len(w) == 4 else w[0] for w, _ in self.layer_shapes]

    @property
    def max_activations(self) -> int:
        """The most values one input takes in any layer's working set, per network: its
        output, or for a convolution its im2col patches when they are larger."""
        most = 0
        for layer, shape_in, shape_out in zip(
            self.layers, self._inputs(), self.output_shapes, strict=True
        ):
            size = math.prod(shape_out)
            if isinstance(layer, Conv2d):
                size = max(size, math.prod(shape_out[1:]) * shape_in[0] * layer.kernel_size**2)
            most = max(most, size)
        return most

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "layers": [
                {**layer.to_dict(), "output_shape": list(shape)}
                for layer, shape in zip(self.layers, self.output_shapes, strict=True)
            ],
            "activation": self.activation.value,
            "num_params": self.num_params,
        }


NetworkSpec = MLPSpec | CNNSpec
"""Any target network; dispatch on the class (``isinstance(spec, CNNSpec)``)."""


def spec_from_dict(d: Mapping[str, Any]) -> NetworkSpec:
    """The spec recorded by :meth:`MLPSpec.to_dict` / :meth:`CNNSpec.to_dict` (the name
    under ``name`` or ``arch``). Raises ``ValueError`` (or ``KeyError`` / ``TypeError`` for
    a malformed record) if the record is inconsistent, e.g. a stated output shape or
    ``num_params`` that the layers do not imply."""
    name = str(d["name"] if "name" in d else d["arch"])
    activation = Activation(d.get("activation", Activation.RELU.value))
    spec: NetworkSpec
    if "layers" in d:
        layers: list[Layer] = []
        stated: list[list[int] | None] = []
        for rec in d["layers"]:
            kind = rec["type"]
            if kind == "conv2d":
                layers.append(
                    Conv2d(int(rec["out_channels"]), int(rec["kernel_size"]), int(rec["padding"]))
                )
            elif kind == "maxpool2d":
                layers.append(MaxPool2d(int(rec["size"])))
            elif kind == "dense":
                layers.append(Dense(int(rec["units"])))
            else:
                raise ValueError(f"unknown layer type {kind!r}")
            out = rec.get("output_shape")
            stated.append(None if out is None else [int(s) for s in out])
        c, h, w = (int(s) for s in d["input_shape"])
        spec = CNNSpec(name, (c, h, w), tuple(layers), activation)
        for i, (want, got) in enumerate(zip(stated, spec.output_shapes, strict=True)):
            if want is not None and tuple(want) != got:
                raise ValueError(
                    f"layer {i} ({spec.layers[i].token}) states output_shape {want}, "
                    f"its input implies {list(got)}"
                )
    else:
        spec = MLPSpec(name, tuple(int(s) for s in d["layer_sizes"]), activation)
    if "num_params" in d and int(d["num_params"]) != spec.num_params:
        raise ValueError(f"num_params {d['num_params']} != {spec.num_params} implied by the layers")
    return spec


# --------------------------------------------------------------------------- architectures

NAMED_ARCHITECTURES: Final[dict[str, str]] = {
    # Wang et al. (2018)'s MNIST networks.
    "fcnn1": "mlp:100",
    "fcnn2": "mlp:400,400",
    # The active-learning CNN of Gal, Islam & Ghahramani (2017) as in the APD reference code:
    # conv 32 3x3, ReLU, conv 32 3x3, ReLU, max-pool 2, fc 128, ReLU, fc C (dropout, where a
    # method uses it, on the input of each dense layer).
    "al-cnn": "cnn:conv32x3,conv32x3,pool2,fc128",
    # LeNet-5 (LeCun et al. 1998) as usually run on 28x28 MNIST: the first conv padded by 2.
    "lenet5": "cnn:conv6x5p2,pool2,conv16x5,pool2,fc120,fc84",
}
ARCH_SYNTAX: Final = (
    "mlp:W1[,W2...] or cnn:LAYER[,LAYER...] with LAYER one of conv{O}x{k}[p{p}], pool{s}, fc{W}"
)
MNIST_INPUT_SHAPE: Final = (1, 28, 28)
MNIST_CLASSES: Final = 10

_TOKEN = re.compile(r"conv(\d+)x(\d+)(?:p(\d+))?|pool(\d+)|fc(\d+)")


def _unknown(arch: str, why: str = "") -> ValueError:
    names = ", ".join(sorted(NAMED_ARCHITECTURES))
    reason = f" ({why})" if why else ""
    return ValueError(
        f"unknown architecture {arch!r}{reason}; choose one of: {names}, or {ARCH_SYNTAX}"
    )


def parse_arch(arch: str) -> tuple[Layer, ...]:
    """The hidden layers an architecture string names, without the output layer: all
    :class:`Dense` for an MLP, starting with a :class:`Conv2d` for a CNN. Checks the syntax
    only (:func:`build_spec` checks that the layers fit an input)."""
    text = NAMED_ARCHITECTURES.get(arch, arch)
    family, sep, body = text.partition(":")
    if not sep or family not in ("mlp", "cnn") or not body:
        raise _unknown(arch)
    tokens = body.split(",")
    if family == "mlp":
        if not all(t.isdigit() and int(t) > 0 for t in tokens):
            raise _unknown(arch, "mlp widths must be positive integers")
        return tuple(Dense(int(t)) for t in tokens)
    layers: list[Layer] = []
    for t in tokens:
        m = _TOKEN.fullmatch(t)
        if m is None:
            raise _unknown(arch, f"bad layer {t!r}")
        conv_o, conv_k, conv_p, pool, fc = m.groups()
        if conv_o is not None:
            layers.append(Conv2d(int(conv_o), int(conv_k), int(conv_p or 0)))
        elif pool is not None:
            layers.append(MaxPool2d(int(pool)))
        else:
            layers.append(Dense(int(fc)))
    if not isinstance(layers[0], Conv2d):
        raise _unknown(arch, "a cnn starts with a conv layer")
    if any(v <= 0 for layer in layers for v in _sizes(layer)):
        raise _unknown(arch, "channels, kernels, pools and widths must be positive")
    return tuple(layers)


def _sizes(layer: Layer) -> tuple[int, ...]:
    if isinstance(layer, Conv2d):
        return (layer.out_channels, layer.kernel_size)
    return (layer.size,) if isinstance(layer, MaxPool2d) else (layer.units,)


def build_spec(arch: str, input_shape: Sequence[int], num_classes: int) -> NetworkSpec:
    """The network ``arch`` names for inputs of ``input_shape`` (one example's raw shape:
    ``(D,)``, ``(H, W)`` or ``(C, H, W)``) and ``num_classes`` outputs. An MLP reads the
    example flattened; a CNN needs an image, ``(H, W)`` being read as ``(1, H, W)``.
    Raises ``ValueError`` naming the problem."""
    hidden = parse_arch(arch)
    shape = tuple(int(s) for s in input_shape)
    if num_classes < 2 or not shape or any(s <= 0 for s in shape):
        raise ValueError(
            f"need >= 2 classes and a positive input shape, got {list(shape)}, {num_classes}"
        )
    if not isinstance(hidden[0], Conv2d):
        widths = tuple(layer.units for layer in hidden if isinstance(layer, Dense))
        return MLPSpec(arch, (math.prod(shape), *widths, num_classes))
    if len(shape) not in (2, 3):
        raise ValueError(
            f"{arch} is a CNN: it needs image inputs (H x W or C x H x W), "
            f"not examples of shape {'x'.join(map(str, shape))}"
        )
    c, h, w = (1, *shape) if len(shape) == 2 else shape
    try:
        return CNNSpec(arch, (c, h, w), (*hidden, Dense(num_classes)))
    except ValueError as exc:
        raise ValueError(f"{arch} does not fit {c}x{h}x{w} inputs: {exc}") from None


def get_spec(arch: str) -> NetworkSpec:
    """The network ``arch`` names for MNIST (``1 x 28 x 28`` inputs, 10 classes), or a
    ``ValueError`` naming the valid architectures."""
    return build_spec(arch, MNIST_INPUT_SHAPE, MNIST_CLASSES)


ARCHITECTURES: Final[dict[str, NetworkSpec]] = {n: get_spec(n) for n in NAMED_ARCHITECTURES}
"""The named architectures on MNIST."""


# --------------------------------------------------------------------------- layout


def unflatten(spec: NetworkSpec, theta: FloatArray) -> list[tuple[FloatArray, FloatArray]]:
    """Views of ``theta (K, P)`` as ``[(W, b), ...]`` per parametrised layer: ``W (K, in,
    out)`` for a dense layer, ``(K, O, C, k, k)`` for a conv layer; ``b (K, out)``. No copy."""
    if theta.ndim != 2 or theta.shape[1] != spec.num_params:
        raise ValueError(f"expected theta of shape (K, {spec.num_params}), got {theta.shape}")
    k = theta.shape[0]
    return [
        (theta[:, ws].reshape(k, *w_shape), theta[:, bs])
        for (w_shape, _), (ws, bs) in zip(spec.layer_shapes, spec.offsets(), strict=True)
    ]


def flatten(spec: NetworkSpec, layers: list[tuple[FloatArray, FloatArray]]) -> FloatArray:
    """Inverse of :func:`unflatten`: ``[(W, b), ...] -> theta (K, P)``."""
    k = layers[0][0].shape[0]
    parts = []
    for (w, b), (w_shape, b_shape) in zip(layers, spec.layer_shapes, strict=True):
        if w.shape != (k, *w_shape) or b.shape != (k, *b_shape):
            raise ValueError(f"layer shapes {w.shape}, {b.shape} do not match the spec")
        parts += [w.reshape(k, -1), b]
    return np.concatenate(parts, axis=1)


def tail_start(spec: NetworkSpec) -> int:
    """Where the layers after the first begin in ``theta``: ``theta[:, tail_start:]`` is a
    network's tail, ``P_tail = num_params - tail_start`` weights."""
    return spec.offsets()[0][1].stop


def unflatten_tail(spec: NetworkSpec, tail: FloatArray) -> list[tuple[FloatArray, FloatArray]]:
    """Views of tails ``(K, P_tail)`` (``theta[:, tail_start(spec):]``) as the ``(W, b)`` of
    every parametrised layer after the first, shaped as in :func:`unflatten`. No copy."""
    start = tail_start(spec)
    if tail.ndim != 2 or tail.shape[1] != spec.num_params - start:
        raise ValueError(
            f"expected tails of shape (K, {spec.num_params - start}), got {tail.shape}"
        )
    k = tail.shape[0]
    out = []
    for (w_shape, _), (ws, bs) in list(zip(spec.layer_shapes, spec.offsets(), strict=True))[1:]:
        w = tail[:, ws.start - start : ws.stop - start].reshape(k, *w_shape)
        out.append((w, tail[:, bs.start - start : bs.stop - start]))
    return out


# --------------------------------------------------------------------------- MLP forward


def _first_layer(x: FloatArray, w: FloatArray, b: FloatArray) -> FloatArray:
    """``x (N, D)``, ``w (K, D, H)`` -> ``(K, N, H)``: the input broadcast over K networks.

    The weights are read once, in place (no transposed copy): at small N the pass is bound
    by reading K*D*H weights from memory, at large N it is K GEMMs of ``(N, D) @ (D, H)``.
    """
    return np.matmul(x[None], w) + b[:, None, :]


def _forward_one(layers: list[tuple[FloatArray, FloatArray]], x: FloatArray) -> FloatArray:
    """One input ``x (D,)`` through K networks -> ``(K, C)``: batched matrix-vector products.

    :func:`numpy.einsum` streams each ``(K, in, out)`` weight block once, where
    :func:`numpy.matmul` makes one BLAS call per network, each a poorly blocked 1-row GEMM:
    1.3-1.5x (fcNN1) and 1.9x (fcNN2) faster at N = 1, slower from N = 2 on (K = 100, one thread,
    warm or flushed caches; see docs/training.md).
    """
    w0, b0 = layers[0]
    return forward_hidden(layers[1:], np.einsum("d,kdh->kh", x, w0) + b0)


def forward_hidden(layers: list[tuple[FloatArray, FloatArray]], h: FloatArray) -> FloatArray:
    """The layers after the first of an MLP: ``h`` holds K networks' first-layer
    pre-activations, ``(K, N, H)`` or ``(K, H)`` for one input; each layer is ReLU then
    ``h @ W_k + b_k``. Returns the logits. ``h`` is overwritten (the ReLU runs in place)."""
    for w, b in layers:
        np.maximum(h, 0.0, out=h)
        if h.ndim == 2:
            h = np.einsum("kd,kdh->kh", h, w) + b
        else:
            h = np.matmul(h, w) + b[:, None, :]
    return h


# --------------------------------------------------------------------------- CNN forward

# Working-set bound of the reference CNN forward: networks go through in chunks whose largest
# layer (im2col patches included, input and output) stays under this many bytes.
CNN_CHUNK_BYTES: Final = 64 << 20


def images_nhwc(spec: CNNSpec, x: FloatArray) -> FloatArray:
    """Rows ``x (N, D)`` as channels-last images ``(N, H, W, C)`` (a view)."""
    c, h, w = spec.input_shape
    return x.reshape(x.shape[0], c, h, w).transpose(0, 2, 3, 1)


def im2col(x: FloatArray, kernel_size: int, padding: int = 0) -> FloatArray:
    """Patches of channels-last maps ``x (..., H, W, C)``: ``(..., Ho, Wo, C k k)``, each
    patch ordered ``(c, u, v)`` like a row of a conv weight ``(O, C, k, k)`` (a copy)."""
    if padding:
        pad = [(0, 0)] * (x.ndim - 3) + [(padding, padding), (padding, padding), (0, 0)]
        x = np.pad(x, pad)
    view = sliding_window_view(x, (kernel_size, kernel_size), axis=(-3, -2))
    return view.reshape(*view.shape[:-3], -1)


def conv_matrix(w: FloatArray) -> FloatArray:
    """Conv weights ``(K, O, C, k, k)`` as matrices ``(K, C k k, O)`` for ``patches @ W``
    (a view)."""
    return w.reshape(w.shape[0], w.shape[1], -1).transpose(0, 2, 1)


def _conv_shared(patches: FloatArray, w: FloatArray, b: FloatArray) -> FloatArray:
    """One input's patches ``(N, Ho, Wo, F)`` through K networks' convs -> ``(K, N, Ho, Wo, O)``."""
    n, ho, wo, f = patches.shape
    out = np.matmul(patches.reshape(n * ho * wo, f), conv_matrix(w))
    out += b[:, None, :]
    return out.reshape(w.shape[0], n, ho, wo, w.shape[1])


def _conv_batched(h: FloatArray, w: FloatArray, b: FloatArray, padding: int) -> FloatArray:
    """K networks' maps ``h (K, N, H, W, C)`` through their own convs -> ``(K, N, Ho, Wo, O)``."""
    k, n = h.shape[:2]
    patches = im2col(h, w.shape[-1], padding)
    ho, wo, f = patches.shape[2:]
    out = np.matmul(patches.reshape(k, n * ho * wo, f), conv_matrix(w))
    out += b[:, None, :]
    return out.reshape(k, n, ho, wo, w.shape[1])


def _max_pool(h: FloatArray, s: int) -> FloatArray:
    """``(K, N, H, W, C)`` -> ``(K, N, H // s, W // s, C)``, max over ``s x s`` windows."""
    k, n, hh, ww, c = h.shape
    ho, wo = hh // s, ww // s
    return h[:, :, : ho * s, : wo * s, :].reshape(k, n, ho, s, wo, s, c).max(axis=(3, 5))


def first_layer(spec: NetworkSpec, x: FloatArray, w: FloatArray, b: FloatArray) -> FloatArray:
    """The first layer's pre-activations of K networks ``(w, b)`` (as :func:`unflatten`
    shapes them) on shared inputs ``x (N, D)``: ``(K, N, H1)`` for an MLP, channels-last
    ``(K, N, Ho, Wo, O)`` for a CNN. Continue with :func:`forward_after_first`."""
    x = x.astype(w.dtype, copy=False)
    if isinstance(spec, MLPSpec):
        return _first_layer(x, w, b)
    conv = spec.layers[0]
    assert isinstance(conv, Conv2d)
    return _conv_shared(im2col(images_nhwc(spec, x), conv.kernel_size, conv.padding), w, b)


def forward_after_first(
    spec: NetworkSpec, layers: list[tuple[FloatArray, FloatArray]], h: FloatArray
) -> FloatArray:
    """Logits ``(K, N, C)`` from the first layer's pre-activations ``h`` (of
    :func:`first_layer`) through ``layers``, the ``(W, b)`` of every parametrised layer after
    the first (``unflatten(spec, theta)[1:]`` or :func:`unflatten_tail`). ``h`` is
    overwritten."""
    if isinstance(spec, MLPSpec):
        return forward_hidden(layers, h)
    params = iter(layers)
    np.maximum(h, 0.0, out=h)  # the first layer is a conv: ReLU
    last = len(spec.layers) - 1
    for i, layer in enumerate(spec.layers[1:], start=1):
        if isinstance(layer, MaxPool2d):
            h = _max_pool(h, layer.size)
            continue
        w, b = next(params)
        if isinstance(layer, Conv2d):
            h = _conv_batched(h, w, b, layer.padding)
        else:
            if h.ndim == 5:  # flatten each map in (C, H, W) order
                h = h.transpose(0, 1, 4, 2, 3).reshape(h.shape[0], h.shape[1], -1)
            h = np.matmul(h, w)
            h += b[:, None, :]
        if i < last:
            np.maximum(h, 0.0, out=h)
    return h


def network_chunk(spec: NetworkSpec, num_inputs: int, budget_bytes: int = CNN_CHUNK_BYTES) -> int:
    """How many networks go through a CNN forward at once for ``num_inputs`` inputs so that
    the largest layer (input and output, float32) stays within ``budget_bytes``."""
    per_network = 2 * 4 * max(1, num_inputs) * spec.max_activations
    return max(1, budget_bytes // per_network)


def forward_logits(spec: NetworkSpec, theta: FloatArray, x: FloatArray) -> FloatArray:
    """Logits of K networks on N inputs: ``theta (K, P)``, ``x (N, D)`` -> ``(K, N, C)``."""
    if x.ndim != 2 or x.shape[1] != spec.input_dim:
        raise ValueError(f"expected inputs of shape (N, {spec.input_dim}), got {x.shape}")
    if isinstance(spec, MLPSpec):
        layers = unflatten(spec, theta)
        if x.shape[0] == 1:
            return _forward_one(layers, x[0].astype(theta.dtype, copy=False))[:, None, :]
        w0, b0 = layers[0]
        return forward_hidden(layers[1:], _first_layer(x.astype(theta.dtype, copy=False), w0, b0))
    unflatten(spec, theta)  # shape check
    conv = spec.layers[0]
    assert isinstance(conv, Conv2d)
    patches = im2col(
        images_nhwc(spec, x.astype(theta.dtype, copy=False)), conv.kernel_size, conv.padding
    )
    chunk = network_chunk(spec, x.shape[0])
    outs = []
    for start in range(0, theta.shape[0], chunk):
        (w0, b0), *rest = unflatten(spec, theta[start : start + chunk])
        outs.append(forward_after_first(spec, rest, _conv_shared(patches, w0, b0)))
    return outs[0] if len(outs) == 1 else np.concatenate(outs)


def softmax(logits: FloatArray, axis: int = -1) -> FloatArray:
    z = logits - logits.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def forward_probs(spec: NetworkSpec, theta: FloatArray, x: FloatArray) -> FloatArray:
    """Softmax outputs of K networks on N inputs: ``(K, N, C)``."""
    return softmax(forward_logits(spec, theta, x))
