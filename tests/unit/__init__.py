"""Unit tests: no process, no server (not even an in-process gRPC one) and no training loop (`make test-unit`).

A package, so that a file may share its name with its integration half and so that pytest puts tests/ on
sys.path: the helpers there (server_utils, remote_utils, ...) import by name.
"""
