"""``python -m reid_attention bench|sites ...`` (also the ``reid-attention`` console script)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: reid-attention bench [layers|network|sweep] [options]   (see: reid-attention bench -h)\n"
            "       reid-attention sites MODEL [--input HxW] [--format table|json] [--all]"
        )
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__  # the installed distribution's (importlib.metadata)

        print(f"reid-attention {__version__}")
        return 0
    if argv[0] == "sites":
        from .sites_cli import main as sites_main

        return sites_main(argv[1:])
    if argv[0] != "bench":
        print(f"reid-attention: error: unknown command {argv[0]!r}; expected bench or sites", file=sys.stderr)
        return 2
    from .bench.cli import main as bench_main

    return bench_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
