"""Whether a model can be trained with DP-SGD (local DP), per Opacus's ``ModuleValidator``.

Here, not in the device agent, so that the coordinator refuses such a task at launch instead
of every device failing every round. Opacus (torch) is imported on first call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.privacy.errors import UnsupportedModelError

if TYPE_CHECKING:
    from torch import nn


def check_local_dp_model(model: nn.Module) -> None:
    """Refuses a model DP-SGD cannot train: layers without per-example gradients or that mix
    examples (BatchNorm).

    Raises:
        UnsupportedModelError: naming each offending layer, the reason, and the fix.
    """
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        reasons = "; ".join(str(error) for error in errors)
        raise UnsupportedModelError(
            f"the model cannot be trained with local DP: {reasons}. Fix: replace BatchNorm "
            f"with GroupNorm (opacus.validators.ModuleValidator.fix(model) does it) and "
            f"other unsupported layers with Opacus's DP equivalents")
