"""Server-side evaluation of committed models on a data spec the task names (torch imported
lazily). Called by the commit worker, off the event loop. An app's model is evaluated with
the app's loss and metrics (:func:`core.models.model_hooks`), like on devices."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coordinator.rounds.errors import InvalidRequest
from core.errors import CoreError
from core.types import TaskSpec

#: An app's metrics kept per evaluation (round metrics are stored with the round).
MAX_APP_METRICS = 16
_METRIC_NAME_CHARS = 64


class ServerEvaluator:
    def check(self, spec: TaskSpec) -> None:
        """Loads the task's ``evaluation.server_data`` once, at launch: a spec whose fields
        are wrong, whose file is missing here, or that holds no evaluation examples would
        fail every evaluation, so it refuses the launch instead.

        Raises:
            InvalidRequest: naming ``spec.evaluation.server_data`` and what was wrong.
        """
        from core.data.spec import load_dataset

        try:
            data = load_dataset(spec.evaluation.server_data)
        except CoreError as exc:
            raise InvalidRequest(f"spec.evaluation.server_data: {exc}") from None
        if len(data.y_test) == 0:
            raise InvalidRequest(f"spec.evaluation.server_data: {spec.evaluation.server_data!r} "
                                 f"holds no evaluation examples (its test split is empty)")

    def evaluate(self, spec: TaskSpec, params: Mapping[str, np.ndarray]) -> dict[str, float]:
        """The round metrics of ``params`` on the task's server data: ``server_eval_loss``
        (the app's loss when it has one, else cross-entropy), ``server_eval_accuracy`` and
        ``server_eval_NAME`` for each of the app's metrics (at most 16; a name that would
        replace one of the first two is skipped).

        Raises:
            Exception: whatever loading the data or the model's code raises; the commit
                worker logs it, and the commit stands.
        """
        from core.data.spec import load_dataset
        from core.models import build_model, load_numpy_state, model_hooks
        from core.training import evaluate, evaluate_metrics

        data = load_dataset(spec.evaluation.server_data)
        model = build_model(spec.model)
        load_numpy_state(model, params)
        hooks = model_hooks(spec.model.architecture)
        loss, accuracy = evaluate(model, data.x_test, data.y_test, loss=hooks.loss)
        metrics = {"server_eval_loss": loss, "server_eval_accuracy": accuracy}
        if hooks.metrics is not None:
            extra = evaluate_metrics(model, data.x_test, data.y_test, hooks.metrics)
            for name, value in list(extra.items())[:MAX_APP_METRICS]:
                metrics.setdefault(f"server_eval_{name}"[:_METRIC_NAME_CHARS], value)
        return metrics
