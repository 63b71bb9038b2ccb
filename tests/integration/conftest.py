from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    CoordinatorProcess,
    coordinator,  # noqa: F401 - the fixture, for every integration test
    stop_shared_coordinator,
)

#: How much of each log a failed test shows: its end, where a hang or a crash is.
_LOG_TAIL_CHARS = 6000


@pytest.fixture(scope="session", autouse=True)
def _the_shared_coordinator_stops_with_the_session() -> Iterator[None]:
    yield
    stop_shared_coordinator()


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace")
    return text if len(text) <= _LOG_TAIL_CHARS else "[...]\n" + text[-_LOG_TAIL_CHARS:]


def _logs_of(item: pytest.Item) -> list[Path]:
    """The processes' logs a failed test leaves: its coordinators' and those under its
    tmp_path (agents started with ``log=``)."""
    funcargs = getattr(item, "funcargs", {})
    logs: list[Path] = []
    for value in funcargs.values():
        if isinstance(value, CoordinatorProcess):
            logs += [p for p in value.logs if p.exists()]
    tmp = funcargs.get("tmp_path")
    if isinstance(tmp, Path) and tmp.is_dir():
        logs += sorted(p for p in tmp.rglob("*.log") if p not in logs)
    return logs


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    """A failed integration test reports the ends of its processes' logs: a test that times
    out in CI says what the coordinator and the agents were doing, not only that it waited."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call" and report.failed:
        for path in _logs_of(item):
            report.sections.append((f"log {path.name} ({path})", _tail(path)))
