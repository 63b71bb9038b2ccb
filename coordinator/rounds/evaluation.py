"""Server-side evaluation of committed models on a data spec the task names (torch imported
lazily). Called by the commit worker, off the event loop."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coordinator.rounds.errors import InvalidRequest
from core.errors import CoreError
from core.types import TaskSpec


class ServerEvaluator:
    def check(self, spec: TaskSpec) -> None:
        """Raises InvalidRequest when the task's ``evaluation.server_data`` is not a data spec."""
        from core.data.spec import parse_data_spec

        try:
            parse_data_spec(spec.evaluation.server_data)
        except CoreError as exc:
            raise InvalidRequest(f"spec.evaluation.server_data: {exc}") from None

    def evaluate(self, spec: TaskSpec, params: Mapping[str, np.ndarray]) -> tuple[float, float]:
        """(loss, accuracy) of ``params`` on the task's server data."""
        from core.data.spec import load_dataset
        from core.models import build_model, load_numpy_state
        from core.training import evaluate

        data = load_dataset(spec.evaluation.server_data)
        model = build_model(spec.model)
        load_numpy_state(model, params)
        return evaluate(model, data.x_test, data.y_test)
