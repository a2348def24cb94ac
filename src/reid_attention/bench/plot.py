"""The plot of ``reid-attention bench sweep``: memory and time vs input size (matplotlib, which
is an optional package, imported only when a plot is drawn)."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

__all__ = ["plot_sweep"]


def plot_sweep(records: Sequence[dict[str, Any]], path: pathlib.Path, env: dict[str, Any]) -> None:
    """Peak memory and step time vs input size, one line per kind and impl (log scale), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    inputs = list(dict.fromkeys(r["input"] for r in records))
    for key in dict.fromkeys((r["kind"], r["impl"]) for r in records):
        rows = [r for r in records if (r["kind"], r["impl"]) == key]
        xs = [inputs.index(r["input"]) for r in rows]
        style = "-o" if key[1] == "fused" else "--s"
        for ax, field in zip(axes, ("peak_mib", "step_ms")):
            pts = [(x, r[field]) for x, r in zip(xs, rows) if r.get(field) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{key[0]} {key[1]}")
            for x, r in zip(xs, rows):
                if r.get(field) is None and r.get("oom"):
                    ax.annotate("OOM", (x, ax.get_ylim()[1]), ha="center", va="top", color="C3")
    titles = ("peak training-step memory (MiB)",
              f"training step time (ms), {env.get('step', 'optimizer')} step")
    for ax, title in zip(axes, titles):
        ax.set_yscale("log")
        ax.set_xticks(range(len(inputs)), inputs)
        ax.set_xlabel("input size (H x W)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    batch = records[0]["batch"] if records else "?"
    fig.suptitle(f"{records[0]['kind'] if records else ''} at the stride-4 site, batch {batch} - "
                 f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, {env['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
