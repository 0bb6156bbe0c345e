"""Which gRPC addresses stay on this machine (where a bearer token may travel without TLS)."""

from __future__ import annotations

import ipaddress

PLAINTEXT_TOKEN_RULE = ("a bearer token is sent in plaintext only to a loopback address; configure TLS "
                        "(or use 127.0.0.1 / [::1] / localhost for local tests)")


def is_loopback_host(host: str) -> bool:
  host = host.strip("[]")
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def target_hosts(target: str) -> list[str]:
  """Hosts of a ``host:port``, ``ipv4:``/``ipv6:`` address list, ``dns:///name:port`` or ``unix:`` target."""
  if target.startswith("unix:"):
    return ["localhost"]
  if target.startswith(("ipv4:", "ipv6:")):
    return [entry.rpartition(":")[0] for entry in target.split(":", 1)[1].split(",")]
  if target.startswith("dns:"):
    target = target.split("/")[-1]
  return [target.rpartition(":")[0] or target]


def is_loopback_target(target: str) -> bool:
  return all(is_loopback_host(host) for host in target_hosts(target))
