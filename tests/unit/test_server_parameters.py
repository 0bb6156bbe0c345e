"""GetParameters' config: the parameters token needs serve_parameters, a chunk floor (served, against an
in-process server: tests/integration/test_server_parameters.py)."""

import pytest


def test_parameters_token_needs_serve_parameters():
  from distill_core.config import ConfigError, load_config
  from teacher_server.config import ServerConfig
  with pytest.raises(ConfigError, match="needs serve_parameters"):
    load_config(ServerConfig, None, ["security.parameters_token=x"])
  with pytest.raises(ConfigError, match="parameter_chunk_bytes"):
    load_config(ServerConfig, None, ["parameter_chunk_bytes=100"])
