"""The coordinator's settings: one frozen object from the command line (or a test) to every
part that needs one of them. Times are in seconds, sizes in bytes.

The composition root (:mod:`coordinator.app`) reads where to store and serve; the round service
reads the round limits; the device servicer reads the upload idle timeout.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from core.security.ratelimit import Rate


class EnrollmentPolicy(enum.Enum):
    #: Any key enrolls (simulations, demos, closed networks).
    OPEN = "open"
    #: A key enrolls with an enrollment token (``fedctl devices enroll --count N``).
    TOKEN = "token"
    #: Only the keys (or device ids) listed in a file enroll.
    ALLOW_LIST = "allow-list"


@dataclass(frozen=True)
class OidcSettings:
    """JWTs of one issuer, verified against its JWKS (a file: the coordinator fetches
    nothing), with the role in ``role_claim``."""

    issuer: str
    audience: str
    jwks_file: Path
    role_claim: str = "fedcoord_role"


@dataclass(frozen=True)
class SecuritySettings:
    enrollment: EnrollmentPolicy = EnrollmentPolicy.OPEN
    #: The allow-list policy's file: one Ed25519 public key (64 hex digits) or device id
    #: (``dk-...``) per line; ``#`` starts a comment.
    allow_list: Path | None = None
    #: ``module:function`` called for every new enrollment (see coordinator.security.devices).
    attestation_hook: str | None = None
    #: A device proof's timestamp may differ from the coordinator's clock by this much.
    proof_window_s: float = 60.0
    checkin_per_device: Rate = field(default_factory=lambda: Rate(per_second=5.0, burst=20))
    checkin_per_peer: Rate = field(default_factory=lambda: Rate(per_second=1000.0, burst=2000))
    enroll_per_peer: Rate = field(default_factory=lambda: Rate(per_second=20.0, burst=200))
    #: Uploads and downloads in flight from one peer address at a time.
    max_streams_per_peer: int = 64
    oidc: OidcSettings | None = None
    #: False (``serve --no-device-auth``, loopback hosts only): check-ins are taken at their
    #: word, with no key, proof or enrollment -- to measure what authentication costs, never
    #: to serve devices. Admin calls are always authenticated.
    authenticate_devices: bool = True


@dataclass(frozen=True)
class ReplicaSettings:
    """One replica of several coordinator processes on one database
    (:mod:`coordinator.replication`): it serves as a standby until it holds the leader lease.
    """

    #: A leader's lease outlives its last renewal by this long: a killed leader is replaced
    #: after at most about this much (renewals come every third of it).
    lease_ttl_s: float = 3.0
    #: The address devices and operators are told to use for this replica when it leads
    #: (``HOST:PORT``); None: the bound host and port.
    advertise_address: str | None = None


@dataclass(frozen=True)
class CoordinatorSettings:
    #: SQLAlchemy URL of the round store (``sqlite:///file.db`` or ``postgresql://...``).
    db_url: str = "sqlite:///fedcoord.db"
    #: Folder of model files and upload spools.
    store_dir: Path = Path("fedcoord-store")
    host: str = "127.0.0.1"
    port: int = 7070
    #: Largest chunk of an upload or download message.
    max_chunk_bytes: int = 1 << 20
    #: An upload stream silent for this long is dropped.
    upload_idle_timeout_s: float = 30.0
    #: Seeded selection (tests, simulations). None: a CSPRNG.
    seed: int | None = None
    #: Bounds of every "come back after" the devices are told.
    retry_after_min_s: float = 0.2
    retry_after_max_s: float = 5.0
    #: Pace steering (:mod:`coordinator.rounds.pacing`): the most "come back after" returns
    #: promised per second; a larger population waits about population / rate, at most 60 s
    #: (so rate x 60 should exceed the population); 0: off. Set it to well under what one
    #: process answers: devices in a selection window come back on top of it.
    checkin_pace_per_s: float = 200.0
    #: A task fails after this many failed attempts in a row.
    max_failed_attempts: int = 20
    #: Launch checks compare a task with the data schemas its population reported at
    #: check-in over this many seconds (coordinator.rounds.schemas).
    schema_window_s: float = 600.0
    max_num_examples: int = 1 << 31
    #: Tests and simulations only: accept a seeded (reproducible, *insecure*) noise source
    #: for differential privacy. Production keeps False, and the service then refuses any
    #: source but :meth:`core.privacy.noise.NoiseSource.secure`.
    allow_seeded_noise: bool = False
    #: Commits (server optimizer, model file, server-side evaluation) run on a worker thread
    #: so RPCs never wait on them; False runs them in line (deterministic unit tests).
    commit_in_background: bool = False
    #: Transport security. ``tls_dir`` holds ``server.crt`` and ``server.key`` (None:
    #: plaintext, which only a loopback host may serve unless ``insecure``); ``client_ca``
    #: turns on mutual TLS: every caller must present a certificate it signed.
    tls_dir: Path | None = None
    client_ca: Path | None = None
    insecure: bool = False
    #: Device enrollment, admin credentials, rate limits (coordinator.security).
    security: SecuritySettings = field(default_factory=SecuritySettings)
    #: Where events go besides the database (:mod:`coordinator.observability.sinks`):
    #: ``kafka://BROKER[,BROKER...]/TOPIC``.
    event_sinks: tuple[str, ...] = ()
    #: The HTTP side port (metrics, health, dashboard); None: off.
    http_port: int | None = None
    #: Run as one replica of several on one database (None: the only coordinator of its
    #: database, leading from the start).
    replica: ReplicaSettings | None = None
    #: Aggregator shards (``fedctl aggregator serve``) the uploads of sharded tasks go to
    #: (:mod:`coordinator.rounds.shards`); empty: every upload comes here.
    shards: ShardSettings | None = None


@dataclass(frozen=True)
class ShardSettings:
    """The aggregator shards of a coordinator (:mod:`coordinator.rounds.shards`)."""

    #: ``HOST:PORT`` of each shard, as devices reach them; a device is assigned one at
    #: selection, and its upload tickets name the shard by its index here.
    addresses: tuple[str, ...]
    #: The master key (:data:`core.shards.KEY_BYTES` bytes; ``--shard-key-file``): shard
    #: I's tickets and the calls to it are signed with its key derived from this one
    #: (:func:`core.shards.derive_shard_key`), which is all that shard holds.
    key: bytes
    #: CA the shards' TLS certificates are checked against (None: plaintext, loopback only).
    tls_ca: Path | None = None
    #: A shard that answers no call this long is dead: its group of the round is lost.
    call_timeout_s: float = 10.0
    #: How long collecting one shard's partial sum may take (the adds still in flight
    #: there, then the sum streamed: 800 MB for a 100M-parameter model).
    collect_timeout_s: float = 120.0
