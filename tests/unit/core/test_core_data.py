"""core.data: the synthetic and digits generators and the --data spec grammar."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from core.data.dataset import LocalDataset
from core.data.digits import (
    MAX_SHARDS,
    POOL_SIZE,
    _digits,
    digits_shard,
    digits_test_set,
    dirichlet_partition,
)
from core.data.spec import DataSpec, load_dataset, parse_data_spec, with_shard
from core.data.synthetic import synthetic_shard
from core.errors import DataSpecError


def assert_same(a: LocalDataset, b: LocalDataset) -> None:
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def assert_well_formed(data: LocalDataset, features: int) -> None:
    assert data.x_train.dtype == data.x_test.dtype == np.float32
    assert data.y_train.dtype == data.y_test.dtype == np.int64
    assert data.num_features == features and data.num_classes == 10
    for y in (data.y_train, data.y_test):
        assert ((0 <= y) & (y < 10)).all()


# -- synthetic --------------------------------------------------------------------------------

def test_a_synthetic_shard_is_deterministic() -> None:
    assert_same(synthetic_shard(alpha=1, beta=1, shard=3, num_shards=30),
                synthetic_shard(alpha=1, beta=1, shard=3, num_shards=30))


def test_a_synthetic_shard_does_not_depend_on_other_shards_being_generated() -> None:
    alone = synthetic_shard(alpha=1, beta=1, shard=7, num_shards=10, seed=2)
    for k in range(10):
        synthetic_shard(alpha=1, beta=1, shard=k, num_shards=10, seed=2)
    assert_same(alone, synthetic_shard(alpha=1, beta=1, shard=7, num_shards=10, seed=2))


def test_synthetic_shards_seeds_and_federation_sizes_differ() -> None:
    base = synthetic_shard(alpha=1, beta=1, shard=0, num_shards=10)
    for other in (synthetic_shard(alpha=1, beta=1, shard=1, num_shards=10),
                  synthetic_shard(alpha=1, beta=1, shard=0, num_shards=11),
                  synthetic_shard(alpha=1, beta=1, shard=0, num_shards=10, seed=1)):
        assert other.x_train.shape != base.x_train.shape or not np.array_equal(
            other.x_train, base.x_train)


def test_synthetic_shards_follow_the_fedprox_sizes_and_split() -> None:
    for k in range(20):
        data = synthetic_shard(alpha=0.5, beta=0.5, shard=k, num_shards=20)
        assert_well_formed(data, 60)
        n = len(data.y_train) + len(data.y_test)
        assert 50 <= n <= 20000
        assert len(data.y_test) == round(n * 0.1)


def test_synthetic_input_variance_decays_as_j_to_the_minus_1_2() -> None:
    # IID devices share v = 0, so pooled inputs have Sigma's diagonal as their variance.
    x = np.concatenate([synthetic_shard(alpha=0, beta=0, shard=k, num_shards=200, iid=True)
                        .x_train for k in range(200)])
    j = np.arange(1, 61)
    np.testing.assert_allclose(x.var(axis=0), j ** -1.2, rtol=0.15)


def test_iid_synthetic_devices_share_one_model_whatever_alpha_and_beta() -> None:
    # The shared W, b come from the seed alone and v = 0: alpha and beta do not matter.
    assert_same(synthetic_shard(alpha=0, beta=0, shard=1, num_shards=4, iid=True),
                synthetic_shard(alpha=3, beta=2, shard=1, num_shards=4, iid=True))
    x = np.concatenate([synthetic_shard(alpha=1, beta=1, shard=k, num_shards=50, iid=True)
                        .x_train for k in range(50)])
    assert np.abs(x.mean(axis=0)).max() < 0.1


def test_synthetic_rejects_a_shard_out_of_range() -> None:
    with pytest.raises(ValueError, match="shard 4 out of range for 4 shards"):
        synthetic_shard(alpha=1, beta=1, shard=4, num_shards=4)


# -- digits -----------------------------------------------------------------------------------

def test_the_digits_pool_and_test_set_sizes() -> None:
    x_pool, y_pool, x_test, y_test = _digits()
    assert len(y_pool) == POOL_SIZE and len(y_test) == 360 and MAX_SHARDS == POOL_SIZE // 2
    assert x_pool.shape == (POOL_SIZE, 64)
    assert 0.0 <= x_pool.min() and x_pool.max() <= 1.0


def test_the_stored_split_is_scikit_learns_stratified_split_of_its_digits() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_pool, x_test, y_pool, y_test = train_test_split(x, y, test_size=0.2, stratify=y,
                                                      random_state=0)
    for ours, theirs in zip(_digits(), (x_pool, y_pool, x_test, y_test), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_digits_load_without_importing_scikit_learn() -> None:
    """A device agent's start-up: the bundled file is read, scikit-learn is not imported."""
    code = ("import sys; from core.data.digits import digits_shard; "
            "digits_shard(shard=0, num_shards=4); print('sklearn' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"


def test_the_digits_test_set_is_held_out_and_stratified() -> None:
    test = digits_test_set()
    assert test.x_train.shape == (0, 64) and test.y_train.shape == (0,)
    assert_well_formed(test, 64)
    assert np.bincount(test.y_test, minlength=10).min() >= 35
    # Returned arrays are copies: the cached data cannot be changed through them.
    test.x_test[:] = -1.0
    assert digits_test_set().x_test.min() >= 0.0


@pytest.mark.parametrize(("num_shards", "alpha"), [(1, 0.5), (20, 0.5), (100, 0.05), (700, 0.1),
                                                   (MAX_SHARDS, 0.01), (10, 100.0)])
def test_the_dirichlet_split_covers_every_pool_sample_exactly_once(num_shards: int,
                                                                    alpha: float) -> None:
    shards = dirichlet_partition(num_shards=num_shards, alpha=alpha, seed=0)
    joined = np.concatenate(shards)
    assert len(shards) == num_shards
    assert np.array_equal(np.sort(joined), np.arange(POOL_SIZE))
    assert min(len(s) for s in shards) >= 2


def test_a_small_dirichlet_alpha_gives_devices_few_classes() -> None:
    _, y, _, _ = _digits()
    skewed = dirichlet_partition(num_shards=20, alpha=0.1, seed=0)
    even = dirichlet_partition(num_shards=20, alpha=1000.0, seed=0)
    assert np.median([len(np.unique(y[s])) for s in skewed]) <= 5
    assert min(len(np.unique(y[s])) for s in even) == 10


def test_the_dirichlet_split_depends_on_seed_and_alpha() -> None:
    a = dirichlet_partition(num_shards=10, alpha=0.5, seed=0)
    assert not np.array_equal(a[0], dirichlet_partition(num_shards=10, alpha=0.5, seed=1)[0])
    assert not np.array_equal(a[0], dirichlet_partition(num_shards=10, alpha=0.6, seed=0)[0])


def test_the_train_splits_of_all_digits_shards_cover_the_pool_exactly_once() -> None:
    x_pool, _, _, _ = _digits()
    shards = [digits_shard(shard=k, num_shards=8) for k in range(8)]
    rows = np.concatenate([np.concatenate([s.x_train, s.x_test]) for s in shards])
    assert len(rows) == POOL_SIZE
    # Each pool image appears once (compare whole rows, sorted).
    as_bytes = sorted(r.tobytes() for r in rows)
    assert as_bytes == sorted(r.tobytes() for r in x_pool)
    for s in shards:
        assert_well_formed(s, 64)
        assert len(s.y_train) >= 1


def test_a_digits_shard_is_deterministic_and_independent_of_other_shards() -> None:
    alone = digits_shard(shard=3, num_shards=10, dirichlet=0.3, seed=4)
    for k in range(10):
        digits_shard(shard=k, num_shards=10, dirichlet=0.3, seed=4)
    assert_same(alone, digits_shard(shard=3, num_shards=10, dirichlet=0.3, seed=4))


def test_a_digits_shard_holds_out_its_test_fraction_and_keeps_a_training_sample() -> None:
    data = digits_shard(shard=0, num_shards=4, test_fraction=0.25)
    n = len(data.y_train) + len(data.y_test)
    assert len(data.y_test) == round(n * 0.25)
    tiny = digits_shard(shard=0, num_shards=MAX_SHARDS, dirichlet=0.01, test_fraction=0.9)
    assert len(tiny.y_train) >= 1


def test_digits_rejects_more_shards_than_pairs_of_images() -> None:
    with pytest.raises(ValueError, match=f"1 to {MAX_SHARDS} shards"):
        digits_shard(shard=0, num_shards=MAX_SHARDS + 1)


# -- spec grammar -----------------------------------------------------------------------------

def test_a_spec_parses_into_source_and_params_and_prints_back() -> None:
    spec = parse_data_spec("digits:shard=3/20,dirichlet=0.5")
    assert spec == DataSpec("digits", {"shard": "3/20", "dirichlet": "0.5"})
    assert str(spec) == "digits:shard=3/20,dirichlet=0.5"
    assert parse_data_spec(" digits : shard = 1/2 ").params == {"shard": "1/2"}


def test_load_dataset_accepts_text_or_a_parsed_spec() -> None:
    text = "synthetic:alpha=1,beta=1,shard=2/5,seed=3"
    assert_same(load_dataset(text), load_dataset(parse_data_spec(text)))
    assert_same(load_dataset(text),
                synthetic_shard(alpha=1, beta=1, shard=2, num_shards=5, seed=3))


def test_the_synthetic_iid_flag_reaches_the_generator() -> None:
    assert_same(load_dataset("synthetic:alpha=1,beta=1,shard=0/3,iid=true"),
                synthetic_shard(alpha=1, beta=1, shard=0, num_shards=3, iid=True))


def test_digits_specs_load_shards_and_the_test_set() -> None:
    assert_same(load_dataset("digits:shard=1/4,dirichlet=0.3,seed=2"),
                digits_shard(shard=1, num_shards=4, dirichlet=0.3, seed=2))
    assert_same(load_dataset("digits:shard=1/4"), digits_shard(shard=1, num_shards=4))
    assert_same(load_dataset("digits:split=test"), digits_test_set())


def test_with_shard_replaces_or_adds_the_shard() -> None:
    spec = parse_data_spec("digits:shard=0/4,dirichlet=0.3")
    moved = with_shard(spec, 3, 8)
    assert moved.params == {"shard": "3/8", "dirichlet": "0.3"}
    assert spec.params["shard"] == "0/4"
    assert with_shard(DataSpec("synthetic", {"alpha": "1", "beta": "1"}), 1, 2).params[
        "shard"] == "1/2"


def test_with_shard_rejects_a_shard_out_of_range_or_a_spec_without_shards() -> None:
    with pytest.raises(DataSpecError, match="shard index 8 out of range for 8 shards"):
        with_shard(parse_data_spec("digits:shard=0/4"), 8, 8)
    with pytest.raises(DataSpecError, match="a split takes no shard"):
        with_shard(parse_data_spec("digits:split=test"), 0, 2)


@pytest.mark.parametrize(("text", "message"), [
    ("", "unknown source ''"),
    ("mnist:shard=0/2", "unknown source 'mnist' \\(expected one of .*digits, .*synthetic"),
    ("digits:shard=5/4", "shard index 5 out of range for 4 shards"),
    ("digits:shard=4/4", "shard index 4 out of range for 4 shards"),
    ("digits:shard=0/0", "shard count must be at least 1"),
    ("digits:shard=-1/4", "shard must look like K/N"),
    ("digits:shard=a/4", "shard must look like K/N"),
    ("digits:shard=3", "shard must look like K/N"),
    ("digits:shard=1/2/3", "shard must look like K/N"),
    ("digits", "shard=K/N is required"),
    ("digits:shard=0/719", "shard count 719 too large: digits has at most 718 shards"),
    ("digits:shard=1/4,dirichlet=-1", "dirichlet must be a finite number > 0"),
    ("digits:shard=1/4,dirichlet=0", "dirichlet must be a finite number > 0"),
    ("digits:shard=1/4,dirichlet=nan", "dirichlet must be a finite number > 0"),
    ("digits:shard=1/4,dirichlet=lots", "dirichlet must be a number, got 'lots'"),
    ("digits:shard=1/4,seed=-2", "seed must be a non-negative integer, got '-2'"),
    ("digits:shard=1/4,seed=1.5", "seed must be a non-negative integer"),
    ("digits:shard=1/4,seed=" + "9" * 5000, "seed must be a non-negative integer"),
    ("digits:shard=0/4,colour=red", "unknown key 'colour' for digits"),
    ("digits:split=train", "split must be 'test', got 'train'"),
    ("digits:split=test,seed=1", "unknown key 'seed' for digits:split=test"),
    ("digits:shard", "expected key=value, got 'shard'"),
    ("digits:shard=", "expected key=value, got 'shard='"),
    ("digits:=0/4", "expected key=value"),
    ("digits:shard=0/4,", "expected key=value, got ''"),
    ("digits:shard=0/4,shard=1/4", "shard given twice"),
    ("synthetic:alpha=1,shard=0/3", "beta is required"),
    ("synthetic:beta=1,shard=0/3", "alpha is required"),
    ("synthetic:alpha=1,beta=1", "shard=K/N is required"),
    ("synthetic:alpha=-0.5,beta=1,shard=0/3", "alpha must be a finite number >= 0"),
    ("synthetic:alpha=1,beta=inf,shard=0/3", "beta must be a finite number >= 0"),
    ("synthetic:alpha=1,beta=1,shard=0/3,iid=yes", "iid must be true or false, got 'yes'"),
    ("synthetic:alpha=1,beta=1,shard=0/3,dirichlet=1", "unknown key 'dirichlet' for synthetic"),
])
def test_every_bad_spec_fails_quoting_the_spec_and_naming_the_field(text: str,
                                                                    message: str) -> None:
    with pytest.raises(DataSpecError, match=message) as caught:
        load_dataset(text)
    assert str(caught.value).startswith(f"data spec {text!r}: ")


def test_the_documented_example_message_is_exact() -> None:
    with pytest.raises(DataSpecError) as caught:
        load_dataset("digits:shard=5/4")
    assert str(caught.value) == "data spec 'digits:shard=5/4': shard index 5 out of range for 4 shards"


def test_load_dataset_validates_a_hand_built_spec() -> None:
    with pytest.raises(DataSpecError, match="data spec 'digits:shard=9/3': shard index 9"):
        load_dataset(DataSpec("digits", {"shard": "9/3"}))


def test_parsing_a_spec_imports_no_generator_or_torch() -> None:
    code = ("import sys, core.data.spec, core.tensors, core.aggregation.fedavg;"
            "core.data.spec.parse_data_spec('digits:shard=0/2');"
            "core.data.spec.parse_data_spec('synthetic:alpha=1,beta=1,shard=0/2');"
            "heavy = {'torch', 'sklearn', 'safetensors'} & set(sys.modules);"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
