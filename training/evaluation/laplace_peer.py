"""laplace-torch (Daxberger et al. 2021, "Laplace Redux") on the SGD network, as a peer.

The SGD network ``theta_MAP`` becomes a ``torch.nn.Sequential`` (:func:`network_module`),
laplace-torch fits a Laplace approximation around it on the training images,

    ``p(theta | D) ~ N(theta_MAP, (H + P_0)^-1)``,

with ``H`` the generalised Gauss-Newton of the training NLL in Kronecker-factored form (KFAC:
per layer ``H_l ~ A_l (x) G_l``, input and output-gradient factors) and ``P_0`` the prior
precision, chosen by maximising the Laplace marginal likelihood
(``optimize_prior_precision(method="marglik")``; see :attr:`LaplaceFlavour.prior_structure`).
Two flavours (:class:`LaplaceFlavour`):

* ``laplace_ll``: last layer only (the other layers stay at the MAP);
* ``laplace_kfac``: every layer. The full ``P x P`` Hessian is out of reach: for fcNN1's
  79,510 weights it is 25 GB in float32 and its Cholesky ``P^3 / 3 ~ 1.7e14`` flops, while
  KFAC's factors are ``785^2 + 100^2 + 101^2 + 10^2`` numbers. KFAC rather than diagonal,
  since it keeps the correlations inside each layer.

The predictive samples K networks from the Gaussian (laplace-torch's ``pred_type="nn"``,
``link_approx="mc"``: :meth:`BaseLaplace.sample`, then one forward pass each), so the
members, their mutual information and the attacks are those of every other method. To serve
it one stores the MAP and the Hessian's factors.

laplace-torch is in the ``eval`` extra (``pip install 'apd[eval]'``); without it the suite
lists the two methods as missing.
"""

from __future__ import annotations

import enum
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

import numpy as np
import torch
from numpy.typing import NDArray

from apd.networks import CNNSpec, Conv2d, Dense, MaxPool2d, MLPSpec, NetworkSpec
from training.errors import UserError
from training.evaluation.methods import F32, MemberNetworks
from training.evaluation.results import Provenance

DEFAULT_FIT_BATCH: Final = 500
MARGLIK_STEPS: Final = 100


class LaplaceFlavour(enum.StrEnum):
    """Which weights the Laplace approximation covers; the value is the method's key."""

    LAST_LAYER = "laplace_ll"
    ALL_LAYERS = "laplace_kfac"

    @property
    def subset_of_weights(self) -> str:
        return "last_layer" if self is LaplaceFlavour.LAST_LAYER else "all"

    @property
    def prior_structure(self) -> str:
        """One prior precision per parameter tensor where laplace-torch allows it (KFAC over
        all layers), one for the whole last layer otherwise (its last-layer classes take a
        scalar or a diagonal prior only)."""
        return "scalar" if self is LaplaceFlavour.LAST_LAYER else "layerwise"

    @property
    def label(self) -> str:
        return (
            "Laplace, last layer (KFAC)"
            if self is LaplaceFlavour.LAST_LAYER
            else "Laplace, all layers (KFAC)"
        )


