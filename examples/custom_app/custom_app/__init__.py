"""An example fedcoord app: what an engineer writes to train their own model on their own
data with fedcoord. ``app`` bundles it; fedcoord finds it by ``--app custom_app:app`` or by
the entry points in this package's pyproject.toml."""

from __future__ import annotations

from custom_app.data import csv_rows
from custom_app.model import label_smoothed_loss, macro_f1, tabular_net
from fedcoord import App

app = App(
    models={"tabular_net": tabular_net},
    data={"csv_rows": csv_rows},
    loss=label_smoothed_loss,
    metrics=macro_f1,
)

__all__ = ["app"]
