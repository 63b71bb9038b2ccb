"""Differential privacy building blocks: pure functions over numpy arrays, no network.

- :mod:`.clipping`          L2 clipping of a whole update
- :mod:`.noise`             CSPRNG noise source, Gaussian and discrete Gaussian noise
- :mod:`.central`           clipped sum + Gaussian noise on the coordinator (DP-FedAvg)
- :mod:`.distributed`       per-device discrete noise shares; dropouts and the noise floor
- :mod:`.accounting`        epsilon and noise calibration (Opacus RDP/PRV, dp-accounting)
- :mod:`.adaptive_clipping` quantile-tracking clip norm (Andrew et al. 2021)
- :mod:`.spec`              the task file's ``privacy`` section -> :class:`PrivacySpec`
- :mod:`.errors`            the error tree

Importing this package is cheap: Opacus (torch) and dp-accounting load on first accounting
call, ``cryptography`` on first secure draw.
"""

from core.privacy.accounting import (
    AccountingMethod,
    MechanismSteps,
    Sampling,
    calibrate_noise,
    epsilon,
    epsilon_of_history,
)
from core.privacy.adaptive_clipping import (
    clipped_bit,
    noisy_unclipped_fraction,
    update_clip_norm,
    update_noise_multiplier,
)
from core.privacy.central import ClippedSum
from core.privacy.clipping import clip_to_l2_norm, l2_norm
from core.privacy.distributed import (
    check_noise_floor,
    device_noise_share,
    device_noise_share_simulated,
    effective_noise_multiplier,
    min_reports_for_floor,
    received_epsilon,
)
from core.privacy.errors import (
    InsecureNoiseError,
    NoiseFloorError,
    PrivacyError,
    PrivacySpecError,
)
from core.privacy.noise import NoiseSource, add_gaussian_noise, discrete_gaussian, gaussian_noise
from core.privacy.spec import (
    AdaptiveClip,
    FixedClip,
    LocalDp,
    PrivacyMode,
    PrivacySpec,
    privacy_from_dict,
    privacy_to_dict,
)

__all__ = [
    "AccountingMethod", "AdaptiveClip", "ClippedSum", "FixedClip", "InsecureNoiseError",
    "LocalDp", "MechanismSteps", "NoiseFloorError", "NoiseSource", "PrivacyError",
    "PrivacyMode", "PrivacySpec", "PrivacySpecError", "Sampling", "add_gaussian_noise",
    "calibrate_noise", "check_noise_floor", "clip_to_l2_norm", "clipped_bit",
    "device_noise_share", "device_noise_share_simulated", "discrete_gaussian",
    "effective_noise_multiplier", "epsilon", "epsilon_of_history", "gaussian_noise", "l2_norm",
    "min_reports_for_floor", "noisy_unclipped_fraction", "privacy_from_dict",
    "privacy_to_dict", "received_epsilon", "update_clip_norm", "update_noise_multiplier",
]
