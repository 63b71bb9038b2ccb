"""An app for the asynchronous integration test: logistic regression whose every training
step sleeps ``$FEDCOORD_TEST_STEP_S`` seconds (read when the model is built), so agent
processes started with different values train at different speeds. Evaluation never sleeps,
and the coordinator (without the variable) never does."""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from core.apps import App

STEP_ENV = "FEDCOORD_TEST_STEP_S"


class _SleepyLogisticRegression(nn.Module):
    def __init__(self, input_dim: int, num_classes: int, step_s: float) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dim, num_classes)
        self.step_s = step_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.step_s > 0:
            time.sleep(self.step_s)
        out: torch.Tensor = self.linear(x)
        return out


def sleepy_logistic_regression(input_dim: int = 64, num_classes: int = 10) -> nn.Module:
    return _SleepyLogisticRegression(input_dim, num_classes,
                                     float(os.environ.get(STEP_ENV, "0")))


app = App(models={"sleepy_logistic_regression": sleepy_logistic_regression})
