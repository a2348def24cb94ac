"""README.md's code runs as printed: a stale example fails here.

The rule for ```python blocks: **every block runs on its own**, as a user who copies that one
block into a fresh interpreter would run it: a new namespace, the block's own imports, the
current directory a fresh temporary one, ``torch.manual_seed(0)``, no network. A block may not use
a name or file defined by another block. What it takes from the user's disk is provided by a
documented fixture (tests/readme_fixtures.py), and only to a block whose text names it:

* the name ``official_rga_module_state``: the state_dict of an official ``RGA_Module(256, 64*32)``
  (tests/official_rga.py, torch.nn only), pre-set in the namespace;
* the files ``rga_sc_market.pth.tar`` and ``apnet.pth``: official-format RGA / APNet checkpoints
  (random weights, official keys and shapes) in the current directory;
* ``weights="IMAGENET1K_V2"``: a random ResNet-50 state_dict in torchvision's download cache
  (``TORCH_HOME``), so torchvision loads it instead of downloading. Any other download raises.

Besides running without an exception, a block's comments are checked where they state a result:

* ``name = ...  # (2, 2048)...``: a comment starting with a tuple of integers is the final
  ``name.shape``;
* ``print(...)  # Site(...) ...``: a comment starting with ``Name(`` is the first line printed
  (up to the matching parenthesis).

```bash blocks are not run (they install packages or benchmark for minutes), but what they name
must exist: ``make`` targets in the Makefile, ``pip install reid-attention[extra]`` extras in the
installed metadata, ``reid-attention sites ...`` runs (meta-device probe, about a second),
``reid-attention bench ...`` parses and its layers / network are buildable (meta device), and every
``--option`` a comment mentions is an option of that command (with its listed choices). A bash
command of another kind fails until a check is added here.

Test ids are ``L<line>-<heading>`` for python blocks and ``L<line>-<command>`` for bash commands,
with the 1-based README line of the opening fence / the command.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import re
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import readme_fixtures
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CHECKED_LANGUAGES = ("python", "bash")


@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    heading: str
    code: str


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-")


def readme_blocks() -> list[Block]:
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, heading, i = [], "top", 0
    while i < len(lines):
        fence = re.match(r"^(```+|~~~+)\s*(\S*)", lines[i])
        if fence:
            close = fence.group(1)
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(close)), None)
            if end is None:
                raise AssertionError(f"README.md:{i + 1}: unclosed code fence")
            blocks.append(Block(fence.group(2).lower(), i + 1, heading, "\n".join(lines[i + 1 : end])))
            i = end + 1
            continue
        if lines[i].startswith("#"):
            heading = lines[i].lstrip("#").strip()
        i += 1
    return blocks


BLOCKS = readme_blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]


def test_every_code_block_is_checked():
    """A block in another language (or a ```py / unlabelled fence) would silently escape the checks."""
    others = [f"README.md:{b.line} ({b.lang or 'no language'})"
              for b in BLOCKS if b.lang not in CHECKED_LANGUAGES]
    assert not others, f"code blocks this test does not check: {others}; label them python or bash"
    assert len(PYTHON) >= 8


# --- python blocks -------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path_factory):
    """No network; torchvision's download cache in a temporary TORCH_HOME."""
    home = tmp_path_factory.getbasetemp() / "torch_home"

    def no_download(url, *args, **kwargs):
        raise RuntimeError(f"a README block tried to download {url}: "
                           "add a fixture in tests/readme_fixtures.py")

    def no_connect(self, address, *args, **kwargs):
        raise RuntimeError(f"a README block tried to connect to {address}: the README test runs offline")

    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(home / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    return home


def _namespace(block: Block, cwd: Path, torch_home: Path) -> dict[str, object]:
    """The fresh namespace of a block, with the fixtures its text names (see the module docstring)."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    code = block.code
    if "official_rga_module_state" in code:
        namespace["official_rga_module_state"] = readme_fixtures.official_rga_module_state()
    if "rga_sc_market.pth.tar" in code:
        readme_fixtures.write_official_rga_checkpoint(cwd / "rga_sc_market.pth.tar")
    if "apnet.pth" in code:
        readme_fixtures.write_official_apnet_checkpoint(cwd / "apnet.pth")
    if "IMAGENET1K_V2" in code:
        readme_fixtures.write_torchvision_weights(torch_home)
    return namespace


def _shape_claims(code: str) -> dict[str, tuple]:
    """``name = ...  # (d0, d1, ...)...``: the shapes the comments give (the last one per name)."""
    claims = {}
    for line in code.splitlines():
        m = re.match(r"^\s*(\w+)\s*=[^#]*#\s*\((\d+(?:\s*,\s*\d+)*)\s*,?\)", line)
        if m:
            claims[m.group(1)] = tuple(int(d) for d in m.group(2).split(","))
    return claims


def _print_claim(code: str):
    """The text a ``print(...)  # Name(...)`` comment says is printed first, or None."""
    for line in code.splitlines():
        m = re.match(r"^\s*print\(.*\)\s*#\s*([A-Za-z_]\w*\()", line)
        if m:
            comment = line[m.start(1) :]
            depth = 0
            for i, ch in enumerate(comment):
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if depth == 0 and ch == ")":
                    return comment[: i + 1]
    return None


@pytest.mark.parametrize("block", PYTHON, ids=[f"L{b.line}-{_slug(b.heading)}" for b in PYTHON])
def test_python_block(block, offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _namespace(block, tmp_path, offline)
    torch.manual_seed(0)
    code = compile(block.code, f"README.md:{block.line}", "exec")
    # line numbers in tracebacks count from the fence: README line = fence line + traceback line
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(code, namespace)  # noqa: S102 -- running the README's code is the point

    for name, shape in _shape_claims(block.code).items():
        value = namespace[name]
        assert tuple(value.shape) == shape, (
            f"README.md:{block.line}: {name}.shape is {tuple(value.shape)}, the comment says {shape}"
        )
    claim = _print_claim(block.code)
    if claim is not None:
        printed = stdout.getvalue().splitlines()
        assert printed and printed[0] == claim, (
            f"README.md:{block.line}: first printed line {printed[:1]}, the comment says {claim!r}"
        )


def test_block_checks_see_the_claims():
    """The comment parsers above find the README's result comments (so they cannot go stale silently)."""
    claims = {name: shape for b in PYTHON for name, shape in _shape_claims(b.code).items()}
    assert claims.get("y") == (8, 256, 64, 32) and claims.get("fmap") == (2, 2048, 16, 8)
    assert any(_print_claim(b.code) for b in PYTHON)


# --- bash blocks ---------------------------------------------------------------------------------


@dataclass
class Command:
    line: int
    argv: list[str]
    comment: str  # the trailing comment, and comment-only lines right below the command


def bash_commands() -> list[Command]:
    commands: list[Command] = []
    for block in (b for b in BLOCKS if b.lang == "bash"):
        lines = block.code.splitlines()
        i = 0
        while i < len(lines):
            start, text = block.line + 1 + i, lines[i]
            while text.rstrip().endswith("\\") and i + 1 < len(lines):  # continuation lines
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i]
            i += 1
            if not text.strip():
                continue
            if text.lstrip().startswith("#"):
                if commands and commands[-1].line > block.line:  # a comment about the command above
                    commands[-1].comment += " " + text.lstrip()[1:]
                continue
            argv = shlex.split(text, comments=True)
            lexer = shlex.shlex(text, posix=True)
            lexer.whitespace_split, lexer.commenters = True, ""
            tokens = list(lexer)
            comment = " ".join(tokens[tokens.index("#") + 1 :]) if "#" in tokens else ""
            commands.append(Command(start, argv, comment))
    return commands


COMMANDS = bash_commands()


def _makefile_targets() -> list[str]:
    return re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE)


def _check_comment_options(comment: str, parsers: list, where: str) -> None:
    """Every --option the comment names is an option of one of ``parsers``; listed values
    (``--step optimizer|accumulate``, ``--dtype bfloat16``) are among its choices."""
    for option, value in re.findall(r"(--[\w-]+)(?:[ =]([a-z][\w|]*))?", comment):
        actions = [a for p in parsers for a in p._actions if option in a.option_strings]
        assert actions, f"{where}: the comment names {option}, which the command does not take"
        for action in actions:
            if value and action.choices is not None:
                unknown = [v for v in value.split("|") if v not in action.choices]
                assert not unknown, f"{where}: {option} {value}: {unknown} not among {sorted(action.choices)}"


def _check_bench(command: Command, where: str) -> None:
    from reid_attention.bench import cli

    argv = command.argv[2:]
    parser = cli.build_parser()
    if "--help" in argv or "-h" in argv:
        with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 0 and "usage:" in out.getvalue(), where
        parsers = [parser]
    else:
        args, extra = parser.parse_known_args(cli.normalise_argv(argv))
        assert not extra, f"{where}: unrecognised arguments {extra}"
        cli.check_buildable(args, parser.commands[args.command])  # meta device; parser.error -> SystemExit
        parsers = [parser.commands[args.command]]
    own, _, common = command.comment.partition("common:")  # "# common: ..." lists options of every command
    _check_comment_options(own, parsers + [parser], where)
    for name in ("layers", "network", "sweep"):
        _check_comment_options(common, [parser.commands[name]], f"{where} (common options, bench {name})")


def _check_sites(command: Command, where: str) -> None:
    from reid_attention import sites_cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = sites_cli.main(command.argv[2:])
    assert status == 0, where
    assert out.getvalue().strip(), where
    _check_comment_options(command.comment, [sites_cli.parser()], where)


def _check_pip(command: Command, where: str) -> None:
    assert command.argv[:2] == ["pip", "install"], where
    metadata = importlib.metadata.metadata("reid-attention")
    for requirement in command.argv[2:]:
        m = re.fullmatch(r"([\w.-]+)(?:\[([\w,-]+)\])?", requirement)
        assert m, f"{where}: cannot read requirement {requirement!r}"
        assert re.sub(r"[-_.]+", "-", m.group(1)).lower() == metadata["Name"].lower(), where
        extras = (m.group(2) or "").split(",") if m.group(2) else []
        missing = [e for e in extras if e not in metadata.get_all("Provides-Extra", [])]
        assert not missing, f"{where}: no extra {missing} in the package metadata"


@pytest.mark.parametrize(
    "command", COMMANDS, ids=[f"L{c.line}-{_slug(' '.join(c.argv[:3]))}" for c in COMMANDS]
)
def test_bash_command(command, offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is written (bench --out / --plot are only parsed)
    where = f"README.md:{command.line}: {' '.join(command.argv)}"
    program = command.argv[0]
    if program == "make":
        missing = [t for t in command.argv[1:] if t not in _makefile_targets()]
        assert not missing, f"{where}: no Makefile target {missing}"
    elif program == "pip":
        _check_pip(command, where)
    elif program == "reid-attention" and command.argv[1:2] == ["bench"]:
        _check_bench(command, where)
    elif program == "reid-attention" and command.argv[1:2] == ["sites"]:
        _check_sites(command, where)
    else:
        pytest.fail(f"{where}: no check for this command; add one to tests/test_readme.py")
