"""The APD inference service: loads one generator checkpoint and serves calibrated uncertainty.

``apd serve`` (:mod:`service.cli`) runs :func:`service.api.app.create_app` under uvicorn. The
service reads the checkpoint through :func:`apd.checkpoint.load_checkpoint` and never imports
``training``. Posterior networks are codes in the generator's affine subspace, drawn in blocks
(:mod:`service.core.networks`), cached in-process and in Redis (:mod:`service.infra.cache`), and
run by the factored forward (:mod:`apd.factored`) under a memory budget
(:mod:`service.infra.admission`), all held by :mod:`service.core.model`.
"""
