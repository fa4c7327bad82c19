"""Adversarial Posterior Distillation (Wang, Vicol, Lucas, Gu, Grosse & Zemel, ICML 2018).

APD trains a WGAN-GP whose generator maps noise ``z`` to whole weight vectors ``theta`` of a
target network, on posterior samples drawn by SGLD, so that the generator alone can later
draw as many posterior networks as a prediction needs.

* :mod:`training.distillation.gan`: generator, critic and the WGAN-GP losses (the maths in one
  place).
* :mod:`training.distillation.subspace`: the PCA subspace and residual noise of the default design.
* :mod:`training.distillation.offline`: Algorithm 1, distillation of a fixed set of SGLD samples.
* :mod:`training.distillation.online`: Algorithm 2, the GAN trained alongside SGLD on a sample
  buffer.
* :mod:`training.distillation.fidelity`: how close a generator's predictive is to the SGLD
  teacher's.
* :mod:`training.distillation.calibrate`: anomaly thresholds on held-out validation data.
* :mod:`training.distillation.package`: the generator as an :mod:`apd.checkpoint` file,
  and networks drawn from such a file (by :meth:`apd.checkpoint.Checkpoint.generate`).
* :mod:`training.distillation.toy_posterior`: a small posterior with known separated modes
  (mode coverage).
* :mod:`training.distillation.distill`, :mod:`training.distillation.export`: the
  ``apd distill`` and ``apd export`` subcommands.
"""
