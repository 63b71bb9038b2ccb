"""What ``benchmarks/fuzz.py`` fuzzes: every RPC of every service in protos/fedcoord/v1 against
an in-process coordinator, and every wire-to-core conversion of ``protos/convert.py``.

An input is one *action*: its first byte picks the action, the rest is the action's payload.

=======================  ==================================================================
``Service/Method``       the payload is the request's bytes (a client-streaming RPC: frames,
                         each a varint length and the bytes of one request message), handed
                         to the method handler the servicers register with a gRPC server,
                         request deserializer included, so the fuzzed path is the server's
                         own: bytes -> deserializer -> servicer -> service -> status
``convert/<function>``   the payload is one frame per message argument of a ``*_from_proto``
                         (or ``*_from_bytes``) function of protos/convert.py; what it accepts
                         must go back through the matching ``*_to_proto`` and come out equal
``clock/advance``        moves the coordinator's clock by up to 127.5 s and ticks the service,
                         so deadlines and selection windows fire between requests
``scenario/secure-round``  a whole secure-aggregation round of six honest devices
                         (core.secagg.client), one of which sends the payload as its request
                         at one stage: the way to the server's late stages (routing shares,
                         unmasking) with one malicious participant. Not in ``all``: an input
                         takes tens of milliseconds
=======================  ==================================================================

RPC payloads start with one byte that picks the call's credentials (``World.credentials``:
none, an admin's, a launcher's or a viewer's bearer token, an unknown token, a malformed
header), since admin calls are authenticated.

The RPCs and the conversions are found by reflection (service descriptors of the *_pb2
modules, the functions of convert.py), so a new RPC or conversion is fuzzed without a change
here. An RPC no servicer implements (nothing registered for it, or the generated base class's
stub) is listed as unimplemented and skipped.

A *crash* is anything a caller would see as a bug: a status of INTERNAL or UNKNOWN (an
exception nobody mapped; a request gRPC's server cannot deserialize is answered UNKNOWN), an
exception escaping the handler, a response of the wrong type, a call still waiting after
:data:`MAX_WAIT_S` simulated seconds (a hang), an exception from the service's tick, or a
conversion raising anything the servicers do not map to a status. The other status codes are
the service answering as designed.

The coordinator is coordinator/app.py's :class:`~coordinator.app.Coordinator`, wired as in
production (stores, security, interceptors, the transport's handlers) but for two stand-ins:
a :class:`FakeServer` for the gRPC server, so each call runs in process, and a
:class:`~coordinator.rounds.clock.ManualClock` for the system clock. It runs an in-memory
store and a blob store in a temporary folder, admin authentication on, and four tasks: plain
(``$task``), secure (``$secure``), a spare one for CancelTask's seeds (``$spare``) and the
scenario's, with devices seated, so that GetPlan, DownloadModel, UploadUpdate, ReportStatus
and the SecAgg stages get past the participation check. Ids and tokens are random per
coordinator, so requests name them by placeholder, filled in after deserialization:

* a ``task_id`` of ``$task``, ``$secure`` or ``$spare``: that task's id;
* a Participation whose token is ``$token``: the token and round number the device was last
  given for that task (from CheckIn answers);
* a ``device_id`` of ``$dev:NAME``: the id of the device named NAME;
* a DeviceProof whose signature is ``$sign``: a valid Ed25519 proof by the key of the device
  named by the proof's nonce or the request's device id (a key derived from the name, whose
  device id then replaces the request's), for when check-ins need proofs.

A call that waits on the coordinator (a SecAgg stage that must close) moves the clock on and
ticks the service until it answers, as time and the ticker would. The coordinator is rebuilt
every ``reset_every`` inputs, when tasks pile up and when a seeded task was cancelled, so the
seeded paths stay reachable and memory stays bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import importlib
import inspect
import math
import pkgutil
import random
import shutil
import tempfile
import time
import traceback
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import grpc
import numpy as np
from google.protobuf import message_factory, text_format
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message

import protos.fedcoord.v1 as protos_v1
from coordinator.rounds.clock import ManualClock
from coordinator.settings import CoordinatorSettings
from coordinator.transport.status import status_for
from core.tensors import sha256_hex
from core.types import (
    API_VERSION,
    ModelSpec,
    SecAggProtocol,
    SecureAggregation,
    TaskSpec,
)
from protos import convert
from protos.fedcoord.v1 import common_pb2, device_pb2

TASK = "$task"
SECURE = "$secure"
#: A third task, for the seeds that end one (CancelTask).
SPARE = "$spare"
#: The secure task of the secure-aggregation scenario (no seed names it).
SCENARIO = "$scenario"
TOKEN = "$token"
#: ``$dev:NAME``: the device id of the device named NAME (its key's, once it signed).
DEVICE = "$dev:"
SIGN = b"$sign"
#: Status codes that mean "an exception nobody mapped" rather than an answer.
CRASH_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
_OUR_CODE = ("/core/", "/coordinator/", "/protos/")
T = typing.TypeVar("T")


class Crash(Exception):
    """One finding: ``kind`` (unmapped, deserialize, escaped, response, hang, unregistered,
    convert, round-trip, tick), the action, a one-line ``signature`` to tell findings apart, and a reproducer."""

    def __init__(self, kind: str, action: str, detail: str, reproducer: str,
                 cause: BaseException | None = None) -> None:
        super().__init__(f"{kind} in {action}: {detail}")
        self.kind = kind
        self.action = action
        self.detail = detail
        self.reproducer = reproducer
        self.where = _where(cause) if cause is not None else ""
        self.cause = type(cause).__name__ if cause is not None else ""
        self.trace = ("".join(traceback.format_exception(cause)) if cause is not None else "")

    @property
    def signature(self) -> str:
        """Findings with one cause are one: an unparseable request is the same finding
        whichever RPC it was sent to."""
        if self.kind == "deserialize":
            return f"deserialize {self.cause} (any RPC; gRPC answers UNKNOWN)"
        what = self.cause or self.detail.split(":")[0][:60]
        return f"{self.kind} {self.action} {what}" + (f" @ {self.where}" if self.where else "")

    def record(self) -> dict[str, str]:
        return {"signature": self.signature, "kind": self.kind, "action": self.action,
                "detail": self.detail[:500], "where": self.where,
                "reproducer": self.reproducer[:4000], "traceback": self.trace[-4000:]}


def _where(exc: BaseException) -> str:
    """The innermost frame of our own code the exception passed through."""
    trace = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in trace if any(p in f.filename for p in _OUR_CODE)]
    if not (ours or trace):
        return "?"
    frame = (ours or trace)[-1]
    path = frame.filename
    for marker in _OUR_CODE:
        if marker in path:
            path = marker.strip("/") + "/" + path.split(marker, 1)[1]
            break
    return f"{path}:{frame.lineno} {frame.name}"


# ------------------------------------------------------------------ framing


def frames(payload: bytes) -> list[bytes]:
    """Splits a payload into frames: a varint length, then that many bytes (the last frame
    takes whatever is left)."""
    out: list[bytes] = []
    i = 0
    while i < len(payload):
        length = shift = 0
        while i < len(payload):
            b = payload[i]
            i += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80 or shift > 28:
                break
        out.append(payload[i:i + length])
        i += length
    return out


def frame(*parts: bytes) -> bytes:
    out = bytearray()
    for part in parts:
        n = len(part)
        while True:
            b = n & 0x7F
            n >>= 7
            out.append(b | (0x80 if n else 0))
            if not n:
                break
        out += part
    return bytes(out)


def describe(messages: Iterable[object]) -> str:
    """A reproducer: each message in protobuf text format, bytes (that did not parse) in hex,
    anything else by repr."""
    parts = []
    for m in messages:
        if isinstance(m, Message):
            body = text_format.MessageToString(m, as_utf8=True) or "<empty>"
            parts.append(f"# {m.DESCRIPTOR.full_name}\n{body}")
        elif isinstance(m, bytes):
            parts.append(f"# bytes\n{m.hex()}")
        else:
            parts.append(f"# {type(m).__name__}\n{m!r}")
    return "\n".join(parts)


# ------------------------------------------------------------------ an in-process server


class FakeServer:
    """Stands in for ``grpc.aio.server(...)``: collects what the composition root registers
    (servicers, interceptors) and looks a method up as the server does, interceptors first."""

    def __init__(self, *, interceptors: Sequence[Any] | None = None, **options: Any) -> None:
        self.interceptors = list(interceptors or ())
        self.generic: list[grpc.GenericRpcHandler[Any, Any]] = []
        self.registered: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler[Any, Any]]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
        for name, handler in handlers.items():
            self.registered[f"/{service}/{name}"] = handler

    def add_insecure_port(self, address: str) -> int:
        return 1

    def add_secure_port(self, address: str, credentials: object) -> int:
        return 1

    async def start(self) -> None:
        pass

    async def stop(self, grace: float | None) -> None:
        pass

    def servicer_handler(self, method: str) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The handler as registered, before interceptors."""
        if method in self.registered:
            return self.registered[method]
        details = _CallDetails(method, ())
        for generic in self.generic:
            found = generic.service(details)
            if found is not None:
                return found
        return None

    async def handler(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The handler the server would run: interceptors[0] outermost."""
        async def lookup(d: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
            return self.servicer_handler(d.method)

        continuation: Callable[[grpc.HandlerCallDetails], Any] = lookup
        for interceptor in reversed(self.interceptors):
            continuation = functools.partial(interceptor.intercept_service, continuation)
        return typing.cast("grpc.RpcMethodHandler[Any, Any] | None", await continuation(details))


@dataclasses.dataclass(frozen=True)
class _CallDetails(grpc.HandlerCallDetails):
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class FakeContext:
    """The part of ``grpc.aio.ServicerContext`` servicers use; records the status."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._metadata = metadata

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: object = ()) -> typing.NoReturn:
        self._code, self._details = code, details
        raise grpc.aio.AbortError()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_details(self, details: str) -> None:
        self._details = details

    def details(self) -> str:
        return self._details

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def time_remaining(self) -> float:
        return 30.0

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def set_trailing_metadata(self, metadata: object) -> None:
        pass

    async def send_initial_metadata(self, metadata: object) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class Rpc:
    name: str  # "fedcoord.v1.DeviceService/CheckIn"
    path: str  # "/fedcoord.v1.DeviceService/CheckIn"
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool


