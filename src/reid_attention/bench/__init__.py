"""Microbenchmark engine and the ``reid-attention bench`` command."""
