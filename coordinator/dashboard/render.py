"""HTML and SVG from snapshots: pure functions returning strings.

Every value that came from outside (task names, failure reasons, rejection reasons, ids)
goes through :func:`esc` exactly where it is put into markup; numbers are formatted here.
The pages load no inline script and no inline style (the app sends a Content-Security-Policy
that forbids both), so markup that slipped through unescaped would still not run.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Mapping, Sequence
from urllib.parse import quote

from coordinator.dashboard.snapshot import AttemptRow, Funnel, TaskSnapshot
from coordinator.rounds.tasks import TaskView

#: Attempts listed in the timeline and funnel tables (charts use every committed round).
TABLE_ATTEMPTS = 50
#: Points a chart draws at most: a longer history is thinned evenly, its last point kept
#: (a page and each live message stay small whatever the task's age).
CHART_POINTS = 500


def esc(value: object) -> str:
    """Text for HTML element content and quoted attribute values."""
    return html.escape(str(value), quote=True)


def _url(*parts: str) -> str:
    return "/" + "/".join(quote(p, safe="") for p in parts)


def task_url(task_id: str) -> str:
    return _url("tasks", task_id)


def model_url(task_id: str, version: int) -> str:
    return _url("tasks", task_id, "models", f"{version}.safetensors")


def stream_url(task_id: str) -> str:
    return _url("tasks", task_id, "stream")


def _time(at: float | None) -> str:
    if at is None:
        return "–"
    return time.strftime("%H:%M:%S", time.gmtime(at))


def _num(value: float | int | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def _count(value: int | None) -> str:
    return "–" if value is None else str(value)


def page(title: str, body: str, *, script: bool = False) -> str:
    js = '<script src="/static/dashboard.js" defer></script>' if script else ""
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)} · fedcoord</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="stylesheet" href="/static/dashboard.css">{js}</head>'
        f'<body><header><a href="/">fedcoord</a></header><main>{body}</main></body></html>\n')


# -- tasks list ----------------------------------------------------------------------------


def tasks_page(views: Sequence[TaskView]) -> str:
    rows = []
    for v in sorted(views, key=lambda v: v.record.created_at, reverse=True):
        current = v.current_round
        eps = (f"{_num(v.privacy.epsilon, 3)} / {_num(v.privacy.budget, 3)}"
               if v.privacy is not None else "–")
        rows.append(
            f'<tr data-task-id="{esc(v.record.task_id)}">'
            f'<td><a href="{esc(task_url(v.record.task_id))}">{esc(v.spec.name)}</a></td>'
            f"<td><code>{esc(v.record.task_id)}</code></td>"
            f'<td><span class="state state-{esc(v.record.state.value)}">'
            f"{esc(v.record.state.value)}</span></td>"
            f"<td>{v.record.rounds_committed} / {v.spec.rounds}</td>"
            f"<td>{esc(f'{current.round_number} ({current.state.value})') if current else '–'}</td>"
            f"<td>{v.record.model_version}</td><td>{esc(eps)}</td>"
            f"<td>{_time(v.record.created_at)}</td></tr>")
    table = ("<p>No tasks yet.</p>" if not rows else
             "<table class=\"tasks\"><thead><tr><th>name</th><th>id</th><th>state</th>"
             "<th>rounds committed</th><th>open round</th><th>model</th><th>ε / budget</th>"
             "<th>created (UTC)</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    return page("tasks", f"<h1>Tasks</h1>{table}")


# -- task page -----------------------------------------------------------------------------


def summary(s: TaskSnapshot) -> dict[str, str]:
    """The task's headline fields as text, by ``data-field`` name (the live feed sets them
    with ``textContent``)."""
    current = s.current
    return {
        "state": s.state,
        "reason": s.reason,
        "rounds_committed": str(s.rounds_committed),
        "rounds_planned": str(s.rounds_planned),
        "current_round": (f"{current.round_number} (attempt {current.attempt}, {current.state})"
                          if current is not None else "–"),
        "model_version": str(s.model_version),
        "epsilon": (f"{_num(s.privacy.epsilon, 4)} of {_num(s.privacy.budget, 4)} "
                    f"(δ = {_num(s.privacy.delta, 3)})" if s.privacy is not None else "off"),
        "seq": str(s.seq),
    }


def _field(name: str, value: str) -> str:
    return f'<span data-field="{esc(name)}">{esc(value)}</span>'


def task_page(s: TaskSnapshot, *, model_downloads: bool = True) -> str:
    f = summary(s)
    head = (
        f"<h1>{esc(s.name)}</h1>"
        f'<dl class="summary"><dt>task</dt><dd><code>{esc(s.task_id)}</code></dd>'
        f"<dt>state</dt><dd>{_field('state', f['state'])} {_field('reason', f['reason'])}</dd>"
        f"<dt>rounds committed</dt><dd>{_field('rounds_committed', f['rounds_committed'])}"
        f" of {_field('rounds_planned', f['rounds_planned'])}</dd>"
        f"<dt>open round</dt><dd>{_field('current_round', f['current_round'])}</dd>"
        f"<dt>model version</dt><dd>{_field('model_version', f['model_version'])}</dd>"
        f"<dt>ε spent</dt><dd>{_field('epsilon', f['epsilon'])}</dd>"
        f'<dt>live</dt><dd><span id="live">connecting…</span></dd></dl>')
    sections = "".join(
        f'<section><h2>{esc(title)}</h2><div id="{esc(pid)}">{markup}</div></section>'
        for pid, (title, markup) in _panels(s, model_downloads).items())
    body = (f'<div id="task" data-stream="{esc(stream_url(s.task_id))}" '
            f'data-seq="{s.seq}" data-final="{str(s.is_final).lower()}">{head}{sections}</div>')
    return page(s.name, body, script=True)


def panels(s: TaskSnapshot, *, model_downloads: bool = True) -> dict[str, str]:
    """The page's sections that the live feed replaces whole, by element id."""
    return {pid: markup for pid, (_, markup) in _panels(s, model_downloads).items()}


