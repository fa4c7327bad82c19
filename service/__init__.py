"""The APD inference service: loads one generator checkpoint and serves calibrated uncertainty.

``apd serve`` (:mod:`service.cli`) runs :func:`service.main.create_app` under uvicorn. The
service reads the checkpoint through :func:`apd.checkpoint.load_checkpoint` and never imports
``training``. Posterior networks are drawn from the generator in blocks
(:mod:`service.posterior_pool`), cached in-process and in Redis (:mod:`service.cache`), and
evaluated as one batched forward (:mod:`service.backends`, :mod:`service.inference`).
"""
