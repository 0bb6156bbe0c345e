"""Generated protobuf and gRPC modules for ``protos/`` (regenerate with ``make protos``)."""
