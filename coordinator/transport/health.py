"""gRPC health checking (``grpc.health.v1.Health``) and server reflection for the device and
admin services, on the coordinator's gRPC server.

Neither is authenticated: the auth interceptors (:mod:`.admin_auth`, :mod:`.device_auth`)
gate only the ``fedcoord.v1`` services' methods and pass every other method through. What
they reveal is public already: a serving status per service name, and the services' proto
descriptors (the wire contract in ``protos/``; no settings, keys or records).
"""

from __future__ import annotations

import grpc

# grpc_health.v1.health re-exports this module as ``aio`` (its stub does not say so).
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.fedcoord.v1 import admin_pb2, device_pb2

DEVICE_SERVICE = device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
#: The services whose health is reported and whose descriptors reflection serves.
SERVICES = (DEVICE_SERVICE, ADMIN_SERVICE)


class Health:
    """The health service of one server: NOT_SERVING until :meth:`serving`, and for good
    after :meth:`shutting_down`. The empty service name stands for the whole server.

    A standby replica serves the admin reads but no device: :meth:`standing_by` reports
    the admin service SERVING and the device service and the server NOT_SERVING, so a load
    balancer that checks either sends no device there."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        reflection.enable_server_reflection(
            (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)

    async def _set_all(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", *SERVICES):
            await self._servicer.set(service, status)

    async def not_serving(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def serving(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)

    async def standing_by(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._servicer.set(ADMIN_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    async def shutting_down(self) -> None:
        """NOT_SERVING for every service, permanently."""
        await self._servicer.enter_graceful_shutdown()
