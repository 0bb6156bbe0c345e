"""The security config refuses inconsistent settings (token, TLS and mutual TLS against an in-process server
are in tests/integration/test_server_security.py)."""

import pytest


def test_config_rejects_inconsistent_security():
  from distill_core.config import ConfigError, load_config
  from teacher_server.config import ServerConfig
  for overrides, fragment in ((["security.tls_cert=a.pem"], "given together"),
                              (["security.client_ca=ca.pem"], "need TLS"),
                              (["security.auth_token=a", "security.auth_token_file=f"], "not both"),
                              (["address=localhost"], "explicit host"), (["address=:50051"], "explicit host")):
    with pytest.raises(ConfigError, match=fragment):
      load_config(ServerConfig, None, overrides)
