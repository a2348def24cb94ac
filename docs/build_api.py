"""Build the API reference from the docstrings with pdoc: ``make docs`` writes it to docs/api/.

Usage: ``python docs/build_api.py [OUTPUT_DIR]`` (default: docs/api next to this file).

Documents the package and every public module under it (no path component starting with an
underscore), so a module that is added, split or renamed is picked up without editing a list.
The build fails (exit status 1, one line per problem) when

* pdoc warns: a module that does not import, a docstring or signature it cannot read, an
  annotation it cannot parse;
* a cross-reference in a rendered docstring -- ``:class:`X```, ``:func:``, ``:meth:``,
  ``:attr:``, ``:mod:``, ``:data:``, ``:obj:``, ``:exc:`` -- names nothing that exists. pdoc
  itself leaves such a reference as unlinked text without a word, so this script resolves each
  one as Python would: an absolute dotted name, a name in the documented object's class or
  module, a name exported by the package, or a relative ``.name`` / ``..name``.

tests/test_docs.py runs this script into a temporary directory.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PACKAGE = "reid_attention"
ROLE = re.compile(r"(?::py)?:(?:class|func|meth|attr|mod|data|const|obj|exc):`([^`]+)`")


def public_modules(package: str = PACKAGE) -> list[str]:
    """The package and its public submodules, sorted (``__main__`` and ``_private`` left out)."""
    root = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return sorted(names)


def _getattr_chain(obj: Any, parts: list[str]) -> bool:
    for part in parts:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _absolute(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        except Exception:  # noqa: BLE001 -- a module that fails to import resolves nothing
            return False
        return _getattr_chain(module, parts[i:])
    return False


def resolves(target: str, module_name: str, owner: Any = None) -> bool:
    """Whether a role's target names an object, seen from ``module_name`` and from ``owner``, the
    pdoc documentation of the class the docstring belongs to (its members include the instance
    attributes that ``__init__`` assigns)."""
    name = target.strip().lstrip("~!").removesuffix("()")
    if "<" in name:  # :class:`text <target>`
        name = name[name.index("<") + 1 :].rstrip(">").strip().lstrip("~")
    if name.startswith("."):
        module = importlib.import_module(module_name)
        base = module_name if hasattr(module, "__path__") else module_name.rpartition(".")[0]
        name = name[1:]
        while name.startswith("."):
            base, name = base.rpartition(".")[0], name[1:]
        return bool(base) and _absolute(f"{base}.{name}")  # no base: above the top-level package
    parts = name.split(".")
    if owner is not None and (parts[0] in owner.members or _getattr_chain(owner.obj, parts)):
        return True
    scopes = [importlib.import_module(module_name), importlib.import_module(PACKAGE)]
    return any(_getattr_chain(scope, parts) for scope in scopes) or _absolute(name)


def _documented(doc: Any, owner: Any = None) -> Iterator[tuple[Any, Any]]:
    """(doc, the pdoc doc of its class or None) for ``doc`` and its public members defined here;
    a docstring a method inherits from elsewhere (``nn.Module.forward``'s) is not its own."""
    import pdoc.doc

    if isinstance(doc, pdoc.doc.Class):
        owner = doc
    if not (isinstance(doc, pdoc.doc.Function) and getattr(doc.obj, "__doc__", None) is None):
        yield doc, owner
    if isinstance(doc, (pdoc.doc.Module, pdoc.doc.Class)):
        inner = doc if isinstance(doc, pdoc.doc.Class) else None
        for member in doc.own_members:
            if member.name.startswith("_") and member.name != "__init__":
                continue
            if isinstance(doc, pdoc.doc.Module) and member.taken_from[0] != doc.modulename:
                continue  # re-exported: checked in the module that defines it
            yield from _documented(member, inner)


def broken_references(modules: list[str]) -> list[str]:
    import pdoc.doc

    problems = []
    for module_name in modules:
        for doc, owner in _documented(pdoc.doc.Module.from_name(module_name)):
            home = doc.taken_from[0] if doc.taken_from[0].startswith(PACKAGE) else module_name
            for target in ROLE.findall(doc.docstring):
                if not resolves(target, home, owner):
                    problems.append(f"{doc.fullname}: docstring reference `{target}` names nothing")
    return sorted(set(problems))


def build(output: Path) -> list[str]:
    """Render the HTML into ``output``; return the problems (empty: a clean build)."""
    import pdoc
    import pdoc.doc
    import pdoc.render

    modules = public_modules()
    pdoc.render.configure(docformat="restructuredtext", footer_text=f"{PACKAGE} API reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # pdoc.pdoc(*modules) would walk each package's submodules again (and warn about the
        # repeats): the pages are rendered here from exactly this list, as pdoc.pdoc does.
        all_modules = {name: pdoc.doc.Module.from_name(name) for name in modules}
        for name, module in all_modules.items():
            page = output / f"{name.replace('.', '/')}.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(pdoc.render.html_module(module, all_modules), encoding="utf-8")
        # pdoc's index redirects to the package page when all modules share one root, and that page
        # links only the submodules in __all__: render its module list (every page) instead.
        index = pdoc.render.env.get_template("index.html.jinja2").render(
            all_modules=all_modules, root_module_name=None)
        for page, text in (("index.html", index),
                           ("search.js", pdoc.render.search_index(all_modules))):
            if text:
                (output / page).write_text(text, encoding="utf-8")
    pdoc_dir = str(Path(pdoc.__file__).parent)
    problems = [f"pdoc: {w.message}".splitlines()[0] + (" ..." if "\n" in str(w.message) else "")
                for w in caught if w.filename.startswith(pdoc_dir)]
    return problems + broken_references(modules)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    output = Path(argv[0]) if argv else Path(__file__).resolve().parent / "api"
    problems = build(output)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"API reference: {output / 'index.html'} ({len(public_modules())} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
