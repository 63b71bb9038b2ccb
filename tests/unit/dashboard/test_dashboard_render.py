"""The dashboard's markup: charts that carry their values exactly, and escaping of every
value that came from outside."""

from __future__ import annotations

import html
import json
import re

from coordinator.dashboard.render import (
    CHART_POINTS,
    bar_chart,
    esc,
    line_chart,
    task_page,
    thin,
    timeline,
)
from coordinator.dashboard.snapshot import AttemptRow, Funnel, Step, TaskSnapshot

XSS = "<script>alert(1)</script>"


def points_of(svg: str) -> list[list[float]]:
    match = re.search(r'data-points="([^"]*)"', svg)
    assert match is not None
    values: list[list[float]] = json.loads(html.unescape(match.group(1)))
    return values


def test_a_line_chart_holds_its_points_exactly_and_draws_one_dot_each() -> None:
    points = [(1, 0.1234567890123), (2, 0.5), (3, 0.75)]
    svg = line_chart("accuracy", points, title="accuracy", y_min=0.0, y_max=1.0)
    assert points_of(svg) == [[1, 0.1234567890123], [2, 0.5], [3, 0.75]]
    assert svg.count("<circle") == 3 and 'data-value="0.1234567890123"' in svg
    assert "round 1" in svg and "round 3" in svg


def test_an_empty_chart_says_so_and_a_single_point_has_one_round_label() -> None:
    assert "no committed rounds yet" in line_chart("loss", [], title="loss")
    one = line_chart("loss", [(4, 2.0)], title="loss")
    assert one.count("round 4") == 2 and "round 5" not in one  # the dot's title and the axis


def test_a_budget_line_is_drawn_and_non_finite_values_are_skipped() -> None:
    svg = line_chart("epsilon", [(1, 1.0), (2, float("nan")), (3, 3.0)], title="eps",
                     limit=8.0)
    assert 'class="limit"' in svg and "budget 8" in svg and svg.count("<circle") == 2


def test_a_bar_chart_has_a_bar_per_round() -> None:
    svg = bar_chart("secagg_dropped", [(1, 0.0), (2, 2.0)], title="dropouts")
    assert svg.count("<rect") == 2 and points_of(svg) == [[1, 0.0], [2, 2.0]]


def snapshot(name: str, reason: str) -> TaskSnapshot:
    funnel = Funnel(checked_in=3, selected=3, reported=1, late=0, rejected=1, dropped=1,
                    rejected_by_reason={XSS: 1}, refusals={XSS: 2})
    attempt = AttemptRow(round_number=1, attempt=1, state="failed", started_at=0.0,
                         ended_at=5.0, goal=3, failure_reason=reason, model_version=None,
                         accuracy=None, loss=None, epsilon=None, secagg_dropped=None,
                         funnel=funnel, steps=(Step(0.0, "opened"), Step(5.0, "failed", reason)))
    return TaskSnapshot(task_id="t-1", name=name, state="running", reason=reason,
                        created_at=0.0, rounds_planned=2, rounds_committed=0, model_version=0,
                        secure_aggregation=True, privacy=None, attempts=(attempt,))


def test_names_reasons_and_rejection_reasons_are_escaped_everywhere() -> None:
    reason = '"><img src=x onerror=alert(1)>'
    page = task_page(snapshot(XSS, reason))
    assert XSS not in page and "<img" not in page
    assert esc(XSS) in page and esc(reason) in page
    assert page.count("<script") == 1, "only the page's own script file"
    assert 'src="/static/dashboard.js"' in page
    assert "<img" not in timeline(snapshot(XSS, reason).attempts)


def test_a_long_history_is_thinned_evenly_keeping_the_first_and_last_rounds() -> None:
    points = [(n, float(n)) for n in range(1, 10_001)]
    kept = thin(points)
    assert len(kept) == CHART_POINTS and kept[0] == (1, 1.0) and kept[-1] == (10_000, 10_000.0)
    assert kept == sorted(set(kept))
    svg = line_chart("accuracy", points, title="accuracy")
    assert svg.count("<circle") == CHART_POINTS and len(points_of(svg)) == CHART_POINTS
    assert thin(points[:3]) == points[:3]
