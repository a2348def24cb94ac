"""pytest settings for the suite (hypothesis profiles, CPU threads).

Shared helpers live in tests/helpers.py (``from helpers import ...``), not here: conftest.py is
pytest's file for settings, hooks and fixtures, and every conftest.py shares one module name.
"""

from __future__ import annotations

import os

import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=15, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))
