"""Apps installed as packages: the ``fedcoord.apps`` (name -> :class:`~core.app_types.App`),
``fedcoord.models`` (name -> model factory) and ``fedcoord.data`` (name -> data source)
entry points, loaded once per process, each as an App. The registries ask for them the
first time a name is unknown; a broken entry point is kept aside (one bad package must not
hide the others) and reported when its name is asked for."""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Callable
from dataclasses import dataclass

from core.app_types import App

MODELS_GROUP = "fedcoord.models"
DATA_GROUP = "fedcoord.data"
APPS_GROUP = "fedcoord.apps"


@dataclass(frozen=True)
class InstalledApp:
    app: App
    #: ``entry point GROUP:NAME = VALUE``, for messages.
    origin: str


_lock = threading.Lock()
_found: list[InstalledApp] | None = None
#: Names whose entry point failed to load -> why.
_broken: dict[str, str] = {}


def installed_apps() -> list[InstalledApp]:
    """Every installed entry point of the three groups as an App (apps first), loaded on the
    first call."""
    global _found
    with _lock:
        if _found is None:
            _found = _load()
        return list(_found)


def broken(name: str) -> str | None:
    """Why the entry point named ``name`` could not be loaded, if it could not."""
    return _broken.get(name)


def as_app(value: object, where: str) -> App:
    """``value`` if it is an App, or what calling it returns when that is one.

    Raises:
        TypeError: neither; the message names ``where``.
    """
    if isinstance(value, App):
        return value
    if callable(value) and not isinstance(value, type):
        factory: Callable[[], object] = value
        made = factory()
        if isinstance(made, App):
            return made
        value = made
    raise TypeError(f"{where}: expected a fedcoord App (or a function returning one), got "
                    f"{type(value).__name__}")


def _load() -> list[InstalledApp]:
    found: list[InstalledApp] = []
    for group in (APPS_GROUP, MODELS_GROUP, DATA_GROUP):
        for entry in importlib.metadata.entry_points(group=group):
            origin = f"entry point {group}:{entry.name} = {entry.value}"
            try:
                value = entry.load()
                if group == APPS_GROUP:
                    app = as_app(value, origin)
                elif not callable(value):
                    raise TypeError(f"expected a function, got {type(value).__name__}")
                elif group == MODELS_GROUP:
                    app = App(models={entry.name: value})
                else:
                    app = App(data={entry.name: value})
            except Exception as exc:  # any error of user code
                _broken[entry.name] = (f"{origin} failed to load: {type(exc).__name__}: "
                                       f"{exc}")
                continue
            found.append(InstalledApp(app, origin))
    return found
