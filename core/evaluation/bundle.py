"""The evaluation bundle: an evaluation task's model file. One safetensors file holds the
tensors of every model version under evaluation (names prefixed ``v<version>/``) and the
:class:`~core.evaluation.plan.EvaluationPlan` as JSON in its metadata, so devices download
one file whose sha256 the device plan already carries: what is evaluated and how it is
reported are bound to that hash (and, under secure aggregation, to the configuration hash
that devices compare with each other).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import numpy as np

from core.errors import TensorFormatError
from core.evaluation.plan import EvaluationPlan

#: The metadata key of the plan in a bundle.
PLAN_KEY = "fedcoord.evaluation_plan"
_PREFIX = re.compile(r"v(\d+)/(.+)")


def bundle_tensors(versions: Mapping[int, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One state dict holding each version's tensors under ``v<version>/<name>``."""
    return {f"v{version}/{name}": array for version, params in versions.items()
            for name, array in params.items()}


def split_bundle(tensors: Mapping[str, np.ndarray], plan: EvaluationPlan
                 ) -> dict[int, dict[str, np.ndarray]]:
    """Each version's state dict, for every version of ``plan``.

    Raises:
        TensorFormatError: a tensor without a version prefix, or a version of the plan
            without tensors.
    """
    out: dict[int, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        match = _PREFIX.fullmatch(key)
        if match is None:
            raise TensorFormatError(f"evaluation bundle tensor {key[:80]!r} has no version "
                                    f"prefix")
        out.setdefault(int(match.group(1)), {})[match.group(2)] = array
    missing = [v for v in plan.versions if v not in out]
    if missing:
        raise TensorFormatError(f"the evaluation bundle holds no tensors of version(s) "
                                f"{missing}")
    return {v: out[v] for v in plan.versions}


def bundle_metadata(plan: EvaluationPlan) -> dict[str, str]:
    return {PLAN_KEY: plan.to_json()}


def read_plan(data: bytes) -> EvaluationPlan | None:
    """The plan in a safetensors file's metadata; None when the file is not a bundle.

    Raises:
        TensorFormatError: the header is unreadable, or the plan in it is not valid.
    """
    if len(data) < 8:
        raise TensorFormatError("not a safetensors file: shorter than its header size")
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + size])
    except (ValueError, UnicodeDecodeError):
        raise TensorFormatError("not a safetensors file: its header is not JSON") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or PLAN_KEY not in metadata:
        return None
    try:
        return EvaluationPlan.from_json(str(metadata[PLAN_KEY]))
    except ValueError as exc:
        raise TensorFormatError(f"the evaluation bundle's plan: {exc}") from None
