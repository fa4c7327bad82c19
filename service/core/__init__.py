"""The domain: a served model answers a query (:meth:`service.core.model.ServedModel.predict`).

Nothing here knows HTTP, JSON or gRPC; the codecs (:mod:`service.codecs`) and transports
(:mod:`service.api`, :mod:`service.grpc`) decode a request into a query, call the core, and
encode its answer.
"""
