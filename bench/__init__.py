"""Benchmarks for mjgate: scripts run with ``python -m bench`` (see bench/README.md).

They are not timed tests: each starts real processes (redis-server, ``mjgate sim``, the
gateway, baselines), drives load over loopback, prints a table with ratios against the
baselines and the targets of issues 3 and 11, and stops everything it started.
"""
