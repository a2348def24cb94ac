"""Fixtures of the framework integration tests (``make test-integrations``).

``market1501``: the synthetic Market-1501-layout data set of reid_data.py (16 identities, 2
cameras, 64x32 JPEGs), written once per session; see reid_data.py for its API.
"""

from __future__ import annotations

import pytest
from reid_data import SyntheticMarket, make_market1501


@pytest.fixture(scope="session")
def market1501(tmp_path_factory) -> SyntheticMarket:
    return make_market1501(tmp_path_factory.mktemp("reid_data"))