def rpcs() -> list[Rpc]:
    """Every RPC of every service in protos/fedcoord/v1, from the service descriptors."""
    found = []
    for info in pkgutil.iter_modules(protos_v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"{protos_v1.__name__}.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                found.append(_rpc(service.full_name, m))
    return sorted(found, key=lambda r: r.name)


def _rpc(service: str, m: MethodDescriptor) -> Rpc:
    return Rpc(
        name=f"{service}/{m.name}", path=f"/{service}/{m.name}",
        request=message_factory.GetMessageClass(m.input_type),
        response=message_factory.GetMessageClass(m.output_type),
        client_streaming=m.client_streaming, server_streaming=m.server_streaming,
    )


def _implemented(handler: grpc.RpcMethodHandler[Any, Any]) -> bool:
    """False when the behaviour is the generated base class's UNIMPLEMENTED stub."""
    behaviour = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                 or handler.stream_stream)
    func = getattr(behaviour, "__func__", behaviour)
    return not str(getattr(func, "__module__", "")).endswith("_pb2_grpc")


@dataclasses.dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[Message]


#: Simulated seconds a call may wait (for a stage or round to close) before it is a hang.
MAX_WAIT_S = 600.0
#: Event-loop turns a call may take without progress before the clock moves on.
_IDLE_TURNS = 50
_STEP_S = 0.5


