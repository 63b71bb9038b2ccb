"""The bookkeeping behind launch checks and declines, without a service: what the
coordinator remembers of reported data schemas (per population, a window, bounded), how
declines are counted (normalised, bounded), and when declines fail a task."""

from __future__ import annotations

from coordinator.rounds.declines import (
    MAX_REASONS,
    OTHER_REASONS,
    REASON_CHARS,
    Declines,
    normalise_reason,
)
from coordinator.rounds.schemas import ReportedSchemas, SchemaCount
from core.types import DataSchema

FLAT64 = DataSchema((64,), 10)
FLAT60 = DataSchema((60,), 10)
IMAGE = DataSchema((1, 8, 8), 10)

# ---------------------------------------------------------------- reported schemas


def test_schemas_are_counted_per_population_in_distinct_devices_most_first() -> None:
    schemas = ReportedSchemas(window_s=60)
    for i in range(5):
        schemas.record("default", f"d{i}", FLAT64, now=0)
        schemas.record("default", f"d{i}", FLAT64, now=1)  # a repeat counts once
    schemas.record("default", "odd", FLAT60, now=1)
    schemas.record("phones", "p0", IMAGE, now=1)
    assert schemas.of("default", now=2) == [SchemaCount(FLAT64, 5), SchemaCount(FLAT60, 1)]
    assert schemas.of("phones", now=2) == [SchemaCount(IMAGE, 1)]
    assert schemas.of("nobody", now=2) == []


def test_a_schema_counts_the_devices_seen_within_the_window() -> None:
    schemas = ReportedSchemas(window_s=60)
    schemas.record("default", "old", FLAT64, now=0)
    schemas.record("default", "new", FLAT64, now=50)
    assert schemas.of("default", now=59)[0].devices == 2
    assert schemas.of("default", now=100)[0].devices == 1
    assert schemas.of("default", now=200) == []


def test_a_device_whose_data_changed_counts_under_its_latest_schema_only() -> None:
    schemas = ReportedSchemas(window_s=60)
    schemas.record("default", "d", FLAT60, now=0)
    schemas.record("default", "d", FLAT64, now=1)
    assert schemas.of("default", now=2) == [SchemaCount(FLAT64, 1)]


def test_memory_is_bounded_whatever_devices_claim() -> None:
    schemas = ReportedSchemas(window_s=600, max_populations=3, max_schemas=2, max_devices=4)
    for p in range(10):  # the least recently reported population is forgotten
        schemas.record(f"pop{p}", "d", FLAT64, now=p)
    assert [bool(schemas.of(f"pop{p}", now=10)) for p in (0, 6, 7, 8, 9)] == [
        False, False, True, True, True]
    for i in range(10):  # beyond max_devices the count saturates: "at least 4"
        schemas.record("big", f"d{i}", FLAT64, now=20)
    assert schemas.of("big", now=21) == [SchemaCount(FLAT64, 4, saturated=True)]
    assert schemas.of("big", now=21)[0].describe() == "[64] -> 10 classes (4+ devices)"
    schemas.record("big", "x", FLAT60, now=21)
    schemas.record("big", "y", IMAGE, now=22)  # a third schema: the smallest gives way
    assert [c.schema for c in schemas.of("big", now=23)] == [FLAT64, IMAGE]


# ---------------------------------------------------------------- declines


def test_reasons_are_counted_by_their_first_line_whitespace_collapsed_and_cut() -> None:
    assert normalise_reason("  model  does not\tfit\nTraceback ...") == "model does not fit"
    assert normalise_reason("") == "(no reason given)"
    long = normalise_reason("x" * 1000)
    assert len(long) == REASON_CHARS and long.endswith("...")


def test_distinct_reasons_are_capped_and_the_rest_count_together() -> None:
    declines = Declines.for_task(min_reports=3)
    for i in range(MAX_REASONS + 5):
        declines.record(f"d{i}", f"reason {i}")
    assert len(declines.by_reason) == MAX_REASONS + 1
    assert declines.by_reason[OTHER_REASONS] == 5
    assert declines.total == MAX_REASONS + 5


def test_a_task_fails_once_enough_distinct_devices_declined_and_none_could_run_it() -> None:
    declines = Declines.for_task(min_reports=3)
    declines.record("d0", "the model does not fit this device's data")
    declines.record("d1", "the model does not fit this device's data")
    assert declines.verdict(any_accepted=False, any_pending=False) is None  # 2 < 3
    declines.record("d2", "the model does not fit this device's data")
    why = declines.verdict(any_accepted=False, any_pending=False)
    assert why is not None
    assert "no device could run the task" in why
    assert "(3): the model does not fit this device's data" in why


def test_one_device_cannot_fail_a_task_by_declining_over_and_over() -> None:
    declines = Declines.for_task(min_reports=1)  # even a task that needs one report
    for _ in range(50):
        declines.record("mallory", "I refuse")
    assert declines.verdict(any_accepted=False, any_pending=False) is None
    declines.record("alice", "I refuse too")
    assert declines.verdict(any_accepted=False, any_pending=False) is not None


def test_declines_never_fail_a_task_some_device_ran_or_while_one_still_runs_it() -> None:
    declines = Declines.for_task(min_reports=2)
    for i in range(10):
        declines.record(f"d{i}", "does not fit")
    assert declines.verdict(any_accepted=True, any_pending=False) is None
    assert declines.verdict(any_accepted=False, any_pending=True) is None
    assert declines.verdict(any_accepted=False, any_pending=False) is not None
