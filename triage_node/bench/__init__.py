"""Benchmarks against real peers (``triage-node bench ...``)."""
