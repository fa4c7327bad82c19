"""The test suite, and the helpers its tests and the benchmarks import as ``tests.<module>``:
``harness`` (a tiny checkpoint, a private redis-server, an ``apd serve`` process),
``service_support``, ``fuzzkit``, ``deploy_support`` and ``own_data_support``."""
