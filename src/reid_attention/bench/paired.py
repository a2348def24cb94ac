"""Ratios of two timings measured alternately, refused when they do not settle.

On a shared machine two timings taken one after the other differ by whatever load came and went
between them: a ResNet-50 step measured while another job ran can come out 3x slower than the
same step with attention measured after it. :func:`paired_ratio` times the two callables round
by round, in ABBA order (``a b`` then ``b a``, so a drift within a round weighs on both alike),
each a block of calls lasting at least ``block_time``. The figure is the median over rounds of
the per-round ratio ``other / base``: load that lasts longer than a round cancels.

Its spread is the inter-quartile range of the per-round ratios relative to their median. After
``min_rounds`` rounds, a spread within ``max_spread`` ends the measurement; otherwise rounds
continue to ``max_rounds``, and a spread still wider makes the result unreliable: its ``ratio``
is None and :attr:`PairedRatio.reason` says why, so no table prints a number nobody should
quote.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MAX_ROUNDS", "MAX_SPREAD", "MIN_ROUNDS", "PairedRatio", "paired_ratio", "rounds_options"]

MAX_SPREAD = 0.05  # IQR of the per-round ratios / their median: 5%
MIN_ROUNDS = 6
MAX_ROUNDS = 30


@dataclass(frozen=True)
class PairedRatio:
    """The outcome of :func:`paired_ratio`; times are medians over rounds, per call, in ms."""

    ratio: float | None  # median of the per-round ratios; None when unreliable
    spread: float  # IQR of the per-round ratios / their median
    rounds: int
    base_ms: float
    other_ms: float
    reason: str | None = None  # why the ratio is unreliable (None: it is not)

    def fields(self, prefix: str) -> dict[str, Any]:
        """The result as record fields ``<prefix>``, ``<prefix>_spread``, ``<prefix>_rounds``."""
        return {prefix: self.ratio, f"{prefix}_spread": self.spread, f"{prefix}_rounds": self.rounds}


def _block(fn: Callable[[], Any], calls: int, sync: Callable[[], None]) -> float:
    """Seconds per call over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls


def _calls_per_block(fn: Callable[[], Any], block_time: float, sync: Callable[[], None]) -> int:
    """How many calls of ``fn`` (warm) last ``block_time`` seconds, at least one."""
    return max(1, round(block_time / max(_block(fn, 1, sync), 1e-9)))


def spread_of(ratios: list[float]) -> float:
    """IQR / median of ``ratios`` (0 for fewer than two)."""
    if len(ratios) < 2:
        return 0.0
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return (q3 - q1) / median


def rounds_options(max_rounds: int, max_spread: float = MAX_SPREAD) -> dict[str, Any]:
    """:func:`paired_ratio`'s round options for at most ``max_rounds`` rounds (fewer than
    :data:`MIN_ROUNDS` lowers the minimum with it)."""
    return dict(min_rounds=min(MIN_ROUNDS, max_rounds), max_rounds=max_rounds, max_spread=max_spread)


def paired_ratio(
    base: Callable[[], Any],
    other: Callable[[], Any],
    *,
    block_time: float = 0.2,
    min_rounds: int = MIN_ROUNDS,
    max_rounds: int = MAX_ROUNDS,
    max_spread: float = MAX_SPREAD,
    device: str = "cpu",
) -> PairedRatio:
    """Time ``other`` against ``base`` alternately (module docstring) and return their ratio."""
    if not 1 <= min_rounds <= max_rounds:
        raise ValueError(f"need 1 <= min_rounds <= max_rounds, got {min_rounds} and {max_rounds}")

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for fn in (base, other):  # warm-up: lazy initialisation, allocator, kernel plans
        fn()
    calls = (_calls_per_block(base, block_time, sync), _calls_per_block(other, block_time, sync))
    base_times: list[float] = []
    other_times: list[float] = []
    ratios: list[float] = []
    while len(ratios) < max_rounds:
        if len(ratios) % 2 == 0:
            t_base, t_other = _block(base, calls[0], sync), _block(other, calls[1], sync)
        else:
            t_other, t_base = _block(other, calls[1], sync), _block(base, calls[0], sync)
        base_times.append(t_base)
        other_times.append(t_other)
        ratios.append(t_other / t_base)
        if len(ratios) >= min_rounds and spread_of(ratios) <= max_spread:
            break
    spread = spread_of(ratios)
    reason = None
    if spread > max_spread:
        reason = (f"paired ratio not settled: spread {spread:.0%} > {max_spread:.0%} after {len(ratios)} "
                  "rounds (a busy machine); rerun when it is idle")
    return PairedRatio(
        ratio=None if reason else statistics.median(ratios), spread=spread, rounds=len(ratios),
        base_ms=statistics.median(base_times) * 1e3, other_ms=statistics.median(other_times) * 1e3,
        reason=reason,
    )