def _panels(s: TaskSnapshot, model_downloads: bool) -> dict[str, tuple[str, str]]:
    out = {
        "panel-charts": ("Server evaluation", _eval_charts(s)),
        "panel-timeline": ("Round timeline", timeline(s.attempts[-TABLE_ATTEMPTS:])),
        "panel-funnel": ("Participation", funnel_table(s.attempts[-TABLE_ATTEMPTS:])),
        "panel-privacy": ("Privacy and secure aggregation", _privacy(s)),
        "panel-models": ("Model versions", models_list(s, links=model_downloads)),
    }
    return out


def _eval_charts(s: TaskSnapshot) -> str:
    return (line_chart("accuracy", s.curve("accuracy"), title="accuracy", y_min=0.0, y_max=1.0)
            + line_chart("loss", s.curve("loss"), title="loss", y_min=0.0))


def timeline(attempts: Sequence[AttemptRow]) -> str:
    if not attempts:
        return "<p>No rounds yet.</p>"
    rows = []
    for a in reversed(attempts):
        steps = "".join(
            f'<li><time>{_time(st.at)}</time> <span class="step step-{esc(st.label.split()[0])}">'
            f"{esc(st.label)}</span>{(' — ' + esc(st.detail)) if st.detail else ''}</li>"
            for st in a.steps)
        duration = (f"{a.ended_at - a.started_at:.1f} s" if a.ended_at is not None else "open")
        rows.append(
            f'<tr class="attempt state-{esc(a.state)}" data-round="{a.round_number}" '
            f'data-attempt="{a.attempt}" data-state="{esc(a.state)}">'
            f"<td>{a.round_number}</td><td>{a.attempt}</td>"
            f'<td><span class="state state-{esc(a.state)}">{esc(a.state)}</span></td>'
            f"<td>{esc(duration)}</td><td><ol class=\"steps\">{steps}</ol></td>"
            f'<td class="reason">{esc(a.failure_reason)}</td></tr>')
    return ("<table class=\"timeline\"><thead><tr><th>round</th><th>attempt</th><th>state</th>"
            "<th>took</th><th>steps (UTC)</th><th>failure</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _reasons(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{esc(k)} {v}" for k, v in sorted(counts.items()))


def _rejected_cell(f: Funnel) -> str:
    if f.rejected is None:
        return "–"
    reasons = _reasons(f.rejected_by_reason)
    return f"{f.rejected}" + (f" <small>({reasons})</small>" if reasons else "")


def _refusals_cell(f: Funnel) -> str:
    if f.rejected is None:
        return "–"
    return _reasons(f.refusals) or "0"


def funnel_table(attempts: Sequence[AttemptRow]) -> str:
    if not attempts:
        return "<p>No rounds yet.</p>"
    rows = []
    for a in reversed(attempts):
        f = a.funnel
        rows.append(
            f'<tr data-round="{a.round_number}" data-attempt="{a.attempt}">'
            f"<td>{a.round_number}.{a.attempt}</td><td>{_count(f.checked_in)}</td>"
            f"<td>{_count(f.told_to_come_back)}</td>"
            f'<td data-col="selected">{f.selected}</td><td>{a.goal}</td>'
            f'<td data-col="reported">{f.reported}</td><td>{_count(f.late)}</td>'
            f"<td>{_rejected_cell(f)}</td><td>{_count(f.dropped)}</td>"
            f'<td class="refusals">{_refusals_cell(f)}</td></tr>')
    return ("<table class=\"funnel\"><thead><tr><th>round.attempt</th><th>checked in</th>"
            "<th>told to come back</th><th>selected</th><th>goal</th><th>reported</th>"
            "<th>late</th><th>rejected</th><th>dropped</th><th>messages refused</th></tr>"
            "</thead><tbody>" + "".join(rows) + "</tbody></table>"
            "<p class=\"note\">Devices, each counted once per column; late and rejected: "
            "devices that never reported. Messages refused: every refusal, retries of devices "
            "that did report included. –: not seen by this coordinator process (it started "
            "later); selected and reported always come from the database.</p>")