def network_module(spec: NetworkSpec, theta: torch.Tensor) -> torch.nn.Sequential:
    """The network of ``theta (P,)`` as a ``torch.nn.Sequential`` over inputs ``(N, D)``,
    computing what :func:`training.torch_ops.forward_logits` computes (the layout of
    :mod:`apd.networks`: a dense weight is ``(fan_in, fan_out)``, ``nn.Linear``'s its
    transpose; a conv weight is already ``nn.Conv2d``'s). Parameters take ``theta``'s dtype."""
    if theta.shape != (spec.num_params,):
        raise ValueError(f"expected theta ({spec.num_params},), got {tuple(theta.shape)}")
    pieces = [
        (theta[ws].reshape(w_shape), theta[bs])
        for (w_shape, _), (ws, bs) in zip(spec.layer_shapes, spec.offsets(), strict=True)
    ]
    mods: list[torch.nn.Module] = []

    def linear(w: torch.Tensor, b: torch.Tensor) -> torch.nn.Linear:
        lin = torch.nn.Linear(w.shape[0], w.shape[1], dtype=theta.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.T)
            lin.bias.copy_(b)
        return lin

    if isinstance(spec, MLPSpec):
        for i, (w, b) in enumerate(pieces):
            if i > 0:
                mods.append(torch.nn.ReLU())
            mods.append(linear(w, b))
        return torch.nn.Sequential(*mods)
    assert isinstance(spec, CNNSpec)
    mods.append(torch.nn.Unflatten(1, spec.input_shape))
    params = iter(pieces)
    dense_seen = 0
    for layer in spec.layers:
        if isinstance(layer, Conv2d):
            w, b = next(params)
            conv = torch.nn.Conv2d(
                w.shape[1], w.shape[0], w.shape[2], padding=layer.padding, dtype=theta.dtype
            )
            assert conv.bias is not None
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(b)
            mods += [conv, torch.nn.ReLU()]
        elif isinstance(layer, MaxPool2d):
            mods.append(torch.nn.MaxPool2d(layer.size))
        else:
            assert isinstance(layer, Dense)
            if dense_seen == 0:
                mods.append(torch.nn.Flatten())
            else:
                mods.append(torch.nn.ReLU())
            dense_seen += 1
            mods.append(linear(*next(params)))
    return torch.nn.Sequential(*mods)


def module_order(spec: NetworkSpec) -> NDArray[np.int64]:
    """``order[j]``: the position in ``theta`` of entry ``j`` of
    ``parameters_to_vector(network_module(spec, theta).parameters())``."""
    index = torch.arange(spec.num_params, dtype=torch.float64)  # exact below 2^53
    module = network_module(spec, index)
    flat = torch.nn.utils.parameters_to_vector(module.parameters())
    return flat.detach().numpy().astype(np.int64)


@dataclass(frozen=True)
class LaplaceSettings:
    """How the Laplace peers are fitted (recorded in the report's provenance)."""

    fit_inputs: int | None = None  # training images the Hessian is summed over (None: all)
    batch_size: int = DEFAULT_FIT_BATCH
    seed: int = 0


@dataclass(frozen=True)
class LaplacePosterior:
    """A fitted laplace-torch approximation; a draw is K networks in ``theta`` layout."""

    spec: NetworkSpec
    flavour: LaplaceFlavour
    map_theta: F32  # (P,)
    laplace: Any  # laplace.baselaplace.ParametricLaplace (KronLaplace or KronLLLaplace)
    positions: NDArray[np.int64]  # where laplace's parameter vector sits in theta
    source: Provenance = field(default_factory=Provenance)

    @property
    def key(self) -> str:
        return self.flavour.value

    @property
    def label(self) -> str:
        return self.flavour.label

    def sample_theta(self, num_samples: int, seed: int) -> F32:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            drawn = self.laplace.sample(num_samples, generator=gen)
        theta = np.repeat(self.map_theta[None], num_samples, axis=0)
        theta[:, self.positions] = drawn.detach().numpy().astype(np.float32)
        return theta

    def draw(self, num_samples: int, seed: int) -> MemberNetworks:
        theta = torch.from_numpy(self.sample_theta(num_samples, seed))
        return MemberNetworks(self.spec, theta)

    def hessian_floats(self) -> int:
        """Numbers in the Kronecker factors (and per-factor scalars) laplace-torch keeps."""
        return sum(int(f.numel()) for block in self.laplace.H_facs.kfacs for f in block)

    def stored_bytes(self) -> int:
        """The MAP, the Hessian's factors and the prior precisions, as float32."""
        prior = int(torch.as_tensor(self.laplace.prior_precision).numel())
        return 4 * (self.spec.num_params + self.hessian_floats() + prior)

    def provenance(self) -> Provenance:
        # In the order of the Provenance record (results.json reads back byte for byte): how
        # the posterior was fitted, then the SGD run it was fitted to.
        record: dict[str, Any] = {
            "subset_of_weights": self.flavour.subset_of_weights,
            "hessian_structure": "kron",
            "laplace_params": len(self.positions),
            "hessian_floats": self.hessian_floats(),
            "prior_structure": self.flavour.prior_structure,
            "prior_precision": [
                float(v) for v in torch.as_tensor(self.laplace.prior_precision).reshape(-1)
            ],
        }
        fit_keys = ("fit_inputs", "log_marginal_likelihood", "fit_seconds")
        source = dict(self.source)
        record |= {k: source.pop(k) for k in fit_keys if k in source}
        return cast(Provenance, record | source)


