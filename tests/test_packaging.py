"""The release artifacts: the wheel holds the package, the sdist the whole source release."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_RELEASED = (".ci/", ".gitignore")  # CI and git plumbing; every other source file ships in the sdist


def source_files():
    """The files of a fresh clone with the work in progress: tracked or untracked, not ignored."""
    done = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("not a git checkout (e.g. an unpacked sdist): no file list to compare with")
    return {f for f in done.stdout.splitlines() if (ROOT / f).is_file()}


@pytest.mark.slow
def test_wheel_and_sdist_file_lists(tmp_path):
    pytest.importorskip("build")
    sources = source_files()
    tree, dist = tmp_path / "tree", tmp_path / "dist"
    for f in sources:  # a clean copy: setuptools would also ship what a stale egg-info lists
        (tree / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, tree / f)
    # no --sdist/--wheel: the wheel is built from the unpacked sdist, so the sdist must build too
    done = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(tree)],
                          capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    if done.returncode != 0 and ("No matching distribution" in log or "Could not find a version" in log):
        pytest.skip("build isolation could not install setuptools>=77: no package index reachable")
    assert done.returncode == 0, log[-3000:]

    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    package = {n for n in names if ".dist-info/" not in n}
    assert package == {f.removeprefix("src/") for f in sources if f.startswith("src/reid_attention/")}
    assert "reid_attention/py.typed" in package
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata

    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tf:
        shipped = {m.name.split("/", 1)[1] for m in tf.getmembers() if m.isfile()}
    missing = sorted(f for f in sources if not f.startswith(NOT_RELEASED) and f not in shipped)
    assert not missing, f"files missing from the sdist (add them to MANIFEST.in): {missing}"
    assert {"tests/conftest.py", "tests/helpers.py", "constraints.txt", "Makefile"} <= shipped
    assert not [f for f in shipped if "__pycache__" in f or f.startswith((".venv/", ".ci/"))]
