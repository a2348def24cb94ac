"""The API reference builds from the docstrings (``make docs``, docs/build_api.py, pdoc).

One build into a temporary directory, in a fresh interpreter as ``make docs`` runs it (about
10 s): it must exit 0 -- no pdoc warning (a module that does not import, a docstring or
annotation pdoc cannot read) and no docstring cross-reference (``:func:`name``` and the other
roles) that names nothing -- and write the index, a page for the package and for every public
module, and an entry for every name of the public API.

Also: the README's citation is well-formed BibTeX for the three papers, and the relative links of
the Markdown documentation (README, CHANGELOG, docs/, benchmarks/README.md) resolve.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import reid_attention as ra

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "docs" / "build_api.py"


def public_modules() -> list[str]:
    """``reid_attention`` and every submodule with no ``_``-prefixed path component."""
    names = ["reid_attention"]
    for info in pkgutil.walk_packages(ra.__path__, prefix="reid_attention."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return names


@pytest.fixture(scope="module")
def api_docs(tmp_path_factory) -> Path:
    pytest.importorskip("pdoc")
    out = tmp_path_factory.mktemp("api")
    done = subprocess.run([sys.executable, str(BUILD), str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"docs/build_api.py failed:\n{done.stderr[-4000:]}"
    assert not done.stderr.strip(), f"docs/build_api.py wrote to stderr:\n{done.stderr[-4000:]}"
    return out


def test_every_public_module_has_a_page(api_docs):
    assert (api_docs / "index.html").is_file()
    assert (api_docs / "search.js").is_file()
    modules = public_modules()
    assert {"reid_attention", "reid_attention.rga", "reid_attention.pfsa", "reid_attention.convert",
            "reid_attention.presets", "reid_attention.registry"} <= set(modules)
    missing = [m for m in modules if not (api_docs / f"{m.replace('.', '/')}.html").is_file()]
    assert not missing, f"no API page for {missing}"
    index = (api_docs / "index.html").read_text(encoding="utf-8")
    unlisted = [m for m in modules if f'href="{m.replace(".", "/")}.html"' not in index]
    assert not unlisted, f"the index does not link {unlisted}"


def test_every_public_name_is_documented(api_docs):
    page = (api_docs / "reid_attention.html").read_text(encoding="utf-8")
    # objects get an anchor on the package page; the public submodules a link to their page
    missing = [name for name in ra.__all__
               if f'id="{name}"' not in page and f'href="reid_attention/{name}.html"' not in page]
    assert not missing, f"reid_attention.html has no entry for {missing}"
    for name in ("RGA", "ParameterFreeSpatialAttention", "APNetC", "APNetS"):
        assert getattr(ra, name).__doc__, f"{name} has no docstring"


def test_the_reference_check_resolves_as_python_does():
    """The check in docs/build_api.py is not vacuous: real targets resolve, made-up ones do not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_api", BUILD)
    build_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_api)
    resolves = build_api.resolves
    assert resolves("RGA.resized", "reid_attention.rga")                          # in the module
    assert resolves("insert_attention", "reid_attention.presets")                 # exported by the package
    assert resolves("~reid_attention.presets.rga_resnet50", "reid_attention.rga")  # absolute
    assert resolves("torch.nn.BatchNorm2d", "reid_attention.rga")
    assert resolves(".rga.RGA", "reid_attention.presets")                         # relative: a sibling
    assert not resolves("RGA.no_such_method", "reid_attention.rga")
    assert not resolves("no_such_function", "reid_attention.rga")
    assert not resolves("..rga.RGA", "reid_attention.presets")                    # above the package


def test_readme_citation_is_well_formed_bibtex():
    """The README's BibTeX (an indented block: the README test runs only fenced python / bash) has
    one entry per paper, balanced braces, the fields a citation needs, and the papers' arXiv ids."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Citation\n", 1)[1].split("\n## ", 1)[0]
    bibtex = "\n".join(line[4:] for line in section.splitlines() if line.startswith("    "))
    entries = re.split(r"\n(?=@)", bibtex.strip())
    assert len(entries) == 3, bibtex
    eprints = set()
    for entry in entries:
        assert re.match(r"@(article|inproceedings|misc)\{\w+,\n", entry), entry
        assert entry.count("{") == entry.count("}") and entry.rstrip().endswith("}"), entry
        fields = dict(re.findall(r"^\s+(\w+)\s*=\s*\{(.*)\},?$", entry, re.MULTILINE))
        assert {"title", "author", "year", "eprint"} <= set(fields), entry
        assert fields["title"] in readme.split("\n## Citation\n", 1)[0], (
            f"{fields['title']} not in the layers table")
        eprints.add(fields["eprint"])
    assert eprints == {"1904.02998", "1811.12150", "2108.05340"}


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped, spaces -> '-'."""
    import re

    headings = re.findall(r"^#+\s+(.*)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_in_the_documentation_resolve():
    """Every relative link of README.md, CHANGELOG.md, docs/*.md and benchmarks/README.md names a file
    of the tree, and every #anchor a heading of its page."""
    import re

    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md",
             *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        links = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'<img src="([^"]+)"', text)
        for link in links:
            if re.match(r"[a-z]+:", link):
                continue  # https:, mailto:
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                if target.relative_to(ROOT).as_posix() in ("tools/compat_results.md",):
                    continue  # written by `make test-compat`
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such file)")
            elif (anchor and target.suffix == ".md"
                  and anchor not in _anchors(target.read_text(encoding="utf-8"))):
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such heading)")
    assert not broken, broken
