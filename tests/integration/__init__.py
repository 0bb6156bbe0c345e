"""Integration tests: servers, child processes and training runs (`make test-integration`).

A package, so that a file may share its name with its unit half and so that pytest puts tests/ on
sys.path: the helpers there (server_utils, remote_utils, ...) import by name.
"""
