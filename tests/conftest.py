"""Suite-wide collection order: the long tests first.

Under ``pytest -n`` a test that takes a minute and happens to be collected last keeps one
worker busy while the others have nothing left to do. Tests marked ``integration`` (real
processes) or ``slow`` are therefore moved ahead of the rest; the order within each group is
the collection order, and no test depends on running before or after another.

pytest-xdist's ``load`` scheduler hands each worker a run of consecutive tests (a quarter
of its share at first), which would give all the long tests to the first worker; unless
``--maxschedchunk`` is given, workers are handed two tests at a time, so each long test
goes to whichever worker is free.
"""

from __future__ import annotations

import pytest


def _is_long(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(m) is not None for m in ("integration", "slow"))


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "maxschedchunk", 0) is None:  # xdist present, flag not given
        config.option.maxschedchunk = 2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not _is_long(item))  # stable: long ones first, else as collected
