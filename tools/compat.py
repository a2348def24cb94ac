#!/usr/bin/env python3
"""``make test-compat``: run the layer, norm and insertion tests on a matrix of torch / torchvision /
einops / Python versions, to check the floors that pyproject.toml claims.

Each matrix entry gets its own virtual environment under the cache folder (``.compat-cache/`` in
the repository root, git-ignored; ``COMPAT_CACHE`` or ``--cache`` moves it), made with that entry's
Python and reused on later runs: an entry is installed again only when its versions or
pyproject.toml change (or with ``--reinstall``). The package goes in editable, in one pip call
with the entry's pins plus pytest and hypothesis, so pip also checks that the pins satisfy the
package's own dependency metadata (``requires-python``, ``torch>=``, ``einops>=``).

PyPI's Linux torch wheels are CUDA builds: each CUDA entry downloads about 3 GB and takes about
6 GB on disk; they run on the CPU. A cap on torch in the machine's pip configuration (a
``constraint`` file) is lifted for these installs only (``PIP_CONSTRAINT=/dev/null``).

The results (one row per entry: versions, passed / failed / skipped, date) are printed and
merged into ``tools/compat_results.md`` (rows of entries not run this time are kept).
Exit status 1 when an entry that ran failed to install or had a failing test.

    python3 tools/compat.py                 # the whole matrix
    python3 tools/compat.py --list          # the matrix, and which Pythons were found
    python3 tools/compat.py --only torch2.5-py3.11,torch2.15-py3.13
    python3 tools/compat.py --at HEAD       # test a commit (a copy) instead of the working tree
    python3 tools/compat.py --entry "python=3.11 torch=2.2.2 torchvision=0.17.2 extra=numpy<2"
    python3 tools/compat.py --only torch2.14-py3.11 -- -x -k rga   # arguments for pytest
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "tools" / "compat_results.md"

# The layer, norm and insertion tests. Files that import torchvision at module level without
# pytest.importorskip("torchvision") are left out (and said so) in entries without torchvision.
TEST_FILES = [
    "tests/test_rga.py",
    "tests/test_pfsa.py",
    "tests/test_pyramid.py",
    "tests/test_norms.py",
    "tests/test_insert.py",
    "tests/test_floors_resize.py",
]

# name, python, torch, torchvision (None: not installed), einops (None: newest), extra pip requirements.
MATRIX: list[dict] = [
    {
        "name": "torch2.5-py3.11",
        "python": "3.11",
        "torch": "2.5.0",
        "torchvision": "0.20.0",
        "einops": None,
        "extra": [],
        "note": "oldest torch that passes (the ad hoc torch 2.1 and 2.4 rows say why older ones fail)",
    },
    {
        "name": "torch2.5-py3.9-einops0.7",
        "python": "3.9",
        "torch": "2.5.0",
        "torchvision": "0.20.0",
        "einops": "0.7.0",
        "extra": [],
        "note": "the floors together: Python 3.9, torch 2.5, torchvision 0.20, einops 0.7",
    },
    {
        "name": "torch2.11-py3.12",
        "python": "3.12",
        "torch": "2.11.0",
        "torchvision": "0.26.0",
        "einops": None,
        "extra": [],
        "note": "torch 2.11, as on the GPU machines",
    },
    {
        "name": "torch2.13cpu-py3.11",
        "python": "3.11",
        "torch": "2.13.0+cpu",
        "torchvision": None,
        "einops": None,
        "extra": [],
        "note": "CPU wheel (here from /opt/wheels; elsewhere set PIP_EXTRA_INDEX_URL="
        "https://download.pytorch.org/whl/cpu); PyPI's torchvision does not import beside it",
    },
    {
        "name": "torch2.14-py3.11",
        "python": "3.11",
        "torch": "2.14.1",
        "torchvision": "0.29.1",
        "einops": None,
        "extra": [],
        "note": "the pair pinned in constraints.txt (make test)",
    },
    {
        "name": "torch2.15-py3.13",
        "python": "3.13",
        "torch": "2.15.0",
        "torchvision": "0.29.2",
        "einops": None,
        "extra": [],
        "note": "newest torch on PyPI; torchvision 0.29.2 is its torchvision (stable-ABI build, torch>=2.14)",
    },
]


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# Interpreters


def _py_version(exe: str) -> str | None:
    """'3.X.Y' if exe runs and can make a venv with pip (ensurepip), else None."""
    try:
        out = subprocess.run(
            [exe, "-c", "import sys, venv, ensurepip; print('%d.%d.%d' % sys.version_info[:3])"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def find_python(minor: str) -> str | None:
    """An interpreter for Python `minor` ('3.9'): python3.9 on PATH, else a pyenv install."""
    cands = []
    w = shutil.which(f"python{minor}")
    if w:
        cands.append(w)
    roots = [os.environ.get("PYENV_ROOT"), os.path.expanduser("~/.pyenv"), "/root/.pyenv", "/opt/pyenv"]
    for root in dict.fromkeys(r for r in roots if r):
        found = glob.glob(os.path.join(root, "versions", f"{minor}.*", "bin", f"python{minor}"))
        # newest patch release first: versions/3.9.18/bin/python3.9 -> (3, 9, 18)
        cands += sorted(
            found,
            key=lambda p: tuple(int(x) if x.isdigit() else -1 for x in Path(p).parent.parent.name.split(".")),
            reverse=True,
        )
    cands += [f"/usr/bin/python{minor}", f"/usr/local/bin/python{minor}"]
    for exe in dict.fromkeys(cands):
        if os.path.exists(exe):
            v = _py_version(exe)
            if v and v.rsplit(".", 1)[0] == minor:
                return exe
    return None


# ---------------------------------------------------------------------------------------------
# One entry


def _requirements(e: dict, root: Path) -> list[str]:
    reqs = ["-e", str(root), f"torch=={e['torch']}", "pytest>=7", "hypothesis>=6.80"]
    if e.get("torchvision"):
        reqs.append(f"torchvision=={e['torchvision']}")
    reqs.append(f"einops=={e['einops']}" if e.get("einops") else "einops")
    return reqs + list(e.get("extra") or [])


def _pip_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PIP_CONSTRAINT"] = "/dev/null"  # lifts a machine-wide cap (pip config `constraint = ...`)
    env["PIP_CACHE_DIR"] = str(cache / "pip")
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.pop("PIP_REQUIRE_VIRTUALENV", None)
    return env


def _run_logged(cmd: list[str], logf, env=None, cwd=None, echo=False) -> int:
    logf.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
    logf.flush()
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True, bufsize=1
    )
    assert p.stdout is not None
    for line in p.stdout:
        logf.write(line)
        if echo:
            sys.stdout.write("    " + line)
            sys.stdout.flush()
    return p.wait()


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _needs_torchvision(path: Path) -> bool:
    """True if the file imports torchvision at module level with no importorskip to skip it."""
    text = path.read_text()
    if re.search(r"importorskip\(\s*['\"]torchvision", text):
        return False
    return re.search(r"^(import|from)\s+torchvision\b", text, re.MULTILINE) is not None


def install(e: dict, vdir: Path, cache: Path, logf, reinstall: bool, root: Path) -> str | None:
    """Make or reuse the venv; None on success, else the reason it failed."""
    py = find_python(e["python"])
    if py is None:
        return f"SKIP no python{e['python']}"
    vpy = vdir / "bin" / "python"
    spec = {
        "python": e["python"],
        "reqs": _requirements(e, root),
        "pyproject": hashlib.sha256((root / "pyproject.toml").read_bytes()).hexdigest(),
    }
    marker = vdir / "compat-spec.json"
    if not reinstall and vpy.exists() and marker.exists():
        try:
            if json.loads(marker.read_text()) == spec:
                log(f"  venv {vdir} reused")
                return None
        except ValueError:
            pass
    if reinstall and vdir.exists():
        shutil.rmtree(vdir)
    if not vpy.exists():
        log(f"  creating venv with {py}")
        if _run_logged([py, "-m", "venv", str(vdir)], logf) != 0:
            return "venv creation failed"
    if marker.exists():
        marker.unlink()
    log("  pip install " + " ".join(spec["reqs"][2:]) + "  (-e .)")
    t0 = time.time()
    rc = _run_logged(
        [
            str(vpy),
            "-m",
            "pip",
            "install",
            "--progress-bar",
            "off",
            "--only-binary",
            "torch,torchvision",
            *spec["reqs"],
        ],
        logf,
        env=_pip_env(cache),
        cwd=str(root),
    )
    log(f"  pip took {time.time() - t0:.0f} s")
    if rc != 0:
        return "install failed"
    marker.write_text(json.dumps(spec, indent=1))
    return None


def versions(vpy: Path) -> dict[str, str | None]:
    code = (
        "import json, sys, importlib.metadata as m\n"
        "d = {'python': '%d.%d.%d' % sys.version_info[:3]}\n"
        "for k in ('torch', 'torchvision', 'einops', 'numpy'):\n"
        "    try: d[k] = m.version(k)\n"
        "    except m.PackageNotFoundError: d[k] = None\n"
        "import torch, einops, reid_attention\n"
        "d['torch_import'] = torch.__version__\n"
        "if d['torchvision']:\n"
        "    try:\n"
        "        import torchvision.ops; torchvision.ops.nms  # noqa\n"
        "    except Exception as e: d['torchvision_error'] = repr(e)[:200]\n"
        "print(json.dumps(d))\n"
    )
    out = subprocess.run([str(vpy), "-c", code], check=False, capture_output=True, text=True, cwd="/")
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_junit(xml: Path) -> dict:
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in tot:
            tot[k] += int(s.get(k, 0))
    failed = []
    for tc in root.iter("testcase"):
        for tag in ("failure", "error"):
            el = tc.find(tag)
            if el is not None:
                msg = (el.get("message") or "").strip().splitlines()
                failed.append(
                    f"{tc.get('classname')}::{tc.get('name')} ({tag}): {msg[0][:300] if msg else ''}"
                )
    return {
        "passed": tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"],
        "failed": tot["failures"] + tot["errors"],
        "skipped": tot["skipped"],
        "failures": failed,
    }


def snapshot(rev: str, cache: Path) -> tuple[Path, str]:
    """A copy of commit `rev` (git archive) under the cache: (its folder, the short hash)."""
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
        cwd=str(REPO),
    ).stdout.strip()
    dest = cache / "src" / sha[:12]
    if not (dest / "pyproject.toml").exists():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", sha], check=True, capture_output=True, cwd=str(REPO))
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
        tmp.rename(dest)
    return dest, sha[:12]


def source_revision() -> str:
    """The commit the tests ran on, '+dirty' when src/ or tests/ had uncommitted changes."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            cwd=str(REPO),
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", "tests"],
            check=False,
            capture_output=True,
            text=True,
            cwd=str(REPO),
        ).stdout.strip()
    except OSError:
        return "?"
    return (rev or "?") + ("+dirty" if dirty else "")