def _privacy(s: TaskSnapshot) -> str:
    parts = []
    if s.privacy is None:
        parts.append("<p>Differential privacy: off.</p>")
    else:
        p = s.privacy
        parts.append(
            f'<p>ε = {_num(p.epsilon, 4)} spent of a budget of {_num(p.budget, 4)} '
            f"(δ = {_num(p.delta, 3)}, {p.rounds_accounted} rounds accounted).</p>")
        parts.append(line_chart("epsilon", s.curve("epsilon"), title="ε after each round",
                                y_min=0.0, y_max=max(p.budget, p.epsilon), limit=p.budget))
    if s.secure_aggregation:
        parts.append(bar_chart("secagg_dropped", s.curve("secagg_dropped"),
                               title="secure-aggregation dropouts per round"))
    else:
        parts.append("<p>Secure aggregation: off.</p>")
    return "".join(parts)


def models_list(s: TaskSnapshot, *, links: bool = True) -> str:
    def name(v: int) -> str:
        if not links:
            return f"version {v}"
        return f'<a href="{esc(model_url(s.task_id, v))}" download>version {v}</a>'

    items = "".join(
        f'<li data-version="{v}">{name(v)} '
        f"<small>{'initial model' if r == 0 else f'round {r}'}</small></li>"
        for v, r in s.model_versions)
    return f'<ul class="models">{items}</ul>'


# -- charts --------------------------------------------------------------------------------

_W, _H, _PAD_L, _PAD_R, _PAD_T, _PAD_B = 480, 200, 48, 12, 24, 28


def _scale(points: Sequence[tuple[int, float]], y_min: float | None, y_max: float | None
           ) -> tuple[float, float, float, float]:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points if math.isfinite(p[1])]
    x0, x1 = min(xs), max(xs)
    lo = y_min if y_min is not None else (min(ys) if ys else 0.0)
    hi = max([*ys, lo]) if y_max is None else max([y_max, *ys])
    if hi <= lo:
        hi = lo + 1.0
    if x1 == x0:
        x1 = x0 + 1
    return x0, x1, lo, hi


def thin(points: Sequence[tuple[int, float]], most: int = CHART_POINTS
         ) -> list[tuple[int, float]]:
    """At most ``most`` of ``points``, evenly spaced, first and last kept."""
    if len(points) <= most:
        return list(points)
    step = (len(points) - 1) / (most - 1)
    return [points[round(i * step)] for i in range(most)]


def _data_attrs(series: str, points: Sequence[tuple[int, float]]) -> str:
    return (f'data-series="{esc(series)}" '
            f'data-points="{esc(json.dumps([[x, y] for x, y in points]))}"')


