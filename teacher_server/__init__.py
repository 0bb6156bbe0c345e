"""gRPC teacher server: engine, batcher, servicer and server wiring (`python -m teacher_server`)."""
