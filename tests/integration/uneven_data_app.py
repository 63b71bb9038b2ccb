"""An engineer's app for the integration tests: the data source ``uneven``, digits shards
where one device's examples are cut to 60 features (``narrow=K``), so one agent process can
host a device whose data does not fit a 64-feature task beside devices whose data does."""

from __future__ import annotations

from core.apps import App
from core.data import digits
from core.data.dataset import LocalDataset
from core.data.params import DataParams

NARROW_FEATURES = 60


def uneven(params: DataParams) -> LocalDataset:
    shard, shards = params.shard()
    narrow = params.integer("narrow")
    data = digits.digits_shard(shard=shard, num_shards=shards, dirichlet=0.5, seed=0)
    if shard != narrow:
        return data
    return LocalDataset(x_train=data.x_train[:, :NARROW_FEATURES], y_train=data.y_train,
                        x_test=data.x_test[:, :NARROW_FEATURES], y_test=data.y_test,
                        classes=data.classes)


app = App(data={"uneven": uneven})
