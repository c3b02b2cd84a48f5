"""Chaos scenarios: a longer per-test timeout at full size (``--chaos-full``)."""

from __future__ import annotations

import pytest

FULL_TIMEOUT = 1800  # seconds per scenario at full size; the short forms keep the default


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--chaos-full"):
        return
    for item in items:
        if item.get_closest_marker("chaos") is not None:
            item.add_marker(pytest.mark.timeout(FULL_TIMEOUT))
