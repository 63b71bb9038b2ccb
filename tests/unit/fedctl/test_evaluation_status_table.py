"""fedctl task status's table of evaluation results: per version and metric, the means, the
quantiles of the examples' values with their rank-error bound (clear reports), and the
quantiles and histogram of device values."""

from __future__ import annotations

import io

from rich.console import Console

from fedctl.main import _evaluation_table
from protos.fedcoord.v1 import admin_pb2


def render(metrics: dict[str, float]) -> str:
    out = io.StringIO()
    Console(file=out, width=400).print(_evaluation_table(
        [admin_pb2.Round(round_number=1, state="committed", metrics=metrics)]))
    return out.getvalue()


def test_the_table_shows_example_quantiles_with_their_rank_error_beside_device_ones() -> None:
    text = render({"eval.v3.devices": 5, "eval.v3.examples": 900,
                   "eval.v3.loss.mean": 0.71, "eval.v3.loss.se": 0.05,
                   "eval.v3.loss.example_q10": 0.05, "eval.v3.loss.example_q50": 0.42,
                   "eval.v3.loss.example_q90": 1.9, "eval.v3.loss.example_rank_error": 0.0123,
                   "eval.v3.loss.q50": 0.66, "eval.v3.loss.bin0": 2, "eval.v3.loss.bin1": 3})
    assert "quantiles of examples (rank error)" in text
    assert "10%: 0.05  50%: 0.42  90%: 1.9 (±1.2%)" in text
    assert "50%: 0.66" in text  # the device values' quantile, in its own column


def test_without_sketches_the_example_quantiles_are_a_dash() -> None:
    text = render({"eval.v0.devices": 4, "eval.v0.examples": 100, "eval.v0.loss.mean": 1.0,
                   "eval.v0.loss.q50": 0.9})
    row = next(line for line in text.splitlines() if "loss" in line)
    assert " - " in row and "50%: 0.9" in row and "±" not in row
