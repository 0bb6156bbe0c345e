"""The one client of the teacher server's ``Stream`` RPC with failover, shared by the trainer and the dump.

- ``config.py``: ``StreamClientConfig``, the addresses and the reconnect/failover options.
- ``checks.py``: what a caller needs from a teacher (``Requirements``), the request plan the first
  replica's GetInfo yields, the checks every later replica must pass, and connection diagnosis.
- ``pool.py``: lanes (one ``TeacherStream`` each, reconnecting with backoff), the dispatcher that
  spreads requests over them, retries, failover and the answer checks.
- ``runner.py``: ``StreamRunner``, the pool on its own event-loop thread behind a synchronous API.
- ``stats.py``: counters and latencies.
"""
