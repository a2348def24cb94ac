"""Result records -> table / markdown / CSV / JSON, plus the environment they were measured in."""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import pathlib
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["environment", "format_records", "format_flagged", "row_name", "publish", "FORMATS"]

FORMATS = ("table", "markdown", "csv", "json")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu", threads: int | None = None, malloc: str = "system") -> dict[str, Any]:
    """Where and when a measurement was taken (``malloc``: see :func:`.measure.set_malloc`)."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "device": dev.type,
        "device_name": name,
        "threads": threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "malloc": malloc,
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return "; ".join(map(str, value)) or "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_records(
    records: Sequence[dict[str, Any]],
    columns: Sequence[str],
    fmt: str = "table",
    env: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> str:
    """Render records; ``columns`` picks and orders the fields shown (JSON keeps every field)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "json":
        return json.dumps({"environment": env or {}, "records": list(records)}, indent=2)
    names = [(headers or {}).get(c, c) for c in columns]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for r in records:
            writer.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
        return out.getvalue()
    rows: list[list[str]] = [[_cell(r.get(c)) for c in columns] for r in records]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in records) for c in columns]
    if fmt == "markdown":
        lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---" for _ in names) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(n), *(len(row[i]) for row in rows)) if rows else len(n) for i, n in enumerate(names)]
    line = "  ".join(n.rjust(w) if num else n.ljust(w) for n, w, num in zip(names, widths, numeric))
    body = [
        "  ".join(cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(row, widths, numeric))
        for row in rows
    ]
    return "\n".join([line, "-" * len(line), *body])


def row_name(record: dict[str, Any]) -> str:
    """A row's label in messages: the model (with its runtime and batch in eval rows), or its kind,
    level, input, site, impl and memory mode."""
    if "model" in record:
        runtime = f" ({record['runtime']}, batch {record['batch']})" if "runtime" in record else ""
        return str(record["model"]) + runtime
    keys = ("kind", "level", "input", "site", "impl", "memory")
    return " ".join(str(record[k]) for k in keys if record.get(k) is not None)


def format_flagged(
    records: Sequence[dict[str, Any]],
    columns: Sequence[str],
    fmt: str = "table",
    headers: dict[str, str] | None = None,
) -> str:
    """:func:`format_records` of the ``columns`` that hold a value, with rows whose timing is
    unreliable (a non-empty ``unreliable`` list) marked '!' in a ``flag`` column and their
    reasons listed below the table; CSV gets the reasons in an ``unreliable`` column instead."""
    flagged = [r for r in records if r.get("unreliable")]
    if fmt == "csv":
        records = [dict(r, unreliable="; ".join(r.get("unreliable") or [])) for r in records]
        columns = ["unreliable" if c == "flag" else c for c in columns]
    elif flagged:
        records = [dict(r, flag="!" if r.get("unreliable") else "") for r in records]
    shown = [c for c in columns if any(r.get(c) is not None for r in records)]
    text = format_records(records, shown, fmt, headers={"flag": "", **(headers or {})})
    if fmt in ("csv", "json") or not flagged:
        return text
    notes = [f"! {row_name(r)}: {'; '.join(r['unreliable'])}" for r in flagged]
    notes.append("! = unreliable timing: rerun on an idle machine or with a longer timed run")
    return "\n".join([text, "", *notes])


def publish(
    result: dict[str, Any],
    columns: Sequence[str],
    default_path: pathlib.Path,
    *,
    headers: dict[str, str] | None = None,
    out: pathlib.Path | None = None,
    write: bool = True,
) -> None:
    """Write the JSON to ``out`` or ``default_path`` unless ``write`` is false and no ``out`` was
    given (smoke runs), then print a benchmark script's table (unreliable rows flagged, see
    :func:`format_flagged`) and summary, if any."""
    if write or out:
        path = out or default_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    print(format_flagged(result["records"], columns, "table", headers=headers))
    if "summary" in result:
        print(json.dumps(result["summary"], indent=2))
