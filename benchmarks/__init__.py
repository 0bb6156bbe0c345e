"""Performance harnesses (run with `python -m benchmarks.<name>`)."""