def fit_laplace(
    spec: NetworkSpec,
    map_theta: F32,
    train_x: NDArray[np.floating],
    train_y: NDArray[np.integer],
    flavour: LaplaceFlavour,
    settings: LaplaceSettings | None = None,
    source: Provenance | None = None,
    log: Callable[[str], None] | None = None,
) -> LaplacePosterior:
    """Fit ``flavour`` around ``map_theta (P,)`` on ``(train_x, train_y)`` (see module)."""
    try:
        from laplace import Laplace
    except ImportError as exc:
        raise UserError(
            f"laplace-torch is not installed ({exc}); install the eval extra: "
            "pip install -e '.[eval]'"
        ) from None
    settings = settings or LaplaceSettings()
    theta = np.asarray(map_theta, np.float32).reshape(-1)
    x, y = np.asarray(train_x), np.asarray(train_y)
    if settings.fit_inputs is not None and settings.fit_inputs < len(x):
        rng = np.random.default_rng(settings.seed)
        pick = np.sort(rng.choice(len(x), settings.fit_inputs, replace=False))
        x, y = x[pick], y[pick]
    model = network_module(spec, torch.from_numpy(theta))
    data = torch.utils.data.TensorDataset(
        torch.from_numpy(np.require(x, np.float32, ["C", "W"])),  # copies read-only arrays
        torch.from_numpy(np.asarray(y, np.int64)),
    )
    loader = torch.utils.data.DataLoader(data, batch_size=settings.batch_size)
    t0 = time.perf_counter()
    la = Laplace(
        model,
        "classification",
        subset_of_weights=flavour.subset_of_weights,
        hessian_structure="kron",
    )
    la.fit(loader)
    with warnings.catch_warnings():
        # laplace-torch reminds callers that marglik ignores the predictive's link function
        warnings.filterwarnings("ignore", message="By default `link_approx`")
        la.optimize_prior_precision(
            pred_type="nn",
            method="marglik",
            link_approx="mc",
            prior_structure=flavour.prior_structure,
            n_steps=MARGLIK_STEPS,
        )
    log_marglik = float(la.log_marginal_likelihood().detach())
    seconds = time.perf_counter() - t0
    order = module_order(spec)
    positions = order if flavour is LaplaceFlavour.ALL_LAYERS else order[-int(la.n_params) :]
    if len(positions) != int(la.n_params):
        raise ValueError(f"laplace-torch covers {la.n_params} weights, expected {len(positions)}")
    if log is not None:
        log(
            f"{flavour.value}: KFAC Laplace over {len(positions)} weights on {len(x)} images, "
            f"log marginal likelihood {log_marglik:.1f}, {seconds:.0f} s"
        )
    return LaplacePosterior(
        spec=spec,
        flavour=flavour,
        map_theta=theta,
        laplace=la,
        positions=positions,
        source={
            **(source or {}),
            "fit_inputs": len(x),
            "log_marginal_likelihood": log_marglik if math.isfinite(log_marglik) else None,
            "fit_seconds": round(seconds, 1),
        },
    )
