"""Noise for differential privacy: continuous Gaussian (central DP) and discrete Gaussian
shares in the integer ring (distributed DP), from an explicit :class:`NoiseSource`.

Randomness
----------
:meth:`NoiseSource.secure` draws every call's randomness from AES-256 in counter mode under
a fresh 256-bit key read from ``os.urandom`` (the OS CSPRNG). AES-CTR under a uniformly
random key is the construction of NIST SP 800-90A's CTR_DRBG: its output is
indistinguishable from uniform bits for anyone without the key, and the key never leaves the
call, so the source keeps no state between calls (safe across threads and ``fork``).
``numpy.random.Generator`` (PCG64) seeded from ``os.urandom`` would *not* do: PCG64 is
predictable from a few outputs, so whoever sees part of the noise could strip the rest.
Neither would torch's ``normal_`` under a generator seeded from ``os.urandom`` each step
(faster: ~4.6-7 ns a coordinate against ~12-15 hardened here, ``benchmarks/privacy.py --only
noise``): torch's CPU generator is MT19937, predictable from 624 outputs, and its
``manual_seed`` keeps only the seed's low 32 bits (seeds ``s`` and ``s + 2**32`` give the
same stream), a key space small enough to search.

:meth:`NoiseSource.seeded` is a reproducible PCG64 stream for simulations and tests only;
its ``is_secure`` is False, and production code calls :meth:`NoiseSource.require_secure`,
which raises :class:`~core.privacy.errors.InsecureNoiseError` for it (fail closed).

Gaussian samples
----------------
Uniforms are 53-bit floats in the open interval (0, 1) (``(w >> 11) + 0.5) * 2^-53``), so
``log`` never sees 0, and the Box-Muller transform turns pairs into two normals each: no
rejection loop, fully vectorized. Floating-point Gaussian noise is open to Mironov's (2012)
attack on the low-order bits of the noised result; by default (``hardened=True``) each
coordinate is the sum of two independent normals scaled by 1/sqrt(2), the mitigation of
Holohan and Braghin (2021) that Opacus's ``secure_mode`` also uses (about 2x the work).
:func:`fill_gaussian_` (local DP-SGD's per-step noise) does the same in float32 with torch's
vectorized math, a cache-sized chunk at a time, from 12 random bytes a coordinate (its
docstring says how the radius keeps the float64 tail). Where exactness matters more, use
distributed DP: its noise is integer-valued
(:func:`discrete_gaussian`) and added in the integer ring, where the attack does not apply.

Discrete Gaussian
-----------------
:func:`discrete_gaussian` is Canonne, Kamath and Steinke's (NeurIPS 2020) rejection sampler
(their Algorithm 3), vectorized: a discrete Laplace proposal with scale ``t = floor(sigma)+1``
(the difference of two geometric variables), accepted with probability
``exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2))``. Unlike their exact-arithmetic version, the
geometric variables and the acceptance test use float64, which perturbs individual
probabilities at the 2^-53 level; this is the trade-off TensorFlow Privacy's sampler makes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from core.privacy.errors import InsecureNoiseError

if TYPE_CHECKING:
    import torch

_TWO_POW_MINUS_53 = 2.0**-53


class NoiseSource:
    """Where noise randomness comes from: a CSPRNG (:meth:`secure`) or, for simulations only,
    a seeded stream (:meth:`seeded`). Build one with those class methods.

    A secure source is stateless and thread-safe; a seeded one is a single stream and not
    thread-safe (one per thread, or a lock)."""

    def __init__(self, *, _generator: np.random.Generator | None, _token: object,
                 _key: bytes | None = None) -> None:
        if _token is not _CONSTRUCTOR_TOKEN:
            raise TypeError("use NoiseSource.secure() or NoiseSource.seeded(seed)")
        self._generator = _generator
        self._key = _key

    @classmethod
    def secure(cls) -> NoiseSource:
        """AES-256-CTR keyed from ``os.urandom`` per call; the only source production may use."""
        return cls(_generator=None, _token=_CONSTRUCTOR_TOKEN)

    @classmethod
    def seeded(cls, seed: int) -> NoiseSource:
        """A reproducible PCG64 stream. **Simulations and tests only**: not a CSPRNG, and
        :meth:`require_secure` refuses it."""
        return cls(_generator=np.random.Generator(np.random.PCG64(seed)),
                   _token=_CONSTRUCTOR_TOKEN)

    @classmethod
    def _fixed_key_for_tests(cls, key: bytes) -> NoiseSource:
        """The secure source's AES-256-CTR path under a *known* 32-byte key, the same key
        on every call: **tests only** (the distribution of exactly what production draws, at
        a fixed seed). Not secure: :meth:`require_secure` refuses it."""
        if len(key) != 32:
            raise ValueError(f"key must be 32 bytes, got {len(key)}")
        return cls(_generator=None, _token=_CONSTRUCTOR_TOKEN, _key=bytes(key))

    @property
    def is_secure(self) -> bool:
        """True for :meth:`secure` sources, False for seeded ones."""
        return self._generator is None and self._key is None

    def require_secure(self, what: str) -> None:
        """Raises :class:`InsecureNoiseError` naming ``what`` if this source is seeded."""
        if not self.is_secure:
            raise InsecureNoiseError(
                f"{what} needs a cryptographically secure noise source, got a seeded one "
                f"(NoiseSource.seeded is for simulations only; use NoiseSource.secure())"
            )

    def random_words(self, count: int) -> npt.NDArray[np.uint64]:
        """``count`` independent uniform 64-bit words."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if self._generator is not None:
            return self._generator.integers(0, 2**64, size=count, dtype=np.uint64,
                                            endpoint=False)
        return np.frombuffer(_aes_ctr_bytes(8 * count, self._key), dtype=np.uint64)

    def _byte_stream(self) -> Callable[[bytearray, int], None]:
        """``write(buffer, count)`` overwrites ``buffer[:count]`` with the stream's next
        ``count`` random bytes (``buffer`` has room for 15 more, as AES-CTR's
        ``update_into`` wants): one AES-256-CTR keystream per stream, its key fresh from
        ``os.urandom``, for a secure source; the PCG64 stream for a seeded one. Not
        thread-safe: one stream per call."""
        generator = self._generator
        if generator is not None:
            def write_seeded(buffer: bytearray, count: int) -> None:
                buffer[:count] = generator.bytes(count)

            return write_seeded
        encryptor = _aes_ctr(self._key)

        def write_keystream(buffer: bytearray, count: int) -> None:
            # AES-CTR over zeros is the keystream itself.
            zeros = _zeros(count)
            if encryptor.update_into(zeros[:count], buffer) != count:
                raise RuntimeError("AES-CTR returned fewer bytes than asked for")

        return write_keystream

    def uniform(self, count: int) -> npt.NDArray[np.float64]:
        """``count`` uniforms in the open interval (0, 1), 53 bits each."""
        words = self.random_words(count)
        return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * _TWO_POW_MINUS_53

    def standard_normal(self, count: int) -> npt.NDArray[np.float64]:
        """``count`` independent N(0, 1) samples (Box-Muller over :meth:`uniform`)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        half = (count + 1) // 2
        u = self.uniform(2 * half)
        radius = np.log(u[:half])
        radius *= -2.0
        np.sqrt(radius, out=radius)
        angle = u[half:]
        angle *= 2.0 * math.pi
        out = np.empty(2 * half, dtype=np.float64)
        np.cos(angle, out=out[:half])
        np.sin(angle, out=out[half:])
        out[:half] *= radius
        out[half:] *= radius
        return out[:count]


_CONSTRUCTOR_TOKEN = object()


def _aes_ctr(key: bytes | None) -> Any:
    """An AES-256-CTR encryptor under ``key``, or under a fresh key from ``os.urandom``."""
    # Imported here: `cryptography` is only needed once noise is drawn.
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    return Cipher(algorithms.AES(key if key is not None else os.urandom(32)),
                  modes.CTR(bytes(16))).encryptor()


def _aes_ctr_bytes(count: int, key: bytes | None = None) -> memoryview:
    """``count`` bytes of AES-256-CTR keystream under ``key`` (default: a fresh key), in a
    writable buffer."""
    encryptor = _aes_ctr(key)
    buffer = bytearray(count + 15)  # update_into wants room for one block more
    written = encryptor.update_into(bytes(count), buffer)
    encryptor.finalize()
    return memoryview(buffer)[:written]


#: Coordinates :func:`fill_gaussian_` transforms per pass (its scratch: ~24 bytes a
#: coordinate, 1.5 MiB). Each pass costs ~15 torch ops, whose fixed cost dominated at
#: 2^12-2^14 coordinates on the 2-core machine (52 and 23 ns a coordinate, against 17 at
#: 2^16 and 2^17, ad-hoc runs); whole 1M-coordinate blocks in float64 per pass, as before,
#: spilled to memory and faulted fresh pages in on every call.
_CHUNK = 1 << 16
#: Random bytes per Box-Muller pair: 64 bits for the radius, 32 for the angle.
_PAIR_BYTES = 12
#: Zero bytes that AES-CTR encrypts into its keystream (immutable, shared by all threads).
_ZEROS = memoryview(bytes(_PAIR_BYTES * _CHUNK))


def _zeros(count: int) -> memoryview:
    return _ZEROS if count <= len(_ZEROS) else memoryview(bytes(count))


def gaussian_noise(shape: int | Sequence[int], *, stddev: float, source: NoiseSource,
                   hardened: bool = True) -> npt.NDArray[np.float64]:
    """N(0, stddev^2) noise of ``shape`` (float64). For central DP, ``stddev`` is
    ``noise_multiplier * l2_clip_norm`` and the noise is added once to the *sum* of clipped
    updates (before dividing by the number of reports).

    ``hardened`` sums two normals per coordinate (scaled by 1/sqrt(2)) against the
    floating-point attack; see the module docstring. The distribution is the same.

    Raises:
        ValueError: ``stddev`` negative or not finite.
    """
    if not (math.isfinite(stddev) and stddev >= 0):
        raise ValueError(f"stddev must be >= 0 and finite, got {stddev}")
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    count = math.prod(dims)
    if hardened:
        draws = source.standard_normal(2 * count)
        noise = draws[:count]
        noise += draws[count:]
        noise *= stddev / math.sqrt(2.0)
    else:
        noise = source.standard_normal(count)
        noise *= stddev
    return noise.reshape(dims)


def fill_gaussian_(out: torch.Tensor, *, stddev: float, source: NoiseSource,
                   hardened: bool = True) -> torch.Tensor:
    """Overwrites the float32 CPU tensor ``out`` with N(0, stddev^2) noise and returns it:
    :func:`gaussian_noise` for training loops that add noise every step (local DP-SGD).

    Same source and hardening (each coordinate the sum of two independent normals over
    sqrt(2)). Box-Muller in float32 with torch's vectorized math, ``_CHUNK`` coordinates a
    pass so that the scratch stays in cache: each pair ``(R, T)`` of a 64-bit word (the
    radius ``R = sqrt(-2 ln u)``, ``u`` in (0, 1] with 24 significant bits down to 2^-64, so
    the tail reaches 9.4 sigma as in float64) and a 32-bit word (the angle ``T``, uniform in
    [-pi, pi) to 2^-31) gives two independent normals ``R cos T`` and ``R sin T``. Hardened,
    coordinate ``k`` of a pass is ``(R_k cos T_k + R_{k+1} sin T_{k+1}) / sqrt(2)`` (indices
    mod the pass's length): every normal is used once and the two of a coordinate come from
    different pairs, i.e. from independent random words, as two separate draws would (a pass
    of one coordinate adds the two normals of one pair: independent too). A pass's keystream
    is its pairs' radius words, then their angle words.

    Cost: 12 random bytes and one pair's transform a coordinate, ~15 ns of CPU (medians of
    12 passes: 11-23) on the shared 2-core machine at load 4-11, of which ~2.5 ns is AES and
    ~6.5 ns the float32 log, sin and cos that every Box-Muller fill computes; the rest is ~10
    cheap passes and the fixed cost of ~15 torch ops a pass (``benchmarks/privacy.py --only
    noise``, ``benchmarks/results/privacy-2026-12-07b.jsonl``); unhardened, half. Writing a
    pass's keystream in two parts (8 bytes of scratch a pair, not 12) changed nothing
    measurable there; Marsaglia's polar method (no sin or cos, but a compaction of the
    accepted pairs) and the half-angle tangent (one tan for both) were slower in torch ops
    (ad-hoc runs).

    Raises:
        ValueError: ``stddev`` negative or not finite, or ``out`` not float32 contiguous.
    """
    import torch

    if not (math.isfinite(stddev) and stddev >= 0):
        raise ValueError(f"stddev must be >= 0 and finite, got {stddev}")
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor, got {out.dtype}")
    flat = out.view(-1)
    count = flat.numel()
    if count == 0:
        return out
    write = source._byte_stream()
    chunk = min(count, _CHUNK)
    raw = bytearray(_PAIR_BYTES * chunk + 16)
    radius = torch.empty(chunk, dtype=torch.float32)
    angle = torch.empty(chunk, dtype=torch.float32)
    sines = torch.empty(chunk, dtype=torch.float32)
    scale = stddev / math.sqrt(2.0) if hardened else stddev
    for first in range(0, count, chunk if hardened else 2 * chunk):
        size = min(count - first, chunk if hardened else 2 * chunk)
        pairs = size if hardened else (size + 1) // 2
        write(raw, _PAIR_BYTES * pairs)
        _radius_and_angle(raw, pairs, radius[:pairs], angle[:pairs], scale)
        r, t = radius[:pairs], angle[:pairs]
        if hardened:
            dest = flat[first:first + size]
            torch.cos(t, out=dest).mul_(r)
            s = torch.sin(t, out=sines[:pairs])
            dest[:-1].addcmul_(s[1:], r[1:])
            dest[-1:].addcmul_(s[:1], r[:1])
        else:
            torch.cos(t, out=flat[first:first + pairs]).mul_(r)
            rest = size - pairs
            torch.sin(t[:rest], out=flat[first + pairs:first + size]).mul_(r[:rest])
    return out


def _radius_and_angle(raw: bytearray, pairs: int, radius: torch.Tensor, angle: torch.Tensor,
                      scale: float) -> None:
    """``scale * sqrt(-2 ln u)`` into ``radius`` and ``T`` into ``angle`` from the first
    ``12 * pairs`` bytes of ``raw``: ``pairs`` 64-bit words then ``pairs`` 32-bit words."""
    import torch

    words = torch.frombuffer(raw, dtype=torch.int64, count=pairs)
    # |w| of a uniform int64 is uniform on [0, 2^63]; float32 keeps 24 significant bits at
    # every magnitude, so u = (|w| + 1/2) 2^-63 is never 0 and resolves the far tail.
    radius.copy_(words).abs_().add_(0.5).mul_(2.0**-63).log_().mul_(-2.0 * scale * scale)
    radius.sqrt_()
    angles = torch.frombuffer(raw, dtype=torch.int32, count=pairs, offset=8 * pairs)
    angle.copy_(angles).mul_(math.pi * 2.0**-31)


def add_gaussian_noise(total: npt.NDArray[np.floating], *, l2_clip_norm: float,
                       noise_multiplier: float, source: NoiseSource,
                       hardened: bool = True) -> npt.NDArray[np.float64]:
    """``total + N(0, (noise_multiplier * l2_clip_norm)^2)`` per coordinate, as float64:
    the Gaussian mechanism over a sum of updates each clipped to ``l2_clip_norm``. The input
    is not modified.

    Raises:
        ValueError: ``l2_clip_norm`` or ``noise_multiplier`` negative or not finite.
    """
    for name, value in (("l2_clip_norm", l2_clip_norm), ("noise_multiplier", noise_multiplier)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be >= 0 and finite, got {value}")
    noise = gaussian_noise(np.shape(total), stddev=noise_multiplier * l2_clip_norm,
                           source=source, hardened=hardened)
    noise += total
    return noise


def discrete_gaussian(shape: int | Sequence[int], *, variance: float, source: NoiseSource
                      ) -> npt.NDArray[np.int64]:
    """Samples of the discrete Gaussian N_Z(0, variance): P(x) proportional to
    ``exp(-x^2 / (2 variance))`` on the integers (the CKS sampler; see the module docstring).
    ``variance`` is the parameter sigma^2 (the true variance is slightly below it when
    sigma < 1, equal to it for practical purposes above). ``variance == 0`` gives zeros.

    Raises:
        ValueError: ``variance`` negative, not finite, or above 2^80 (int64 range).
    """
    if not (math.isfinite(variance) and 0 <= variance <= 2.0**80):
        raise ValueError(f"variance must be in [0, 2^80], got {variance}")
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    count = math.prod(dims)
    out = np.zeros(count, dtype=np.int64)
    if variance == 0 or count == 0:
        return out.reshape(dims)
    sigma = math.sqrt(variance)
    t = math.floor(sigma) + 1
    filled = 0
    while filled < count:
        # Acceptance is at least ~0.5 for every sigma (CKS, Section 5); 2x + 64 usually
        # fills in one pass.
        batch = 2 * (count - filled) + 64
        u = source.uniform(3 * batch)
        # Geometric(p = exp(-1/t)) by inversion; their difference is discrete Laplace(t).
        g1 = np.floor(-t * np.log(u[:batch]))
        g2 = np.floor(-t * np.log(u[batch:2 * batch]))
        y = g1 - g2
        accept = u[2 * batch:] < np.exp(-((np.abs(y) - variance / t) ** 2) / (2 * variance))
        taken = y[accept][:count - filled]
        out[filled:filled + taken.size] = taken.astype(np.int64)
        filled += taken.size
    return out.reshape(dims)
