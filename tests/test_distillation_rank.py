"""The pieces that let the subspace GAN train at higher ranks: the codes' scaling and the rank
chosen by variance held."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch

from apd.checkpoint import Design
from training.distillation.gan import WGANGPConfig
from training.distillation.offline import (
    CodeScaling,
    DistillConfig,
    build_subspace_generator,
    distill_offline,
)
from training.distillation.subspace import fit_subspace, rank_for_variance


def _samples(seed: int = 0, s: int = 60, p: int = 40) -> np.ndarray:
    """Samples whose principal directions have standard deviations 8, 6.4, 5.12, ... (x 0.8)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((p, p)))
    sd = 8.0 * 0.8 ** np.arange(p)
    return ((rng.standard_normal((s, p)) * sd) @ q.T + 3.0).astype(np.float32)


@pytest.mark.parametrize("scaling", get_args(CodeScaling))
def test_scaled_codes_map_back_to_the_coefficients(scaling: CodeScaling) -> None:
    sub = fit_subspace(_samples(), 5)
    cfg = WGANGPConfig(noise_dim=4)
    gen, data = build_subspace_generator(sub, cfg, torch.device("cpu"), scaling=scaling)
    c = torch.from_numpy(sub.coefficients)
    np.testing.assert_allclose(
        (data * gen.scale + gen.shift).numpy(), c.numpy(), rtol=1e-5, atol=1e-4
    )
    np.testing.assert_allclose(data.mean(0).numpy(), 0.0, atol=1e-5)
    sd = data.std(0).numpy()
    if scaling == "coordinate":
        np.testing.assert_allclose(sd, 1.0, rtol=1e-5)
    else:  # one scale: the codes keep their relative sizes, mean variance 1
        np.testing.assert_allclose(sd / sd[0], c.std(0).numpy() / float(c[:, 0].std()), rtol=1e-5)
        assert float((data.std(0) ** 2).mean()) == pytest.approx(1.0, rel=1e-5)
        assert torch.unique(gen.scale).numel() == 1


def test_rank_for_variance_on_a_known_spectrum() -> None:
    v = np.array([50.0, 30.0, 10.0, 5.0, 3.0, 2.0])  # total 100: held 0.5, 0.8, 0.9, 0.95, ...
    assert rank_for_variance(v, 0.5, 6) == 1
    assert rank_for_variance(v, 0.9, 6) == 3  # exactly met
    assert rank_for_variance(v, 0.91, 6) == 4
    assert rank_for_variance(v[::-1], 0.91, 6) == 4  # order does not matter
    assert rank_for_variance(v, 0.99, 6) == 6
    assert rank_for_variance(v, 0.99, 4) == 4  # capped
    assert rank_for_variance(v, 1.0, 10) == 6
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="variance target"):
            rank_for_variance(v, bad, 6)


def test_fit_subspace_takes_the_rank_that_holds_the_target() -> None:
    x = _samples(s=400)
    full = fit_subspace(x, 20)
    variances = full.singular_values**2 / (len(x) - 1)
    held = np.cumsum(variances) / full.total_variance
    want = int(np.flatnonzero(held >= 0.99)[0]) + 1
    auto = fit_subspace(x, 20, variance_target=0.99)
    assert auto.rank == want and 1 < want < 20
    assert auto.explained_variance_ratio >= 0.99
    np.testing.assert_allclose(np.abs(auto.basis), np.abs(full.basis[:want]), atol=1e-5)
    assert fit_subspace(x, 2, variance_target=0.99).rank == 2  # the cap


def test_distill_offline_with_auto_rank_shared_scaling_and_moments(one_thread: None) -> None:
    """The settings together through Algorithm 1: the rank the variance target picks, and a
    generator whose every direction trained."""
    x = _samples(s=120, p=30)
    gan = WGANGPConfig(noise_dim=4, generator_hidden=(16,), critic_hidden=(16,))
    config = DistillConfig(
        design=Design.SUBSPACE,
        gan=gan,
        steps=30,
        rank=10,
        basis_dtype="float32",
        residual_scales=(0.0,),
        eval_every=10,
        code_scaling="shared",
        moment_init_steps=20,
        variance_target=0.95,
    )
    want = fit_subspace(x, 10, variance_target=0.95).rank
    result = distill_offline(x, config, progress=False)
    assert result.subspace is not None and result.subspace["rank"] == want > 2
    out = result.generator(torch.randn(8, 4)).detach()
    assert result.generator.output_dim == want
    assert bool((out.std(0) > 0).all())  # every direction varies with the noise
    for bad in (
        {"code_scaling": "diagonal"},
        {"moment_init_steps": -1},
        {"variance_target": 1.5},
    ):
        with pytest.raises(ValueError):
            DistillConfig(**{**config.__dict__, **bad})
