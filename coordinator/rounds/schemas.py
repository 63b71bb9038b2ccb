"""What the devices of each population said their data looks like, recently: per population,
how many distinct devices reported each data schema (feature shape, class count) at
check-in over the last ``window_s`` seconds. Launch checks read it
(:mod:`coordinator.rounds.launch`).

Memory is bounded whatever devices send, since the population name and the schema come from
them: at most ``max_populations`` populations (the least recently reported is forgotten
first), ``max_schemas`` schemas per population (the one with the fewest devices gives way)
and ``max_devices`` devices per schema (beyond that the count is "at least max_devices", and
the least recently seen device gives way). A device is counted under its latest schema only.

Not thread-safe (the service's event loop). Time is passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from core.types import DataSchema


@dataclass(frozen=True)
class SchemaCount:
    """A schema and the distinct devices that reported it in the window; ``saturated``: the
    count hit its bound, so there were at least that many."""

    schema: DataSchema
    devices: int
    saturated: bool = False

    def describe(self) -> str:
        """``[64] -> 10 classes (12 devices)``."""
        n = f"{self.devices}{'+' if self.saturated else ''}"
        return (f"{describe_schema(self.schema)} ({n} device{'' if self.devices == 1 else 's'})")


def describe_schema(schema: DataSchema) -> str:
    """``[64] -> 10 classes``, as launch checks and declines name a schema."""
    return f"{list(schema.feature_shape)} -> {schema.num_classes} classes"


class _Devices:
    """Last check-in time of each device that reported one schema, oldest first."""

    def __init__(self) -> None:
        self.seen: OrderedDict[str, float] = OrderedDict()
        self.saturated = False

    def expire(self, before: float) -> None:
        while self.seen:
            device, at = next(iter(self.seen.items()))
            if at >= before:
                return
            del self.seen[device]
        self.saturated = False


class ReportedSchemas:
    def __init__(self, *, window_s: float = 600.0, max_populations: int = 64,
                 max_schemas: int = 8, max_devices: int = 1024) -> None:
        self.window_s = window_s
        self._max_populations = max_populations
        self._max_schemas = max_schemas
        self._max_devices = max_devices
        self._populations: OrderedDict[str, dict[DataSchema, _Devices]] = OrderedDict()

    def record(self, population: str, device_id: str, schema: DataSchema, now: float) -> None:
        """``device_id`` (authenticated) of ``population`` checked in with ``schema``."""
        schemas = self._populations.get(population)
        if schemas is None:
            if len(self._populations) >= self._max_populations:
                self._populations.popitem(last=False)
            schemas = self._populations[population] = {}
        else:
            self._populations.move_to_end(population)
        for other, reporters in schemas.items():
            if other != schema:
                reporters.seen.pop(device_id, None)  # its data changed: counted once, as now
        devices = schemas.get(schema) or self._new_schema(schemas, schema, now)
        devices.seen[device_id] = now
        devices.seen.move_to_end(device_id)
        if len(devices.seen) > self._max_devices:
            devices.expire(now - self.window_s)
            while len(devices.seen) > self._max_devices:
                devices.seen.popitem(last=False)
                devices.saturated = True

    def of(self, population: str, now: float) -> list[SchemaCount]:
        """The schemas ``population`` reported in the window, the most devices first (ties
        in a stable order). A query: nothing is forgotten by it."""
        since = now - self.window_s
        counts = []
        for schema, devices in self._populations.get(population, {}).items():
            n = sum(1 for at in devices.seen.values() if at >= since)
            if n:
                counts.append(SchemaCount(schema, n, devices.saturated))
        counts.sort(key=lambda c: (-c.devices, c.schema.feature_shape, c.schema.num_classes))
        return counts

    def _new_schema(self, schemas: dict[DataSchema, _Devices], schema: DataSchema,
                    now: float) -> _Devices:
        if len(schemas) >= self._max_schemas:
            self._make_room(schemas, now)
        devices = schemas[schema] = _Devices()
        return devices

    def _make_room(self, schemas: dict[DataSchema, _Devices], now: float) -> None:
        for devices in schemas.values():
            devices.expire(now - self.window_s)
        for schema in [s for s, d in schemas.items() if not d.seen]:
            del schemas[schema]
        if len(schemas) >= self._max_schemas:
            fewest = min(schemas, key=lambda s: len(schemas[s].seen))
            del schemas[fewest]
