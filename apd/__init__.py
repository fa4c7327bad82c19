"""apd: Adversarial Posterior Distillation, from SGLD samples to served uncertainty.

This core package holds what training and serving share: the target-network spec and its
batched forward (:mod:`apd.networks`), the uncertainty maths (:mod:`apd.uncertainty`) and
the checkpoint format (:mod:`apd.checkpoint`). It needs NumPy, safetensors and pydantic only.
"""

__version__ = "0.1.0"
