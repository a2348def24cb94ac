"""Microbenchmark engine and the ``reid-attention bench`` command.

The engine: ``measure`` (timing, FLOPs, peak memory of one layer or model), ``suites`` (what one
row measures, the papers' sites), ``report`` (records as text, the environment). The command:
``cli`` (``main``) runs ``args`` (parser, checks before any work), then ``jobs`` (rows, run with
progress), then ``render`` (text, ``--out``, exit status) and ``plot`` (the sweep's figure).
"""
