"""The coordinator's dashboard: a read-only web UI for the HTTP side port.

``dashboard_app(service)`` is the ASGI app (mount it at ``/``, last, on the coordinator's
event loop); :mod:`.snapshot` holds the pure functions it shows (activity counted from events,
a task's snapshot from its records), :mod:`.render` the HTML and SVG, :mod:`.feed` the event
sink that wakes the live streams. See :mod:`coordinator.dashboard.app` for the routes.
"""

from coordinator.dashboard.app import dashboard_app
from coordinator.dashboard.feed import DashboardFeed
from coordinator.dashboard.snapshot import (
    ActivityCounter,
    RoundActivity,
    TaskSnapshot,
    count_activity,
    task_snapshot,
)

__all__ = [
    "ActivityCounter",
    "DashboardFeed",
    "RoundActivity",
    "TaskSnapshot",
    "count_activity",
    "dashboard_app",
    "task_snapshot",
]
