"""The Open Inference Protocol's gRPC binding (``apd serve --grpc-port``): :mod:`.server`
starts it beside the HTTP app, :mod:`.servicer` is its codec over the serving core, and
``grpc_service_pb2*`` are generated from ``grpc_service.proto`` (``make proto``)."""