def run_entry(
    e: dict,
    cache: Path,
    reinstall: bool,
    pytest_args: list[str],
    echo: bool,
    install_only: bool = False,
    root: Path = REPO,
    source: str | None = None,
) -> dict:
    name = e["name"]
    vdir = cache / "venvs" / name
    logdir = cache / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    logpath = logdir / f"{name}.log"
    row = {
        "name": name,
        "source": source or source_revision(),
        "want": {
            "python": e["python"],
            "torch": e["torch"],
            "torchvision": e.get("torchvision"),
            "einops": e.get("einops"),
        },
        "date": _dt.date.today().isoformat(),
        "note": e.get("note", ""),
        "adhoc": e.get("adhoc", False),
    }
    t0 = time.time()
    with open(logpath, "w") as logf:
        why = install(e, vdir, cache, logf, reinstall, root)
        row["install_s"] = round(time.time() - t0)
        if why:
            row["status"] = why
            if why.startswith("SKIP"):
                log(f"  {why}")
            else:
                row["failures"] = [_tail(logpath, 12)]
                log(f"  {why}; log: {logpath}\n" + _tail(logpath, 12))
            return row
        vpy = vdir / "bin" / "python"
        v = versions(vpy)
        row["got"] = v
        if "error" in v:
            row["status"] = "import failed"
            row["failures"] = [v["error"]]
            log(f"  import failed: {v['error']}")
            return row
        if install_only:
            row["status"] = "installed"
            log(f"  installed: {v}")
            return row
        has_tv = bool(v.get("torchvision")) and "torchvision_error" not in v
        files, left_out = [], []
        for f in TEST_FILES:
            p = root / f
            if not p.exists():
                left_out.append(f"{f} (missing)")
            elif not has_tv and _needs_torchvision(p):
                left_out.append(f"{Path(f).name} (imports torchvision, no importorskip)")
            else:
                files.append(f)
        row["left_out"] = left_out
        xml = cache / "logs" / f"{name}.xml"
        xml.unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ of other Pythons in the tree
        env.setdefault("HYPOTHESIS_PROFILE", "ci")
        log(
            f"  pytest {' '.join(Path(f).name for f in files)}"
            + (f"  (left out: {', '.join(left_out)})" if left_out else "")
        )
        t1 = time.time()
        rc = _run_logged(
            [
                str(vpy),
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-rfE",
                f"--junitxml={xml}",
                *files,
                *pytest_args,
            ],
            logf,
            env=env,
            cwd=str(root),
            echo=echo,
        )
        row["test_s"] = round(time.time() - t1)
    if not xml.exists():
        row["status"] = f"pytest rc {rc}, no report"
        row["failures"] = [_tail(logpath, 15)]
        return row
    res = parse_junit(xml)
    row.update(passed=res["passed"], failed=res["failed"], skipped=res["skipped"], failures=res["failures"])
    row["status"] = "ok" if rc == 0 and res["failed"] == 0 else f"FAIL (pytest rc {rc})"
    log(
        f"  {row['status']}: {res['passed']} passed, {res['failed']} failed, {res['skipped']} skipped "
        f"in {row['test_s']} s; log: {logpath}"
    )
    for f in res["failures"][:10]:
        log("    " + f)
    return row