class World:
    """A coordinator, wired by coordinator/app.py, with its tasks and seated devices (see
    the module's docstring); one event loop runs every call."""

    PLAIN_DEVICES = ("d0", "d1", "d2", "d3")
    SECURE_DEVICES = ("s0", "s1", "s2", "s3", "s4", "s5")
    #: Enrolled, never seated: for the seeds that revoke a device.
    SPARE_DEVICES = ("r0", "r1")

    def __init__(self, root: Path, *, seed: int = 0) -> None:
        from coordinator import app

        self.root = root
        # Starts at the real time: the security layer's own clock (proof windows, rate
        # limits) is the system's.
        self.clock = ManualClock(start=time.time())
        self.loop = asyncio.new_event_loop()
        servers: list[FakeServer] = []

        def server(**kwargs: Any) -> FakeServer:
            servers.append(FakeServer(**kwargs))
            return servers[-1]

        settings = CoordinatorSettings(
            db_url="memory://", store_dir=root / "store", port=0, seed=seed,
            max_chunk_bytes=4096, upload_idle_timeout_s=5.0)
        security = getattr(settings, "security", None)
        if security is not None and hasattr(security, "admin_auth"):
            # Admin calls need credentials: the interceptor's checks are fuzzed too.
            settings = dataclasses.replace(
                settings, security=dataclasses.replace(security, admin_auth=True))
        with mock.patch.object(app, "SystemClock", lambda: self.clock), \
                mock.patch.object(grpc.aio, "server", server):
            self.coordinator = app.Coordinator(settings)
            self.loop.run_until_complete(self.coordinator.start())
        self.service = self.coordinator.service
        self._server = servers[0]
        self.tasks: dict[str, str] = {}
        #: (task id, device id) -> (round number, token) of the device's last acceptance.
        self.seats: dict[tuple[str, str], tuple[int, str]] = {}
        #: A device's name in the inputs -> its key (made on first use from the name).
        self._keys: dict[str, Any] = {}
        #: Scenario devices' names (x0..x5) -> the devices of the current scenario round.
        self._aliases: dict[str, str] = {}
        self._scenarios = 0
        self._nonces = 0
        self.credentials = self._credentials()
        self.calls = 0
        self.tasks_created = 0
        self.spoilt = False
        self._setup()

    def close(self) -> None:
        self.loop.run_until_complete(self.coordinator.stop(0))
        self.loop.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def implemented(self, rpc: Rpc) -> bool:
        handler = self._server.servicer_handler(rpc.path)
        return handler is not None and _implemented(handler)

    # -------------------------------------------------------------- credentials

    def _credentials(self) -> list[tuple[tuple[str, str], ...]]:
        """The metadata an input may send, by index: none, an admin's, a launcher's and a
        viewer's bearer token, a well-formed token nobody issued, a malformed header."""
        secrets = {}
        security = getattr(self.coordinator, "security", None)
        if security is not None:
            from coordinator.security.roles import Role
            for role in Role:
                secrets[role.name] = security.admin.create_token(role, label="fuzz")[1]
        bearer = [(("authorization", f"Bearer {secrets[r]}"),) if r in secrets else ()
                  for r in ("ADMIN", "LAUNCHER", "VIEWER")]
        return [(), *bearer, (("authorization", "Bearer fct_0123456789abcdef_nope"),),
                (("authorization", "Basic Zm9vOmJhcg=="),)]

    def _sign(self, proof: Message, purpose: str, request: Message) -> None:
        """Fills a DeviceProof whose signature is ``$sign``: the key is the one of the
        device named by the proof's nonce or else by the request's device id, which becomes
        the key's device id."""
        from core.security.identity import DeviceKey

        p = typing.cast(device_pb2.DeviceProof, proof)
        name = p.nonce.decode(errors="replace") or str(getattr(request, "device_id", ""))
        name = self._aliases.get(name, name)
        key = self._keys.get(name)
        if key is None:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
            key = self._keys[name] = DeviceKey(Ed25519PrivateKey.from_private_bytes(
                hashlib.sha256(name.encode()).digest()))
        self._nonces += 1
        task_id = str(getattr(request, "task_id", ""))
        made = key.prove(purpose, task_id, timestamp_ms=int(self.clock.now() * 1000),
                         nonce=self._nonces.to_bytes(16, "little"))
        p.public_key, p.timestamp_ms, p.nonce, p.signature = (
            made.public_key, made.timestamp_ms, made.nonce, made.signature)
        if "device_id" in request.DESCRIPTOR.fields_by_name:
            typing.cast(Any, request).device_id = key.device_id

    def device_id(self, name: str) -> str:
        """The id a device named ``name`` has once it signed a request ($sign)."""
        name = self._aliases.get(name, name)
        key = self._keys.get(name)
        return str(key.device_id) if key is not None else name

    # -------------------------------------------------------------- setup

    def _setup(self) -> None:
        create = _by_name()["fedcoord.v1.AdminService/CreateTask"]
        for alias, spec in ((TASK, plain_spec()), (SECURE, secure_spec()),
                            (SPARE, plain_spec()), (SCENARIO, secure_spec())):
            out = self.call(create, [admin_request(spec).SerializeToString()],
                            self.credentials[1])
            if out.code is not grpc.StatusCode.OK:
                raise RuntimeError(f"cannot create the fuzzed task: {out.code} {out.details}")
            self.tasks[alias] = out.responses[0].task.task_id  # type: ignore[attr-defined]
        check_in = _by_name()["fedcoord.v1.DeviceService/CheckIn"]
        pairs = [(TASK, d) for d in self.PLAIN_DEVICES] + [(SECURE, d) for d in
                                                            self.SECURE_DEVICES]
        enroll = _by_name().get("fedcoord.v1.DeviceService/Enroll")
        if enroll is not None and self.implemented(enroll):
            for device in [d for _, d in pairs] + list(self.SPARE_DEVICES):
                self.call(enroll, [enroll_request(device).SerializeToString()])
        for _ in range(2):
            for alias, device in pairs:
                self.call(check_in, [check_in_request(device, alias).SerializeToString()])
            self.clock.advance(1.1)

    # -------------------------------------------------------------- calls

    def call(self, rpc: Rpc, payloads: Sequence[bytes],
             metadata: tuple[tuple[str, str], ...] = ()) -> Outcome:
        """One RPC as the gRPC server runs it: interceptors, deserializer, servicer,
        serializer.

        Raises Crash for what a caller would see as a bug."""
        return self.loop.run_until_complete(self.drive(self.acall(rpc, payloads, metadata),
                                                       rpc.name))

    def call_together(self, calls: Sequence[tuple[Rpc, Sequence[bytes]]]) -> list[Outcome]:
        """Several RPCs at once (devices in one secure-aggregation stage)."""
        async def together() -> list[Outcome]:
            results = await asyncio.gather(*(self.acall(rpc, payloads) for rpc, payloads in calls),
                                           return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            return typing.cast(list[Outcome], results)
        return self.loop.run_until_complete(self.drive(together(), "stage"))

    async def acall(self, rpc: Rpc, payloads: Sequence[bytes],
                    metadata: tuple[tuple[str, str], ...] = ()) -> Outcome:
        self.calls += 1
        context = FakeContext(metadata)
        sent: list[object] = []
        try:
            responses = await self._invoke(rpc, payloads, context, sent, metadata)
        except grpc.aio.AbortError as exc:
            code = context.code()
            assert code is not None
            if code in CRASH_CODES:
                raise Crash("unmapped", rpc.name, f"{code.name}: {context.details()}",
                            describe(sent), exc.__context__) from exc
            return Outcome(code, context.details(), [])
        except (Crash, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise Crash("escaped", rpc.name, f"{type(exc).__name__}: {exc}", describe(sent),
                        exc) from exc
        code = context.code()
        if code not in (None, grpc.StatusCode.OK):
            if code in CRASH_CODES:
                raise Crash("unmapped", rpc.name, f"{code.name}: {context.details()}",
                            describe(sent))
            return Outcome(code, context.details(), [])
        for response in responses:
            if not isinstance(response, rpc.response):
                raise Crash("response", rpc.name, f"a {type(response).__name__}, expected "
                            f"{rpc.response.__name__}", describe(sent))
            self._note(sent, response)
        return Outcome(grpc.StatusCode.OK, "", list(responses))

    async def drive(self, call: typing.Coroutine[Any, Any, T], what: str) -> T:
        """Runs ``call``; while it waits without progress, time passes (the ticker's work)."""
        task = asyncio.ensure_future(call)
        waited = 0.0
        while True:
            for _ in range(_IDLE_TURNS):
                if task.done():
                    return task.result()
                await asyncio.sleep(0)
            if waited >= MAX_WAIT_S:
                task.cancel()
                raise Crash("hang", what, f"no answer after {MAX_WAIT_S:.0f} simulated s", "")
            self.clock.advance(_STEP_S)
            waited += _STEP_S
            self.service.tick()

    async def _invoke(self, rpc: Rpc, payloads: Sequence[bytes], context: FakeContext,
                      sent: list[object], metadata: tuple[tuple[str, str], ...]
                      ) -> list[Message]:
        handler = await self._server.handler(_CallDetails(rpc.path, metadata))
        if handler is None:
            raise Crash("unregistered", rpc.name, "no handler", "")

        def parse(data: bytes, *, streamed: bool) -> Message:
            sent.append(data)
            try:
                msg = (handler.request_deserializer(data) if handler.request_deserializer
                       else rpc.request.FromString(data))
            except Exception as exc:
                if streamed:  # raised into the servicer, which reads the stream
                    raise
                # gRPC's server answers UNKNOWN ("Exception deserializing request")
                raise Crash("deserialize", rpc.name, f"{type(exc).__name__}: {exc}",
                            describe(sent), exc) from exc
            if isinstance(msg, Message):  # else the transport's refusal of the bytes
                sent[-1] = msg
                self._fill_placeholders(msg, rpc)
            return typing.cast(Message, msg)

        if rpc.client_streaming:
            async def stream() -> AsyncIterator[Message]:
                for data in payloads:
                    yield parse(data, streamed=True)
            request: object = stream()
        else:
            request = parse(payloads[0] if payloads else b"", streamed=False)
        behaviour: Any = {
            (False, False): handler.unary_unary, (False, True): handler.unary_stream,
            (True, False): handler.stream_unary, (True, True): handler.stream_stream,
        }[(rpc.client_streaming, rpc.server_streaming)]
        result = behaviour(request, context)
        responses = [m async for m in result] if rpc.server_streaming else [await result]
        for response in responses:
            try:
                if handler.response_serializer is not None:
                    handler.response_serializer(response)
            except Exception as exc:
                raise Crash("response", rpc.name, f"cannot serialize: {exc}", describe(sent),
                            exc) from exc
        return responses

    def _fill_placeholders(self, msg: Message, rpc: Rpc) -> None:
        """``$task``/``$secure`` task ids, ``$token`` participations and ``$sign`` proofs,
        at any depth."""
        proof = None
        for field, value in msg.ListFields():
            if field.name == "task_id" and isinstance(value, str) and value in self.tasks:
                setattr(msg, field.name, self.tasks[value])
            elif field.name == "device_id" and isinstance(value, str) and \
                    value.startswith(DEVICE):
                setattr(msg, field.name, self.device_id(value[len(DEVICE):]))
            elif field.message_type is not None and \
                    not field.message_type.GetOptions().map_entry:
                for sub in (value if field.is_repeated else [value]):
                    if sub.DESCRIPTOR.full_name == "fedcoord.v1.DeviceProof" and \
                            getattr(sub, "signature", b"") == SIGN:
                        proof = sub
                    else:
                        self._fill_placeholders(sub, rpc)
        if proof is not None:
            method = rpc.name.split("/")[1]
            self._sign(proof, "enroll" if method == "Enroll" else "check-in", msg)
        if msg.DESCRIPTOR.full_name == "fedcoord.v1.Participation":
            p = typing.cast(device_pb2.Participation, msg)
            if p.token == TOKEN:
                p.device_id = self.device_id(p.device_id)
                seat = self.seats.get((p.task_id, p.device_id))
                if seat is not None:
                    p.round_number, p.token = seat

    def _note(self, sent: list[object], response: Message) -> None:
        """Remembers the seat a check-in was given, for ``$token``, and counts tasks."""
        if response.DESCRIPTOR.name == "CreateTaskResponse":
            self.tasks_created += 1
        if response.DESCRIPTOR.name == "CancelTaskResponse" and \
                typing.cast(Any, response).task.task_id in (self.tasks[TASK], self.tasks[SECURE]):
            self.spoilt = True  # the seeded paths are gone until the next coordinator
        if response.DESCRIPTOR.name == "RevokeDeviceResponse" and \
                typing.cast(Any, response).device.device_id in {
                    self.device_id(d) for d in self.PLAIN_DEVICES + self.SECURE_DEVICES}:
            self.spoilt = True
        if isinstance(response, device_pb2.CheckInResponse) and \
                response.outcome == device_pb2.CheckInResponse.ACCEPTED and sent and \
                isinstance(sent[0], device_pb2.CheckInRequest):
            self.seats[(response.task_id, sent[0].device_id)] = (
                response.round_number, response.participation_token)

    # -------------------------------------------------------------- a secure round

    SCENARIO_DEVICES = tuple(f"x{i}" for i in range(6))
    STAGES = ("SecAggAdvertiseKeys", "SecAggShareKeys", "SecAggMaskedInput", "SecAggUnmask")

    def secure_round(self, adversary: int, stage: int, payload: bytes | None,
                     record: dict[int, bytes] | None = None) -> None:
        """A round of the scenario task: six honest devices (core.secagg.client) through the
        four SecAgg stages, each stage's calls at once, except that device ``adversary``
        sends ``payload`` as its request at ``stage`` (None: its honest one). A device whose
        honest client refuses what it got drops out. ``record``: gets device ``adversary``'s
        honest request per stage, with placeholders (seeds)."""
        from core.protocol import config_hash
        from core.secagg import messages as sa
        from core.secagg.client import SecAggClient
        from core.secagg.encoding import encode_update, masked_metric_values
        from core.secagg.errors import SecAggError

        seats = self._seat_scenario()
        if seats is None:
            return
        plan = self.service.get_plan(seats[0])
        secure = plan.secure_aggregation
        assert secure is not None
        clients = {i: SecAggClient(secure.params, secure.context, config_hash(plan))
                   for i in range(len(seats))}
        size = sum(t.numel for t in plan.update_tensors)
        rng = np.random.default_rng(adversary * 4 + stage)
        replies: dict[int, Message] = {}
        for number, method in enumerate(self.STAGES):
            rpc = _by_name()[f"fedcoord.v1.DeviceService/{method}"]
            requests: dict[int, Message] = {}
            for i, client in clients.items():
                if number and i not in replies:
                    continue  # dropped out
                p = device_pb2.Participation(
                    device_id=seats[i].device_id, task_id=seats[i].task_id,
                    round_number=seats[i].round_number, token=seats[i].token)
                try:
                    if number == 0:
                        adv = client.advertise()
                        req: Message = device_pb2.SecAggAdvertiseKeysRequest(
                            encryption_public_key=adv.encryption_public,
                            mask_public_key=adv.mask_public, config_hash=adv.config_hash)
                    elif number == 1:
                        shared = client.share_keys(convert.share_keys_instruction_from_proto(
                            typing.cast(device_pb2.SecAggShareKeysInstruction, replies[i])))
                        req = device_pb2.SecAggShareKeysRequest(
                            ciphertexts=convert.ciphertexts_to_proto(shared.ciphertexts))
                    elif number == 2:
                        got = typing.cast(device_pb2.SecAggMaskInstruction, replies[i])
                        values = np.append(rng.uniform(-0.4, 0.4, size), masked_metric_values(
                            {"train_loss": 1.0}, secure.params.clip))
                        enc = encode_update(values, 10 * (i + 1), secure.params, rng)
                        vector = client.mask(sa.MaskedInputRequest(
                            convert.ciphertexts_from_proto(got.ciphertexts)), enc.vector)
                        req = device_pb2.SecAggMaskedInputRequest(
                            masked_input=convert.ring_vector_to_bytes(vector),
                            clipped_values=enc.clipped)
                    else:
                        shares = client.unmask(convert.unmask_instruction_from_proto(
                            typing.cast(device_pb2.SecAggUnmaskInstruction, replies[i])))
                        req = device_pb2.SecAggUnmaskRequest(
                            seed_shares=convert.shares_to_proto(shares.seed_shares),
                            key_shares=convert.shares_to_proto(shares.key_shares))
                except SecAggError:
                    continue  # an honest device refuses what it was sent
                typing.cast(Any, req).api_version = API_VERSION
                typing.cast(Any, req).participation.CopyFrom(p)
                requests[i] = req
            if record is not None and adversary in requests:
                mine = rpc.request()
                mine.CopyFrom(requests[adversary])
                typing.cast(Any, mine).participation.CopyFrom(
                    participation(self.SCENARIO_DEVICES[adversary], SCENARIO))
                record[number] = mine.SerializeToString()
            order = sorted(requests)
            payloads = [requests[i].SerializeToString() for i in order]
            if not payloads and not (number == stage and payload is not None):
                return  # everyone dropped out
            if number == stage and payload is not None:
                if adversary not in requests:
                    order.append(adversary)
                    payloads.append(payload)
                else:
                    payloads[order.index(adversary)] = payload
            outcomes = self.call_together([(rpc, [data]) for data in payloads])
            replies = {i: out.responses[0] for i, out in zip(order, outcomes, strict=True)
                       if out.code is grpc.StatusCode.OK}

    def _seat_scenario(self) -> list[Any] | None:
        """The scenario devices' seats in a fresh round of the scenario task, or None."""
        from core.protocol import Participation as Seat

        check_in = _by_name()["fedcoord.v1.DeviceService/CheckIn"]
        task_id = self.tasks[SCENARIO]
        for _ in range(500):  # the last round's commit, on the coordinator's worker thread
            rounds = self.service.list_rounds(task_id)
            if not rounds or rounds[-1].state.value != "aggregating":
                break
            time.sleep(0.001)
            self.service.tick()
        # New devices each round: the per-device check-in rate limit stays out of the way.
        self._scenarios += 1
        self._aliases = {n: f"{n}-{self._scenarios}" for n in self.SCENARIO_DEVICES}
        enroll = _by_name().get("fedcoord.v1.DeviceService/Enroll")
        if enroll is not None and self.implemented(enroll):
            for name in self.SCENARIO_DEVICES:
                self.call(enroll, [enroll_request(name).SerializeToString()])
        for _ in range(2):
            for name in self.SCENARIO_DEVICES:
                self.call(check_in, [check_in_request(name, SCENARIO).SerializeToString()])
            self.clock.advance(1.1)
            seats = []
            for name in self.SCENARIO_DEVICES:
                out = self.call(check_in, [check_in_request(name, SCENARIO).SerializeToString()])
                got = typing.cast(device_pb2.CheckInResponse,
                                  out.responses[0] if out.responses else None)
                if got is not None and got.outcome == device_pb2.CheckInResponse.ACCEPTED:
                    seats.append(Seat(self.device_id(name), got.task_id, got.round_number,
                                      got.participation_token))
            if len(seats) == len(self.SCENARIO_DEVICES):
                return seats
            self.clock.advance(31.0)  # whatever round is open ends at its deadline
            self.service.tick()
        return None

    # -------------------------------------------------------------- seeds

    def update_seed(self, alias: str, device: str) -> list[bytes]:
        """A valid upload (header and chunks) of an all-zero update, by placeholder."""
        plan = _by_name()["fedcoord.v1.DeviceService/GetPlan"]
        p = participation(device, alias)
        out = self.call(plan, [device_pb2.GetPlanRequest(
            api_version=API_VERSION, participation=p).SerializeToString()])
        if out.code is not grpc.StatusCode.OK:
            return []
        resp = typing.cast(device_pb2.GetPlanResponse, out.responses[0])
        size = sum(_nbytes(t) for t in resp.update_tensors)
        payload = bytes(size)
        header = device_pb2.UpdateHeader(
            api_version=API_VERSION, participation=p, num_examples=10,
            tensors=list(resp.update_tensors), total_bytes=size, sha256=sha256_hex(payload),
            metrics={"train_loss": 1.0}, upload_id=f"fuzz-upload-{device}-0001")
        messages = [device_pb2.UploadUpdateRequest(header=header).SerializeToString()]
        for i in range(0, size, 64):
            messages.append(device_pb2.UploadUpdateRequest(
                chunk=payload[i:i + 64]).SerializeToString())
        return messages


_DTYPE_BYTES = {common_pb2.DTYPE_FLOAT32: 4, common_pb2.DTYPE_FLOAT64: 8,
                common_pb2.DTYPE_FLOAT16: 2, common_pb2.DTYPE_INT32: 4,
                common_pb2.DTYPE_INT64: 8}


def _nbytes(t: common_pb2.TensorSpec) -> int:
    return _DTYPE_BYTES.get(t.dtype, 4) * math.prod(t.shape)


def plain_spec() -> TaskSpec:
    return TaskSpec(
        name="fuzz", model=ModelSpec("logistic_regression", {"input_dim": 4, "num_classes": 3}),
        rounds=1000, clients_per_round=4, min_reports=3, over_selection=1.0,
        round_deadline_s=30.0, selection_window_s=1.0,
    )


def secure_spec() -> TaskSpec:
    return dataclasses.replace(
        plain_spec(), name="fuzz-secure", clients_per_round=6, min_reports=4,
        secure_aggregation=SecureAggregation(protocol=SecAggProtocol.SECAGG, threshold=0.6,
                                             dropout=0.001, clip=0.5, phase_timeout_s=5.0))


def admin_request(spec: TaskSpec) -> Message:
    from protos.fedcoord.v1 import admin_pb2
    return admin_pb2.CreateTaskRequest(api_version=API_VERSION,
                                       spec=convert.task_spec_to_proto(spec))


def check_in_request(device: str, alias: str) -> device_pb2.CheckInRequest:
    return device_pb2.CheckInRequest(
        api_version=API_VERSION, device_id=device, task_id=alias,
        attributes=common_pb2.DeviceAttributes(charging=True, unmetered=True, idle=True),
        proof=device_pb2.DeviceProof(signature=SIGN))


def enroll_request(device: str) -> device_pb2.EnrollRequest:
    # Enroll has no device id: the device's name travels in the nonce until it is signed.
    return device_pb2.EnrollRequest(api_version=API_VERSION, proof=device_pb2.DeviceProof(
        nonce=device.encode(), signature=SIGN))


def participation(device: str, alias: str) -> device_pb2.Participation:
    return device_pb2.Participation(device_id=device, task_id=alias, token=TOKEN)


# ------------------------------------------------------------------ actions


@dataclasses.dataclass(frozen=True)
class Action:
    name: str
    run: Callable[[Fuzzer, bytes], None]
    seeds: Callable[[Fuzzer], list[bytes]]
    group: str  # "convert", "clock" or the service's name


class Fuzzer:
    """Holds the world and the actions; :meth:`one_input` is libFuzzer's TestOneInput."""

    def __init__(self, actions: Sequence[str] = ("all",), *, root: Path | None = None,
                 reset_every: int = 500, max_tasks: int = 12, seed: int = 0) -> None:
        """``root``: a folder for the coordinators' files (default: a new temporary one);
        it is removed by :meth:`close`."""
        self._reset_every = reset_every
        self._max_tasks = max_tasks
        self._seed = seed
        self._tmp = root if root is not None else Path(tempfile.mkdtemp(prefix="fedcoord-fuzz-"))
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._worlds = 0
        self._world: World | None = None
        self.unimplemented: list[str] = []
        self.not_fuzzed: list[str] = []
        available = self._discover()
        self.actions = [a for a in available if _selected(a, actions)]
        if not self.actions:
            names = ", ".join(a.name for a in available)
            raise ValueError(f"no action matches {list(actions)}; known: {names}")
        self.executions = 0

    @property
    def world(self) -> World:
        w = self._world
        if w is None or w.calls >= self._reset_every or w.tasks_created > self._max_tasks \
                or w.spoilt:
            if w is not None:
                w.close()
            self._worlds += 1
            w = self._world = World(self._tmp / f"world-{self._worlds}", seed=self._seed)
        return w

    def close(self) -> None:
        if self._world is not None:
            self._world.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def one_input(self, data: bytes) -> None:
        """Runs one action; raises Crash for a finding."""
        if not data:
            return
        self.executions += 1
        action = self.actions[data[0] % len(self.actions)]
        action.run(self, data[1:])

    def seeds(self) -> Iterator[bytes]:
        for i, action in enumerate(self.actions):
            for seed in action.seeds(self):
                yield bytes([i]) + seed

    # -------------------------------------------------------------- discovery

    def _discover(self) -> list[Action]:
        found: list[Action] = []
        world = self.world
        for rpc in rpcs():
            if not world.implemented(rpc):
                self.unimplemented.append(rpc.name)
                continue
            found.append(Action(rpc.name, _rpc_runner(rpc), _rpc_seeds(rpc),
                                rpc.name.split("/")[0]))
        for name, fn in sorted(vars(convert).items()):
            if name.startswith("_") or not name.endswith(("_from_proto", "_from_bytes")):
                continue
            if not callable(fn) or getattr(fn, "__module__", "") != convert.__name__:
                continue
            params = _convert_params(fn)
            if params is None:
                self.not_fuzzed.append(f"convert/{name}")
                continue
            found.append(Action(f"convert/{name}", _convert_runner(name, fn, params),
                                _convert_seeds(name), "convert"))
        found.append(Action("clock/advance", _advance, lambda f: [b"\x02", b"\x3d", b"\xff"],
                            "clock"))
        found.append(Action("scenario/secure-round", _secure_round, _secure_round_seeds,
                            "scenario"))
        return found


def _selected(action: Action, wanted: Sequence[str]) -> bool:
    """``all`` is every action but the scenario (tens of milliseconds an input, where the
    others take about one): it is asked for by name."""
    for w in wanted:
        if (w == "all" and action.group != "scenario") or w == action.group or w == action.name or \
                action.name.endswith("/" + w) or (w == "device" and "DeviceService" in
                                                 action.group) or \
                (w == "admin" and "AdminService" in action.group):
            return True
    return False


@functools.cache
def _by_name() -> dict[str, Rpc]:
    return {r.name: r for r in rpcs()}


# -------------------------------------------------------------- RPC actions


def _rpc_runner(rpc: Rpc) -> Callable[[Fuzzer, bytes], None]:
    def run(fuzzer: Fuzzer, payload: bytes) -> None:
        world = fuzzer.world
        metadata = world.credentials[payload[0] % len(world.credentials)] if payload else ()
        body = payload[1:]
        world.call(rpc, frames(body) if rpc.client_streaming else [body], metadata)
    return run


def _rpc_seeds(rpc: Rpc) -> Callable[[Fuzzer], list[bytes]]:
    def seeds(fuzzer: Fuzzer) -> list[bytes]:
        """Seeds name the credentials first (0: none; 1: an admin's; 3: a viewer's)."""
        world = fuzzer.world
        method = rpc.name.split("/")[1]
        admin = "AdminService" in rpc.name
        wrap = frame if rpc.client_streaming else (lambda b: b)
        messages = [rpc.request()]
        for alias, devices in ((TASK, World.PLAIN_DEVICES), (SECURE, World.SECURE_DEVICES)):
            for device in devices[:2]:
                msg = rpc.request()
                fields = msg.DESCRIPTOR.fields_by_name
                if "participation" in fields:
                    msg.participation.CopyFrom(participation(device, alias))  # type: ignore[attr-defined]
                if "device_id" in fields:
                    if method == "RevokeDevice":
                        device = World.SPARE_DEVICES[len(messages) % 2]
                    msg.device_id = f"{DEVICE}{device}" if admin else device  # type: ignore[attr-defined]
                if "task_id" in fields:
                    msg.task_id = SPARE if method == "CancelTask" else alias  # type: ignore[attr-defined]
                if "attributes" in fields:
                    msg.attributes.CopyFrom(check_in_request(device, alias).attributes)  # type: ignore[attr-defined]
                if "proof" in fields:
                    msg.proof.CopyFrom(device_pb2.DeviceProof(  # type: ignore[attr-defined]
                        nonce=device.encode(), signature=SIGN))
                _fill_seed(method, msg, alias)
                messages.append(msg)
        if method == "CreateTask":
            messages += [admin_request(plain_spec()), admin_request(secure_spec())]
        for msg in messages:
            if "api_version" in msg.DESCRIPTOR.fields_by_name:
                msg.api_version = API_VERSION  # type: ignore[attr-defined]
        out = [bytes([1 if admin else 0]) + wrap(m.SerializeToString()) for m in messages]
        if admin:
            out.append(b"\x03" + out[-1][1:])
        if method == "UploadUpdate":
            for alias, devices in ((TASK, World.PLAIN_DEVICES), (SECURE, World.SECURE_DEVICES)):
                for device in devices[:2]:
                    out.append(b"\x00" + frame(*world.update_seed(alias, device)))
        return out
    return seeds


def _fill_seed(method: str, msg: Message, alias: str) -> None:
    """Plausible contents for the fields an RPC needs beyond who is calling."""
    fields = msg.DESCRIPTOR.fields_by_name
    rng = random.Random(method)
    if method == "SecAggAdvertiseKeys":
        m = typing.cast(device_pb2.SecAggAdvertiseKeysRequest, msg)
        m.encryption_public_key = rng.randbytes(32)
        m.mask_public_key = rng.randbytes(32)
        m.config_hash = hashlib.sha256(b"config").digest()
    elif method == "SecAggShareKeys":
        s = typing.cast(device_pb2.SecAggShareKeysRequest, msg)
        s.ciphertexts.add(peer=1, ciphertext=rng.randbytes(48))
    elif method == "SecAggMaskedInput":
        mi = typing.cast(device_pb2.SecAggMaskedInputRequest, msg)
        mi.masked_input = bytes(8 * 16)
    elif method == "SecAggUnmask":
        u = typing.cast(device_pb2.SecAggUnmaskRequest, msg)
        u.seed_shares.add(owner=1, share=rng.randbytes(16))
        u.key_shares.add(owner=2, share=rng.randbytes(16))
    elif method == "CreateToken":
        typing.cast(Any, msg).role = "viewer"
    elif method == "CreateEnrollmentToken":
        typing.cast(Any, msg).max_devices = 2
    elif method == "ReportStatus":
        r = typing.cast(device_pb2.ReportStatusRequest, msg)
        r.metrics["eval_loss"] = 0.5
    elif "metrics" in fields and alias == TASK:
        typing.cast(Any, msg).metrics["loss"] = 1.0


def _secure_round(fuzzer: Fuzzer, payload: bytes) -> None:
    """payload: the adversary's number, the stage (4: none), its request there."""
    adversary = payload[0] % 6 if payload else 0
    stage = payload[1] % 5 if len(payload) > 1 else 4
    fuzzer.world.secure_round(adversary, stage, payload[2:] if stage < 4 else None)


def _secure_round_seeds(fuzzer: Fuzzer) -> list[bytes]:
    """Device 0's honest request at each stage, and a round without an adversary."""
    record: dict[int, bytes] = {}
    fuzzer.world.secure_round(0, 4, None, record)
    return [bytes([0, 4])] + [bytes([0, stage]) + data for stage, data in record.items()]


def _advance(fuzzer: Fuzzer, payload: bytes) -> None:
    world = fuzzer.world
    world.clock.advance((payload[0] if payload else 1) * 0.5)
    try:
        world.service.tick()
    except Exception as exc:
        raise Crash("tick", "clock/advance", f"{type(exc).__name__}: {exc}",
                    f"advance {(payload[0] if payload else 1) * 0.5} s", exc) from exc


# -------------------------------------------------------------- conversion actions

#: Arguments of conversions that come from the receiver, not the wire, and their range.
_LOCAL_ARGUMENTS: dict[str, tuple[int, ...]] = {"ring_bits": (32, 64)}
_Param = tuple[str, Any]


def _convert_params(fn: Callable[..., object]) -> list[_Param] | None:
    """(name, type) per parameter, or None when one cannot be made from fuzz bytes."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        return None
    params: list[_Param] = []
    for name in inspect.signature(fn).parameters:
        hint = hints.get(name)
        if name in _LOCAL_ARGUMENTS or hint in (bytes, int):
            params.append((name, hint))
        elif isinstance(hint, type) and issubclass(hint, Message):
            params.append((name, hint))
        elif typing.get_origin(hint) is not None and typing.get_args(hint) and \
                isinstance(typing.get_args(hint)[0], type) and \
                issubclass(typing.get_args(hint)[0], Message):
            params.append((name, list[typing.get_args(hint)[0]]))  # type: ignore[misc]
        else:
            return None
    return params


def _argument(param: _Param, data: bytes) -> object:
    name, hint = param
    if name in _LOCAL_ARGUMENTS:
        choices = _LOCAL_ARGUMENTS[name]
        return choices[data[0] % len(choices)] if data else choices[0]
    if hint is bytes:
        return data
    if hint is int:
        return int.from_bytes(data[:8], "little", signed=True)
    origin: object = typing.get_origin(hint)
    if origin is list:
        cls = typing.get_args(hint)[0]
        return [cls.FromString(f) for f in frames(data)]
    return typing.cast(type[Message], hint).FromString(data)


def _convert_runner(name: str, fn: Callable[..., object], params: list[_Param]
                    ) -> Callable[[Fuzzer, bytes], None]:
    back = getattr(convert, name.replace("_from_", "_to_"), None)

    def run(fuzzer: Fuzzer, payload: bytes) -> None:
        parts = frames(payload) if len(params) > 1 else [payload]
        parts += [b""] * (len(params) - len(parts))
        try:
            args = [_argument(p, d) for p, d in zip(params, parts, strict=False)]
        except DecodeError:
            return  # not a message: the transport's business (the RPC actions cover it)
        reproducer = describe(args)
        try:
            value = fn(*args)
        except Exception as exc:
            code = status_for(exc)
            if code is None or code in CRASH_CODES:
                raise Crash("convert", f"convert/{name}", f"{type(exc).__name__}: {exc}",
                            reproducer, exc) from exc
            return
        if back is None or value is None:
            return
        try:
            wire = back(value)
            if not _fits(wire, params[0][1]):
                return  # the to-conversion makes a part of the message (plan privacy)
            again = fn(wire, *args[1:])
        except Exception as exc:
            raise Crash("round-trip", f"convert/{name}", f"{type(exc).__name__}: {exc}",
                        reproducer, exc) from exc
        if not _same(again, value):
            raise Crash("round-trip", f"convert/{name}",
                        f"changed: {value!r:.300} came back as {again!r:.300}", reproducer)
    return run


def _fits(wire: object, hint: object) -> bool:
    """Whether what a to-conversion made is what its from-conversion takes first."""
    if typing.get_origin(hint) is list:
        cls = typing.get_args(hint)[0]
        return isinstance(wire, list) and all(isinstance(w, cls) for w in wire)
    return isinstance(hint, type) and isinstance(wire, hint)


def _same(a: object, b: object) -> bool:
    try:
        import numpy as np
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return bool(np.array_equal(np.asarray(a), np.asarray(b)))
        return bool(a == b) or repr(a) == repr(b)  # NaN fields compare unequal to themselves
    except Exception:
        return False


def _convert_seeds(name: str) -> Callable[[Fuzzer], list[bytes]]:
    def seeds(fuzzer: Fuzzer) -> list[bytes]:
        spec = convert.task_spec_to_proto(secure_spec())
        model, local = convert.task_spec_to_proto_parts(plain_spec().model, plain_spec().local)
        by_name: dict[str, list[bytes]] = {
            "task_spec_from_proto": [spec.SerializeToString(),
                                     convert.task_spec_to_proto(plain_spec()).SerializeToString()],
            "plan_parts_from_proto": [frame(model.SerializeToString(),
                                            local.SerializeToString())],
            "tensor_info_from_proto": [common_pb2.TensorSpec(
                name="w", dtype=common_pb2.DTYPE_FLOAT32, shape=[4, 3]).SerializeToString()],
            "tensor_infos_from_proto": [frame(common_pb2.TensorSpec(
                name="w", dtype=common_pb2.DTYPE_FLOAT32, shape=[4, 3]).SerializeToString(),
                common_pb2.TensorSpec(name="b", dtype=common_pb2.DTYPE_INT64,
                                      shape=[3]).SerializeToString())],
            "secagg_plan_from_proto": [device_pb2.SecAggPlan(
                num_devices=5, neighbours=4, threshold=3, value_bits=20, ring_bits=32, clip=0.5,
                weight_cap=100, context=b"ctx", phase_timeout_ms=5000).SerializeToString()],
            "plan_privacy_from_proto": [device_pb2.GetPlanResponse(
                privacy=device_pb2.DevicePrivacy(
                    l2_clip_norm=1.0, local_noise_multiplier=1.1, local_max_grad_norm=1.0,
                    local_delta=1e-5, local_max_epsilon=8.0)).SerializeToString()],
            "ring_vector_from_bytes": [frame(bytes(16), b"\x00"), frame(bytes(16), b"\x01")],
            "attributes_from_proto": [common_pb2.DeviceAttributes(
                charging=True, population="p").SerializeToString()],
        }
        return by_name.get(name, [b""])
    return seeds
