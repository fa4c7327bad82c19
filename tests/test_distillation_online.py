"""Algorithm 2 (online APD): the FIFO buffer, and a short run on a tiny problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apd.checkpoint import Design
from apd.networks import MLPSpec
from training import sgld
from training.distillation.gan import WGANGPConfig
from training.distillation.offline import DistillConfig
from training.distillation.online import OnlineConfig, RingBuffer, distill_online
from training.metrics import accuracy
from training.torch_ops import member_probs

SPEC = MLPSpec("tiny", (4, 8, 3))


def test_ring_buffer_keeps_the_most_recent_rows() -> None:
    buf = RingBuffer(4, 2, torch.device("cpu"))
    for i in range(10):
        buf.push(torch.full((1, 2), float(i)), torch.tensor([i % 3]))
    assert buf.size == 4
    assert sorted(buf.contents()[:, 0].tolist()) == [6.0, 7.0, 8.0, 9.0]
    assert buf.recent(2)[:, 0].tolist() == [9.0, 8.0]
    x, onehot = buf.sampler(torch.Generator().manual_seed(0), components=3)(50)
    assert onehot is not None
    # Each drawn row keeps its chain id: row value i came from chain i % 3.
    assert torch.equal(onehot.argmax(1), x[:, 0].long() % 3)


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = np.array([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    return (centres[y] + 0.5 * rng.standard_normal((n, 4))).astype(np.float32), y


def test_online_run_trains_the_generator_alongside_sgld(one_thread: None) -> None:
    x, y = _blobs(300, 0)
    vx, vy = _blobs(200, 1)
    distill = DistillConfig(
        design=Design.SUBSPACE,
        gan=WGANGPConfig(noise_dim=4, generator_hidden=(32,), critic_hidden=(32,), lr=3e-3),
        steps=60,
        rank=4,
        basis_dtype="float32",
        condition_on_chains=True,
        residual_scales=(0.0, 1.0),
        eval_every=30,
        num_networks=20,
    )
    cfg = OnlineConfig(
        distill=distill,
        num_chains=2,
        sgld_lr=0.05,
        batch_size=50,
        burn_in=300,
        thinning=5,
        buffer_size=60,
        warmup_samples=20,
    )
    res = distill_online(SPEC, x, y, cfg, val=(vx, vy), progress=False)
    # Warm-up: burn-in, then 10 keeps of 2 chains; then one SGLD step per generator step.
    assert res.sgld_steps == 300 + 10 * 5 + 60
    assert res.samples_seen == 20 + 2 * (60 // 5)
    assert [h["step"] for h in res.history] == [30, 60]
    assert res.generator.components == 2
    assert res.final_chains is not None
    chains_acc = accuracy(member_probs(SPEC, res.final_chains, vx).mean(0).numpy(), vy)
    theta = res.generator.sample(50, torch.Generator().manual_seed(0))
    apd_acc = accuracy(member_probs(SPEC, theta, vx).mean(0).numpy(), vy)
    assert chains_acc > 0.95  # the blobs are easy: SGLD has converged
    assert apd_acc > 0.9  # and so has the generator, after 60 steps on the buffer


def test_cyclical_run_grows_a_component_and_directions_per_cycle(one_thread: None) -> None:
    """Under the cyclical schedule every (chain, cycle) is a component, every cycle adds its
    share of the subspace directions as it starts sampling, and the monitor's teacher is a
    reservoir over the whole run; the GAN finishes on the buffer after the chains stop."""
    x, y = _blobs(300, 0)
    vx, vy = _blobs(200, 1)
    distill = DistillConfig(
        design=Design.SUBSPACE,
        gan=WGANGPConfig(noise_dim=4, generator_hidden=(32,), critic_hidden=(32,), lr=3e-3),
        steps=150,
        rank=6,
        basis_dtype="float32",
        condition_on_chains=True,
        residual_scales=(0.0,),
        eval_every=50,
        num_networks=20,
    )
    cfg = OnlineConfig(
        distill=distill,
        num_chains=2,
        sgld_lr=0.1,
        batch_size=50,
        burn_in=0,
        thinning=5,
        buffer_size=200,
        warmup_samples=10,
        schedule=sgld.ScheduleKind.CYCLICAL,
        cycles=3,
        cycle_steps=200,
        explore_fraction=0.5,
        moment_init_steps=50,
    )
    reports: list[str] = []
    res = distill_online(SPEC, x, y, cfg, val=(vx, vy), progress=False, report=reports.append)
    g = res.generator
    assert res.sgld_steps == 3 * 200  # the chains stop after their cycles
    assert res.samples_seen == 3 * 2 * (100 // 5)  # sampling stages only: 20 per chain and cycle
    assert g.components == 6
    assert g.basis is not None and g.output_dim == 6
    assert bool((g.basis.norm(dim=1) > 0.99).all())  # every reserved direction was filled
    gram = g.basis @ g.basis.T
    torch.testing.assert_close(gram, torch.eye(6), atol=1e-4, rtol=0)
    assert sum("more subspace directions" in r for r in reports) == 2
    # Model selection starts once the last cycle's directions exist (step 100 of the
    # 100 sampling steps per cycle... at thinning 5 that is the 5th keep of cycle 3).
    assert res.history and all(h["sgld_step"] > 2 * 200 + 100 for h in res.history)
    assert res.teacher is not None and len(res.teacher) == 20
    theta = g.sample(60, torch.Generator().manual_seed(0))
    apd_acc = accuracy(member_probs(SPEC, theta, vx).mean(0).numpy(), vy)
    chains_acc = accuracy(member_probs(SPEC, res.teacher, vx).mean(0).numpy(), vy)
    assert chains_acc > 0.95
    assert apd_acc > 0.9


def test_online_config_refuses_what_online_apd_cannot_run() -> None:
    distill = DistillConfig(design=Design.SUBSPACE, gan=WGANGPConfig(), steps=10)
    with pytest.raises(ValueError, match="cycles"):
        OnlineConfig(distill=distill, cycles=3)  # cycles need the cyclical schedule
    with pytest.raises(ValueError, match="constant or a cyclical"):
        OnlineConfig(distill=distill, schedule=sgld.ScheduleKind.POLYNOMIAL)
    with pytest.raises(ValueError, match="keeps fewer than the 20 warm-up samples"):
        OnlineConfig(  # 50 sampling steps at thinning 10: 5 samples per chain, 10 needed
            distill=distill,
            schedule=sgld.ScheduleKind.CYCLICAL,
            cycles=2,
            cycle_steps=100,
            explore_fraction=0.5,
            num_chains=2,
            thinning=10,
            warmup_samples=20,
        )
    with pytest.raises(ValueError, match="explore_fraction"):
        OnlineConfig(distill=distill, schedule=sgld.ScheduleKind.CYCLICAL, explore_fraction=1.0)


def test_sampler_like_offline_paces_the_gan_and_adds_the_steps_after() -> None:
    from training.defaults import sgld_defaults
    from training.distillation.offline import preset
    from training.distillation.online import sampler_like_offline

    defaults = sgld_defaults("fcnn2", "mlp", None)  # 4 chains x 5 cycles of 8,000 steps
    distill = preset("default", "fcnn2")
    config = sampler_like_offline(defaults, distill)
    sampling = defaults.cycle_steps - int(defaults.explore_fraction * defaults.cycle_steps)
    first_fit = defaults.cycle_steps - sampling + 10 * defaults.thinning
    running = defaults.steps - first_fit
    # one GAN step every `per` SGLD steps: the fewest SGLD steps per GAN step that keep the
    # GAN steps while the chains run at most distill.steps / 2
    per = config.sgld_steps_per_gan_step
    during = -(-running // per)
    assert per > 1 and during <= distill.steps // 2 < running / (per - 1)
    assert config.distill.steps == distill.steps + during
    assert config.buffer_size == defaults.chains * (defaults.steps // defaults.cycle_steps) * (
        sampling // defaults.thinning
    )
    longer = sampler_like_offline(defaults, distill, after_steps=2 * distill.steps)
    assert longer.sgld_steps_per_gan_step == per  # the pace while the chains run is unchanged
    assert longer.distill.steps == 2 * distill.steps + during
    with pytest.raises(ValueError, match="after_steps"):
        sampler_like_offline(defaults, distill, after_steps=0)
