"""The APD inference service: loads one generator checkpoint and serves calibrated uncertainty.

``apd serve`` (:mod:`service.cli`) runs :func:`service.main.create_app` under uvicorn. The
service reads the checkpoint through :func:`apd.checkpoint.load_checkpoint` and never imports
``training``. Posterior networks are codes in the generator's affine subspace, drawn in blocks
(:mod:`service.posterior_pool`), cached in-process and in Redis (:mod:`service.cache`), and
run by the factored forward (:mod:`apd.factored`) under a memory budget
(:mod:`service.admission`), all held by :mod:`service.runtime`.
"""
