"""Without an optional package: the core works, and what needs the package fails at once with one
message naming the package and the pip command (a subprocess each, the package hidden)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

VISION = 'pip install "reid-attention[vision]"'
BENCH = 'pip install "reid-attention[bench]"'
API_CALLS = {
    "ra.presets.rga_resnet50": "ra.presets.rga_resnet50()",
    "ra.presets.apnet_resnet50": "ra.presets.apnet_resnet50()",
    "ra.convert.from_official_rga": "ra.convert.from_official_rga({'conv1.weight': torch.zeros(1)})",
    "ra.convert.from_official_apnet": "ra.convert.from_official_apnet({'base.conv1.weight': torch.zeros(1)})",
}

API_SCRIPT = f"""
import json, torch
import reid_attention as ra
from reid_attention._extras import MissingExtraError

errors = {{}}
for name, call in {API_CALLS!r}.items():
    try:
        eval(call)
    except MissingExtraError as err:
        errors[name] = [isinstance(err, ImportError), err.name, str(err)]
x = torch.randn(2, 16, 8, 4)
shape = list(ra.RGA(16, (8, 4))(x).shape)
print(json.dumps({{"errors": errors, "rga": shape}}))
"""


def run_without(packages, code, **kwargs):
    """Run ``code`` in a fresh interpreter where importing any of ``packages`` fails."""
    hide = "".join(f"sys.modules[{p!r}] = None\n" for p in packages)
    return subprocess.run([sys.executable, "-c", "import sys\n" + hide + code], capture_output=True,
                          text=True, timeout=300, **kwargs)


def test_core_without_extras_and_the_api_errors():
    done = run_without(["torchvision", "timm", "matplotlib"], API_SCRIPT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["rga"] == [2, 16, 8, 4]
    assert result["errors"] == {
        name: [True, "torchvision", f"{name} needs torchvision: {VISION}"]
        for name in API_CALLS
    }


CLI_CASES = [
    (["torchvision"], ["sites", "resnet50"], f"needs torchvision: {VISION}"),
    (["timm"], ["sites", "seresnext26d_32x4d"], "unknown to torchvision, needs timm: pip install timm"),
    (["torchvision"], ["bench"], f"needs torchvision: {BENCH}"),
    (["torchvision"], ["bench", "network"], f"needs torchvision: {BENCH}"),
    (["matplotlib"], ["bench", "sweep", "--plot", "p.png"], f"needs matplotlib: {BENCH}"),
]


@pytest.mark.parametrize("hidden,argv,expected", CLI_CASES, ids=[" ".join(c[1]) for c in CLI_CASES])
def test_cli_checks_extras_before_any_work(hidden, argv, expected, tmp_path):
    code = f"from reid_attention.__main__ import main\nsys.exit(main({argv!r}))"
    done = run_without(hidden, code, cwd=tmp_path)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and done.stdout == "", done.stderr  # no row ran, nothing printed
    assert len(lines) == 1 and lines[0].startswith("reid-attention") and ": error: " in lines[0], done.stderr
    assert expected in lines[0]
    assert list(tmp_path.iterdir()) == []  # no plot written
