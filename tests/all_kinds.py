"""Moved to tests/helpers.py (``from helpers import build, make_input, ...``)."""

from helpers import (  # noqa: F401
    CHANNEL_TIED,
    CHANNELS,
    FEAT_SIZE,
    IMPLS,
    KINDS,
    SIZE_TIED,
    build,
    calibrate_bn,
    kind_impl_params,
    make_input,
)
