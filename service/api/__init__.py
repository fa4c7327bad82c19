"""HTTP layer: routes (:mod:`service.api.routes`), dependencies (:mod:`service.api.deps`)."""
