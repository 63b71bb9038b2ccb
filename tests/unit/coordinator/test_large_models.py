"""Large models (issue 17): a model version is written straight from its arrays (no copy of
the file in memory; one too large for the download cache is read back and downloaded like any
other), and a commit reads the round's mean update in place: memory per round is a small
multiple of the model, whatever the number of devices."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from coordinator.rounds.commits import CommitJob, CommitOutcome, run_commit
from coordinator.rounds.models import ModelRepository, RecentModelBytes
from coordinator.storage import FileBlobStore, InMemoryStore
from core.aggregation.server_optimizers import apply_server_optimizer
from core.tensors import load_safetensors
from core.types import ModelSpec, ServerOptimizer, ServerOptimizerKind, TaskSpec

#: A "large" model for tests: 8 MiB of float32, over the 1 MiB item limit of the cache below.
ROWS, COLS = 1024, 2048
MODEL_BYTES = (ROWS * COLS + COLS) * 4


def params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((ROWS, COLS), dtype=np.float32),
            "b": np.zeros(COLS, np.float32)}


def repository(tmp_path: Path) -> ModelRepository:
    recent = RecentModelBytes(max_bytes=4 << 20, max_item_bytes=1 << 20)
    return ModelRepository(InMemoryStore(), FileBlobStore(tmp_path / "store"), recent)


def traced_peak(work: Callable[[], object]) -> int:
    """Bytes of Python and numpy memory allocated at the peak of ``work()``, beyond what
    was allocated before."""
    tracemalloc.start()
    try:
        work()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_a_version_too_large_for_the_cache_is_written_whole_and_reads_back(
        tmp_path: Path) -> None:
    models = repository(tmp_path)
    state = params()
    record = models.write("t", 1, 1, state, {"w/momentum": state["w"]}, now=0.0)

    data = (tmp_path / "store" / record.path).read_bytes()
    assert record.size_bytes == len(data) > MODEL_BYTES
    loaded = models.load(record)  # checks the recorded sha256 against the file
    for name, value in state.items():
        np.testing.assert_array_equal(loaded.params[name], value)
    assert loaded.optimizer_state is not None
    np.testing.assert_array_equal(loaded.optimizer_state["w/momentum"], state["w"])
    assert load_safetensors(data).keys() == state.keys()
    assert models.recent.size_bytes == 0  # never held in memory for downloads
    assert b"".join(models.chunks(record, 1 << 20)) == data  # streamed from the file


def test_writing_a_large_version_makes_no_copy_of_it_in_memory(tmp_path: Path) -> None:
    models = repository(tmp_path)
    state = params()

    peak = traced_peak(lambda: models.write("t", 1, 1, state, state, now=0.0))

    # Building the file in memory first held two copies of it (16 MiB here).
    assert peak < MODEL_BYTES // 2, f"peak {peak / 2**20:.1f} MiB"


def test_a_small_version_is_still_kept_for_downloads(tmp_path: Path) -> None:
    models = repository(tmp_path)
    record = models.write("t", 1, 1, {"w": np.ones(100, np.float32)}, None, now=0.0)
    assert models.recent.get(record.path, record.sha256) == (
        tmp_path / "store" / record.path).read_bytes()


@pytest.mark.parametrize(("kind", "copies"), [("fedavg", 1.5), ("fedadam", 3.5)])
def test_a_commit_makes_no_copy_of_the_mean_and_writes_the_file_without_one(
        tmp_path: Path, kind: str, copies: float) -> None:
    models = repository(tmp_path)
    state = params()
    record, base = models.initial("t", state, now=0.0)
    spec = TaskSpec(name="big", model=ModelSpec("mlp", {"input_dim": ROWS, "hidden": [],
                                                        "num_classes": COLS}),
                    rounds=1, clients_per_round=1, min_reports=1,
                    server=ServerOptimizer(kind=ServerOptimizerKind(kind), learning_rate=1.0))
    mean = np.full(ROWS * COLS + COLS, 1e-3, np.float32)
    # torch's first use allocates far more than this model (imports, kernels): not traced.
    apply_server_optimizer({"x": np.zeros(2, np.float32)}, {"x": np.ones(2, np.float32)},
                           spec.server, None)

    outcomes: list[CommitOutcome] = []
    peak = traced_peak(lambda: outcomes.append(run_commit(
        CommitJob("t", spec, base, mean, 1, 0.0), models, NoEvaluation())))

    assert outcomes[0].model is not None, outcomes[0].error
    # numpy memory at the peak (1.0 and 3.0 models): the pseudo-gradient (FedAdam: and its
    # two moments); the delta is views of the mean, the new parameters are the optimizer's
    # own tensors, and the file is written from them. It was 3.0 and 7.0 when the mean was
    # copied to bytes and back, the parameters copied out of torch and the file built in
    # memory. (torch's own memory is not traced either way.)
    assert peak < copies * MODEL_BYTES, f"peak {peak / MODEL_BYTES:.2f} x the model"


class NoEvaluation:
    def evaluate(self, spec: TaskSpec, params: dict[str, np.ndarray]) -> dict[str, float]:
        return {}