# ---------------------------------------------------------------------------------------------
# Results file

_DATA = re.compile(r"<!-- compat-data\n(.*?)\n-->", re.DOTALL)


def load_rows(path: Path) -> list[dict]:
    try:
        m = _DATA.search(path.read_text())
        return json.loads(m.group(1)) if m else []
    except (OSError, ValueError):
        return []


def _cell(row: dict, k: str) -> str:
    got = row.get("got") or {}
    if k in ("torch", "torchvision", "einops", "python"):
        return got.get(k) or (row["want"].get(k) or "-")
    return str(row.get(k, "-"))


def table(rows: list[dict]) -> str:
    head = [
        "entry",
        "python",
        "torch",
        "torchvision",
        "einops",
        "passed",
        "failed",
        "skipped",
        "not run",
        "status",
        "tests (s)",
        "date",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        notrun = ", ".join(x.split(" (")[0] for x in r.get("left_out") or []) or "-"
        name = r["name"] + (" (ad hoc)" if r.get("adhoc") else "")
        cells = [
            name,
            _cell(r, "python"),
            _cell(r, "torch"),
            _cell(r, "torchvision"),
            _cell(r, "einops"),
            _cell(r, "passed"),
            _cell(r, "failed"),
            _cell(r, "skipped"),
            notrun,
            r.get("status", "?"),
            _cell(r, "test_s"),
            r.get("date", "-"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(path: Path, rows: list[dict]) -> None:
    order = {e["name"]: i for i, e in enumerate(MATRIX)}

    def key(r: dict) -> tuple:
        if r["name"] in order:
            return (0, order[r["name"]], ())
        torch_version = re.findall(r"\d+", (r.get("got") or r["want"]).get("torch") or "")
        return (1, 0, tuple(int(x) for x in torch_version), r["name"])

    rows = sorted(rows, key=key)
    out = [
        "# Version matrix (`make test-compat`)",
        "",
        (
            "Written by `tools/compat.py`; do not edit by hand (rows of entries not run in the latest call "
            "are kept)."
        ),
        (
            f"Tests: {', '.join(Path(f).name for f in TEST_FILES)}; HYPOTHESIS_PROFILE=ci. "
            "'not run': files left out because they import torchvision and the entry has none."
        ),
        (
            f"Machine of the latest run: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
            "no GPU used (PyPI's CUDA builds run on the CPU)."
        ),
        "",
        table(rows),
        "",
        "## Entries",
        "",
    ]
    for r in rows:
        got = r.get("got") or {}
        out.append(f"- **{r['name']}**: {r.get('note', '')}".rstrip())
        if r.get("source"):
            out.append(
                f"  - source: {r['source']}; install {r.get('install_s', '?')} s, "
                f"tests {r.get('test_s', '-')} s"
            )
        if r.get("remark"):
            out.append(f"  - remark: {r['remark']}")
        if got.get("numpy"):
            out.append(f"  - numpy {got['numpy']}")
        if got.get("torchvision_error"):
            out.append(f"  - torchvision does not import: {got['torchvision_error']}")
        for lo in r.get("left_out") or []:
            out.append(f"  - not run: {lo}")
        for f in r.get("failures") or []:
            out.append("  - failure: `" + f.replace("`", "'").replace("\n", " / ")[:600] + "`")
    out += ["", "<!-- compat-data", json.dumps(rows, indent=None, sort_keys=True), "-->", ""]
    path.write_text("\n".join(out))


# ---------------------------------------------------------------------------------------------


def parse_entry(s: str) -> dict:
    """'python=3.11 torch=2.2.2 torchvision=0.17.2 einops=0.7.0 extra=numpy<2,foo name=x'."""
    kv = dict(item.split("=", 1) for item in shlex.split(s))
    e = {
        "python": kv.get("python", "3.11"),
        "torch": kv["torch"],
        "torchvision": kv.get("torchvision"),
        "einops": kv.get("einops"),
        "extra": [x for x in kv.get("extra", "").split(",") if x],
        "adhoc": True,
        "note": kv.get("note", "ad hoc entry"),
    }
    e["name"] = kv.get("name") or f"torch{e['torch']}-py{e['python']}" + (
        f"-einops{e['einops']}" if e["einops"] else ""
    )
    return e


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only",
        default=os.environ.get("COMPAT_ONLY", ""),
        help="comma-separated entry names (default: all; env COMPAT_ONLY)",
    )
    ap.add_argument(
        "--entry",
        action="append",
        default=[],
        help="an ad hoc entry instead of the matrix, e.g. 'python=3.11 torch=2.2.2 torchvision=0.17.2'",
    )
    ap.add_argument("--list", action="store_true", help="print the matrix and the Pythons found, and exit")
    ap.add_argument("--reinstall", action="store_true", help="remake the venvs of the entries run")
    ap.add_argument("--cache", default=os.environ.get("COMPAT_CACHE", str(REPO / ".compat-cache")))
    ap.add_argument(
        "--at",
        metavar="REV",
        default=os.environ.get("COMPAT_AT", ""),
        help="test commit REV (a git archive copy under the cache, e.g. HEAD) instead of the working "
        "tree; for a tree that others edit while the matrix runs (env COMPAT_AT)",
    )
    ap.add_argument("--results", default=str(RESULTS), help="results file (markdown)")
    ap.add_argument("--no-record", action="store_true", help="do not update the results file")
    ap.add_argument("--quiet", action="store_true", help="do not echo pytest's output")
    ap.add_argument(
        "--install-only", action="store_true", help="make the venvs, run no tests (implies --no-record)"
    )
    a = ap.parse_args(argv)

    entries = [parse_entry(s) for s in a.entry] or list(MATRIX)
    if a.only:
        want = [x.strip() for x in a.only.split(",") if x.strip()]
        unknown = [w for w in want if w not in {e["name"] for e in entries}]
        if unknown:
            ap.error(f"unknown entries {unknown}; known: {[e['name'] for e in entries]}")
        entries = [e for e in entries if e["name"] in want]
    if a.list:
        for e in entries:
            py = find_python(e["python"])
            log(
                f"{e['name']:28s} python {e['python']} ({py or 'not found'}), torch {e['torch']}, "
                f"torchvision {e.get('torchvision') or '-'}, einops {e.get('einops') or 'newest'} "
                f"{' '.join(e.get('extra') or [])}"
            )
        return 0

    cache = Path(a.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    root, source = REPO, None
    if a.at:
        root, source = snapshot(a.at, cache)
        log(f"testing commit {source} ({a.at}) from {root}")
    rows: list[dict] = []
    t_all = time.time()
    for e in entries:
        log(
            f"== {e['name']}: python {e['python']}, torch {e['torch']}, "
            f"torchvision {e.get('torchvision') or '-'}, "
            f"einops {e.get('einops') or 'newest'}"
        )
        rows.append(
            run_entry(
                e,
                cache,
                a.reinstall,
                pytest_args,
                echo=not a.quiet,
                install_only=a.install_only,
                root=root,
                source=source,
            )
        )
    log(f"\nmatrix done in {time.time() - t_all:.0f} s\n")
    log(table(rows))
    if not (a.no_record or a.install_only):
        path = Path(a.results)
        ran = {r["name"] for r in rows}
        write_results(path, [r for r in load_rows(path) if r["name"] not in ran] + rows)
        log(f"\nresults: {path}")
    bad = [
        r["name"]
        for r in rows
        if not (r.get("status") in ("ok", "installed") or r.get("status", "").startswith("SKIP"))
    ]
    if bad:
        log(f"not ok: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
