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
Where exactness matters more, use distributed DP: its noise is integer-valued
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
from collections.abc import Sequence
from typing import TYPE_CHECKING

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

    def __init__(self, *, _generator: np.random.Generator | None, _token: object) -> None:
        if _token is not _CONSTRUCTOR_TOKEN:
            raise TypeError("use NoiseSource.secure() or NoiseSource.seeded(seed)")
        self._generator = _generator

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

    @property
    def is_secure(self) -> bool:
        """True for :meth:`secure` sources, False for seeded ones."""
        return self._generator is None

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
        return np.frombuffer(_aes_ctr_bytes(8 * count), dtype=np.uint64)

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


def _aes_ctr_bytes(count: int) -> memoryview:
    """``count`` bytes of AES-256-CTR keystream under a fresh key, in a writable buffer."""
    # Imported here: `cryptography` is only needed once noise is drawn.
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
    buffer = bytearray(count + 15)  # update_into wants room for one block more
    written = encryptor.update_into(bytes(count), buffer)
    encryptor.finalize()
    return memoryview(buffer)[:written]


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

    Same source and hardening; the Box-Muller radius ``sqrt(-2 ln u)`` is computed in
    float64 from a 53-bit uniform (so its tail reaches 8.6 sigma, as in float64), the angle in
    float32 from a 24-bit uniform, with torch's vectorized math: about 11 ns per coordinate,
    hardened, against ~70 ns for the all-float64 numpy path (numpy's float64 ``cos`` is
    scalar), on a 2-core machine.

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
    if not hardened:
        _box_muller_float32(flat, source)
        return out.mul_(stddev)
    _box_muller_float32(flat, source)
    flat.add_(_box_muller_float32(torch.empty_like(flat), source))
    return out.mul_(stddev / math.sqrt(2.0)) if count else out


def _box_muller_float32(out: torch.Tensor, source: NoiseSource) -> torch.Tensor:
    import torch

    count = out.numel()
    half = (count + 1) // 2
    # Per pair of normals: one 64-bit word for the radius, 32 bits for the angle.
    words = torch.from_numpy(source.random_words(half + (half + 1) // 2).view(np.int64))
    radius = ((words[:half] >> 11) & ((1 << 53) - 1)).to(torch.float64)
    radius.add_(0.5).mul_(_TWO_POW_MINUS_53).log_().mul_(-2.0).sqrt_()
    angle_bits = words[half:].view(torch.int32)[:half]
    angle = ((angle_bits >> 8) & 0xFFFFFF).to(torch.float32)
    angle.add_(0.5).mul_(2.0 * math.pi * 2.0**-24)
    r32 = radius.to(torch.float32)
    pairs = torch.empty(2 * half, dtype=torch.float32)
    torch.cos(angle, out=pairs[:half]).mul_(r32)
    torch.sin(angle, out=pairs[half:]).mul_(r32)
    out.copy_(pairs[:count])
    return out


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
