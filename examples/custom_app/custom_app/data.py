"""The data source: one device's rows of a CSV file.

The file has a header row; the last column (or ``label=NAME``) is the integer class, every
other column a feature. A spec reads ``csv_rows:path=FILE,shard=K/N[,test_fraction=F]
[,classes=C][,label=NAME]``: device K of N gets every row whose ``user`` column (if the file
has one; else the row number) falls in its share, so devices hold different users' data.
``csv_rows:path=FILE,holdout=true`` is every row as evaluation data (the coordinator's
``evaluation.server_data``, and a simulation's test set).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from fedcoord import DataParams, LocalDataset, split_local


def csv_rows(params: DataParams) -> LocalDataset:
    path = Path(os.path.expanduser(params.text("path")))
    holdout = params.flag("holdout", default=False)
    shard, num_shards = (0, 1) if holdout else params.shard()
    test_fraction = params.number("test_fraction", default=0.2)
    label_name = params.text("label", default="")
    classes = params.integer("classes", default=0)
    if not 0 <= test_fraction < 1:
        params.fail(f"test_fraction must be in [0, 1), got {test_fraction}")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        params.fail(f"path: cannot read {str(path)!r}: {exc.strerror or exc}")
    if len(rows) < 2:
        params.fail(f"path: {str(path)!r} needs a header row and at least one data row")
    header, body = rows[0], rows[1:]
    label_column = header.index(label_name) if label_name in header else len(header) - 1
    if label_name and label_name not in header:
        params.fail(f"label: no column {label_name!r} in {str(path)!r} (columns: {header})")
    user_column = header.index("user") if "user" in header else None
    try:
        table = np.array(body, dtype=np.float64)
    except ValueError:
        params.fail(f"path: {str(path)!r} has a value that is not a number")
    users = table[:, user_column] if user_column is not None else np.arange(len(table))
    mine = np.isin(users, np.unique(users)[shard::num_shards])
    feature_columns = [i for i in range(len(header)) if i not in (label_column, user_column)]
    x = table[mine][:, feature_columns].astype(np.float32)
    y = table[mine][:, label_column].astype(np.int64)
    if len(y) == 0:
        params.fail(f"shard {shard}/{num_shards} of {str(path)!r} has no rows")
    num_classes = classes or int(table[:, label_column].max()) + 1
    if holdout:
        return LocalDataset(x_train=x[:0], y_train=y[:0], x_test=x, y_test=y,
                            classes=num_classes)
    rng = np.random.default_rng(shard)
    return split_local(x, y, test_fraction=test_fraction, rng=rng, classes=num_classes)