def line_chart(series: str, points: Sequence[tuple[int, float]], *, title: str,
               y_min: float | None = None, y_max: float | None = None,
               limit: float | None = None) -> str:
    """An SVG line chart of (round, value) points. ``data-points`` on the ``svg`` holds the
    values exactly (JSON; thinned to :data:`CHART_POINTS` by :func:`thin`); ``limit``: a dashed
    horizontal line (a budget)."""
    points = thin(points)
    head = (f'<figure class="chart"><figcaption>{esc(title)}</figcaption>')
    if not points:
        return (f'{head}<svg class="chart empty" {_data_attrs(series, [])} width="{_W}" '
                f'height="40" role="img"><text x="8" y="24">no committed rounds yet</text>'
                "</svg></figure>")
    x0, x1, lo, hi = _scale(points, y_min, y_max)
    if limit is not None:
        hi = max(hi, limit)

    def px(x: float) -> float:
        return _PAD_L + (x - x0) / (x1 - x0) * (_W - _PAD_L - _PAD_R)

    def py(y: float) -> float:
        return _H - _PAD_B - (y - lo) / (hi - lo) * (_H - _PAD_T - _PAD_B)

    finite = [(x, y) for x, y in points if math.isfinite(y)]
    last = max(x for x, _ in points)
    path = " ".join(f"{'M' if i == 0 else 'L'}{px(x):.1f},{py(y):.1f}"
                    for i, (x, y) in enumerate(finite))
    dots = "".join(
        f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" data-round="{x}" '
        f'data-value="{esc(repr(y))}"><title>round {x}: {esc(_num(y, 6))}</title></circle>'
        for x, y in finite)
    axes = (f'<line class="axis" x1="{_PAD_L}" y1="{_H - _PAD_B}" x2="{_W - _PAD_R}" '
            f'y2="{_H - _PAD_B}"/><line class="axis" x1="{_PAD_L}" y1="{_PAD_T}" '
            f'x2="{_PAD_L}" y2="{_H - _PAD_B}"/>'
            f'<text class="tick" x="{_PAD_L - 4}" y="{py(hi) + 4:.1f}" text-anchor="end">'
            f"{esc(_num(hi, 3))}</text>"
            f'<text class="tick" x="{_PAD_L - 4}" y="{py(lo) + 4:.1f}" text-anchor="end">'
            f"{esc(_num(lo, 3))}</text>"
            f'<text class="tick" x="{px(x0):.1f}" y="{_H - 8}" text-anchor="middle">'
            f"round {x0}</text>"
            + (f'<text class="tick" x="{px(last):.1f}" y="{_H - 8}" text-anchor="end">'
               f"round {last}</text>" if last != x0 else ""))
    budget = ""
    if limit is not None:
        budget = (f'<line class="limit" x1="{_PAD_L}" y1="{py(limit):.1f}" x2="{_W - _PAD_R}" '
                  f'y2="{py(limit):.1f}" stroke-dasharray="6 4"/>'
                  f'<text class="tick" x="{_W - _PAD_R}" y="{py(limit) - 4:.1f}" '
                  f'text-anchor="end">budget {esc(_num(limit, 4))}</text>')
    return (f'{head}<svg class="chart" {_data_attrs(series, points)} width="{_W}" '
            f'height="{_H}" viewBox="0 0 {_W} {_H}" role="img" aria-label="{esc(title)}">'
            f'{axes}{budget}<path class="line" d="{path}" fill="none"/>{dots}</svg></figure>')


def bar_chart(series: str, points: Sequence[tuple[int, float]], *, title: str) -> str:
    points = thin(points)
    head = f'<figure class="chart"><figcaption>{esc(title)}</figcaption>'
    if not points:
        return (f'{head}<svg class="chart empty" {_data_attrs(series, [])} width="{_W}" '
                f'height="40" role="img"><text x="8" y="24">no committed rounds yet</text>'
                "</svg></figure>")
    hi = max(1.0, *(y for _, y in points))
    width = (_W - _PAD_L - _PAD_R) / len(points)
    bars = []
    for i, (x, y) in enumerate(points):
        h = y / hi * (_H - _PAD_T - _PAD_B)
        bars.append(f'<rect class="bar" x="{_PAD_L + i * width + 1:.1f}" '
                    f'y="{_H - _PAD_B - h:.1f}" width="{max(width - 2, 1):.1f}" '
                    f'height="{h:.1f}" data-round="{x}" data-value="{esc(repr(y))}">'
                    f"<title>round {x}: {esc(_num(y))}</title></rect>")
    axes = (f'<line class="axis" x1="{_PAD_L}" y1="{_H - _PAD_B}" x2="{_W - _PAD_R}" '
            f'y2="{_H - _PAD_B}"/><text class="tick" x="{_PAD_L - 4}" y="{_PAD_T + 4}" '
            f'text-anchor="end">{esc(_num(hi, 3))}</text>')
    return (f'{head}<svg class="chart" {_data_attrs(series, points)} width="{_W}" '
            f'height="{_H}" viewBox="0 0 {_W} {_H}" role="img" aria-label="{esc(title)}">'
            f'{axes}{"".join(bars)}</svg></figure>')


def not_found_page(message: str) -> str:
    return page("not found", f"<h1>Not found</h1><p>{esc(message)}</p>")


def error_page(status_code: int, message: str) -> str:
    return page(str(status_code), f"<h1>{status_code}</h1><p>{esc(message)}</p>")


def live_message(s: TaskSnapshot, *, model_downloads: bool = True) -> str:
    """The JSON the live feed sends: the summary fields, the panels' HTML and the data."""
    data = s.to_json()
    for curve in ("accuracy", "loss", "epsilon", "secagg_dropped"):
        data[curve] = thin(data[curve])
    payload: Mapping[str, object] = {
        "seq": s.seq, "final": s.is_final, "summary": summary(s),
        "panels": panels(s, model_downloads=model_downloads), "data": data}
    return json.dumps(payload, separators=(",", ":"))


__all__ = [
    "bar_chart",
    "error_page",
    "esc",
    "line_chart",
    "live_message",
    "model_url",
    "not_found_page",
    "page",
    "panels",
    "stream_url",
    "summary",
    "task_page",
    "thin",
    "task_url",
    "tasks_page",
]
