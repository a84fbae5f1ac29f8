"""Benchmarks: scripts that print figures side by side (`make bench-*`)."""
