"""What the benchmarks and the tests read off a running teacher-server process from outside: its Prometheus
page and its resident memory."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape_metrics(url: str, timeout: float = 10.0) -> dict[str, float]:
  """Every sample of a Prometheus /metrics page, keyed by name with its labels: `name{k=v,...}`."""
  text = urllib.request.urlopen(url, timeout=timeout).read().decode()
  out = {}
  for family in text_string_to_metric_families(text):
    for sample in family.samples:
      labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
      out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
  return out


def rss_bytes(pid: int) -> int:
  """Resident memory of process `pid` (Linux /proc), in bytes."""
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  raise OSError(f"no VmRSS for process {pid}")
