"""How far the summaries of a secure-aggregation round can be from the plaintext ones.

Secure aggregation quantizes each device's unit-scaled report (:meth:`EvaluationLayout.
to_unit` times a scale s, inside the quantizer's [-clip, clip]) with stochastic rounding
of step ``step``; every value moves by less than one step, so the sum of K survivors is off
by less than ``K step / s`` per unit coordinate, i.e. ``K step / s x bound_j`` in the
coordinate's own units (:func:`sum_error_bounds`). A mean is a ratio of two such sums, and
``|a'/b' - a/b| <= (e_a + |a/b| e_b) / (b - e_b)`` when ``|a' - a| <= e_a``,
``|b' - b| <= e_b < b`` (:func:`ratio_error_bound`).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from core.evaluation.layout import EvaluationLayout


def sum_error_bounds(layout: EvaluationLayout, *, devices: int, step: float, scale: float
                     ) -> npt.NDArray[np.float64]:
    """Per coordinate, the bound on |decoded sum - exact sum| of ``devices`` reports
    quantized with ``step`` after scaling the unit report by ``scale``."""
    return devices * (step / scale) * layout.bounds


def ratio_error_bound(num: float, den: float, num_error: float, den_error: float) -> float:
    """The bound on |num'/den' - num/den| given the errors of both; inf when ``den`` is
    within its error of 0."""
    if den - den_error <= 0:
        return math.inf
    return (num_error + abs(num / den) * den_error) / (den - den_error)


def mean_error_bounds(layout: EvaluationLayout, sums: npt.NDArray[np.floating],
                      errors: npt.NDArray[np.floating]) -> dict[str, float]:
    """``{round metric name: bound}`` for every example- and device-weighted mean
    (``eval.v<version>.<metric>.mean`` / ``.device_mean``), given the exact ``sums`` (or
    the decoded ones: the bound is then around them) and their ``errors``."""
    s = np.asarray(sums, dtype=np.float64)
    e = np.asarray(errors, dtype=np.float64)
    out = {}
    for version in layout.plan.versions:
        n_i = layout.index(version, "", "examples")
        k_i = layout.index(version, "", "devices")
        for m in layout.plan.metrics:
            w_i = layout.index(version, m.name, "wsum")
            d_i = layout.index(version, m.name, "sum")
            base = f"eval.v{version}.{m.name}"
            out[f"{base}.mean"] = ratio_error_bound(s[w_i], s[n_i], e[w_i], e[n_i])
            out[f"{base}.device_mean"] = ratio_error_bound(s[d_i], s[k_i], e[d_i], e[k_i])
    return out
