"""The APD inference service: serves the generators of a model repository (or one checkpoint)
and answers with calibrated uncertainty.

``apd serve`` (:mod:`service.cli`) runs :func:`service.api.app.create_app` under uvicorn. The
service reads checkpoints through :func:`apd.checkpoint.load_checkpoint` and never imports
``training``. Layers (docs/architecture.md): :mod:`service.core` (a model version answers a
query: :meth:`service.core.model.ServedModel.predict`; the repository; the networks' sources;
batching; limits), :mod:`service.codecs` (wire formats), :mod:`service.api` and
:mod:`service.grpc` (transports), :mod:`service.infra` (caches, admission, metrics, logging).
"""
