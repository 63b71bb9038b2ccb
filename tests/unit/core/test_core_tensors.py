"""core.tensors: raw buffers and safetensors files, both lossless and pickle-free."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from core.errors import CoreError, TensorFormatError
from core.tensors import (
    TensorInfo,
    from_raw_bytes,
    load_safetensors,
    numpy_dtype,
    save_safetensors,
    sha256_hex,
    tensor_infos,
    to_raw_bytes,
    write_safetensors,
)

DTYPES = ["float32", "float64", "float16", "int32", "int64"]

arrays = st.sampled_from(DTYPES).flatmap(
    lambda name: hnp.arrays(
        st.sampled_from([np.dtype(name), np.dtype(name).newbyteorder(">")]),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    )
)
# Names in an order safetensors would not keep: it sorts them.
states = st.lists(arrays, min_size=1, max_size=5).map(
    lambda values: {f"layer{len(values) - i}.weight": v for i, v in enumerate(values)}
)


def assert_same_state(decoded: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> None:
    assert list(decoded) == list(state)
    for name, value in state.items():
        assert decoded[name].shape == value.shape
        assert decoded[name].dtype.newbyteorder("<") == value.dtype.newbyteorder("<")
        np.testing.assert_array_equal(decoded[name], value)


@settings(max_examples=60, deadline=None)
@given(states)
def test_raw_bytes_round_trip_exactly_in_mapping_order(state: dict[str, np.ndarray]) -> None:
    decoded = from_raw_bytes(to_raw_bytes(state), tensor_infos(state))
    assert_same_state(decoded, state)


@settings(max_examples=60, deadline=None)
@given(states)
def test_safetensors_round_trip_exactly_in_the_saved_order(state: dict[str, np.ndarray]) -> None:
    assert_same_state(load_safetensors(save_safetensors(state)), state)


@settings(max_examples=40, deadline=None)
@given(states)
def test_write_safetensors_writes_the_file_save_safetensors_makes(
    state: dict[str, np.ndarray],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(b"an older file, longer than the new one" * 100)
        write_safetensors(state, path, {"task_id": "t"})
        written, made = path.read_bytes(), save_safetensors(state, {"task_id": "t"})
    # The same header (safetensors writes the metadata's entries in no fixed order) and
    # the same data after it.
    assert len(written) == len(made)
    assert split_safetensors(written) == split_safetensors(made)
    assert_same_state(load_safetensors(written), state)


def split_safetensors(data: bytes) -> tuple[dict[str, object], bytes]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]), data[8 + size:]


@settings(max_examples=30, deadline=None)
@given(states)
def test_raw_bytes_are_little_endian_c_order_back_to_back(state: dict[str, np.ndarray]) -> None:
    expected = b"".join(np.ascontiguousarray(v.astype(v.dtype.newbyteorder("<"))).tobytes()
                        for v in state.values())
    assert to_raw_bytes(state) == expected
    assert len(expected) == sum(info.nbytes for info in tensor_infos(state))


def test_raw_bytes_of_a_transposed_array_are_in_c_order() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3).T
    decoded = from_raw_bytes(to_raw_bytes({"a": a}), tensor_infos({"a": a}))
    np.testing.assert_array_equal(decoded["a"], a)


def test_tensor_info_counts_elements_and_bytes() -> None:
    assert TensorInfo("w", "float32", (3, 4)).numel == 12
    assert TensorInfo("w", "float32", (3, 4)).nbytes == 48
    assert TensorInfo("s", "int64", ()).numel == 1
    assert TensorInfo("e", "float16", (0, 5)).nbytes == 0


def test_tensor_infos_describe_each_array_in_mapping_order() -> None:
    state: dict[str, np.ndarray] = {"b": np.zeros((2, 3), np.float64),
                                    "a": np.zeros((), np.int32)}
    assert tensor_infos(state) == [TensorInfo("b", "float64", (2, 3)),
                                   TensorInfo("a", "int32", ())]


@pytest.mark.parametrize("name", DTYPES)
def test_numpy_dtype_is_little_endian(name: str) -> None:
    assert numpy_dtype(name).str[0] == "<"  # explicit, on any host
    assert numpy_dtype(name) == np.dtype(name).newbyteorder("<")


def test_numpy_dtype_rejects_an_unknown_name() -> None:
    with pytest.raises(TensorFormatError, match="unknown dtype 'bfloat16'"):
        numpy_dtype("bfloat16")


def test_tensor_infos_reject_an_unsupported_dtype() -> None:
    with pytest.raises(TensorFormatError, match="unsupported dtype"):
        tensor_infos({"mask": np.zeros(3, dtype=bool)})


def test_from_raw_bytes_rejects_a_buffer_one_byte_short() -> None:
    state = {"a": np.zeros(3, np.float32)}
    with pytest.raises(TensorFormatError, match="11 bytes, tensors need 12"):
        from_raw_bytes(to_raw_bytes(state)[:-1], tensor_infos(state))


def test_from_raw_bytes_rejects_a_buffer_one_byte_long() -> None:
    state = {"a": np.zeros(3, np.float32)}
    with pytest.raises(TensorFormatError, match="13 bytes, tensors need 12"):
        from_raw_bytes(to_raw_bytes(state) + b"\0", tensor_infos(state))


def test_from_raw_bytes_rejects_an_unknown_dtype_in_the_description() -> None:
    with pytest.raises(TensorFormatError, match="unknown dtype 'complex64'"):
        from_raw_bytes(b"\0" * 8, [TensorInfo("a", "complex64", (1,))])


def test_from_raw_bytes_rejects_a_negative_dimension() -> None:
    with pytest.raises(TensorFormatError, match="negative dimension"):
        from_raw_bytes(b"", [TensorInfo("a", "float32", (-1, 0))])


def test_from_raw_bytes_rejects_a_name_described_twice() -> None:
    with pytest.raises(TensorFormatError, match="'a' is described twice"):
        from_raw_bytes(b"\0" * 8, [TensorInfo("a", "float32", (1,))] * 2)


def test_from_raw_bytes_reads_a_memoryview_and_returns_writable_copies() -> None:
    state = {"a": np.arange(4, dtype=np.float32)}
    buffer = bytearray(to_raw_bytes(state))
    decoded = from_raw_bytes(memoryview(buffer), tensor_infos(state))
    buffer[:] = b"\xff" * len(buffer)
    np.testing.assert_array_equal(decoded["a"], state["a"])
    decoded["a"][0] = 7.0  # writable


def test_from_raw_bytes_without_copy_gives_views_of_the_buffer() -> None:
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.arange(2, dtype=np.int64)}
    buffer = np.frombuffer(bytearray(to_raw_bytes(state)), dtype=np.uint8)
    decoded = from_raw_bytes(buffer.data, tensor_infos(state), copy=False)
    assert_same_state(decoded, state)
    assert all(np.shares_memory(value, buffer) for value in decoded.values())


def test_from_raw_bytes_counts_bytes_of_a_typed_memoryview() -> None:
    values = np.arange(3, dtype=np.float32)
    view = memoryview(values)  # type: ignore[arg-type]  # numpy arrays are buffers
    decoded = from_raw_bytes(view, [TensorInfo("v", "float32", (3,))])
    np.testing.assert_array_equal(decoded["v"], values)


def test_safetensors_keeps_zero_dimensional_arrays_zero_dimensional() -> None:
    loaded = load_safetensors(save_safetensors({"step": np.array(3.0, np.float32)}))
    assert loaded["step"].shape == ()


def test_safetensors_keeps_caller_metadata_and_records_the_order() -> None:
    data = save_safetensors({"z": np.zeros(1, np.float32), "a": np.ones(1, np.float32)},
                            {"version": "7"})
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert header["__metadata__"]["version"] == "7"
    assert json.loads(header["__metadata__"]["order"]) == ["z", "a"]


def test_safetensors_loads_a_file_written_elsewhere_sorted_by_name() -> None:
    from safetensors.numpy import save

    data = save({"b": np.zeros(2, np.float32), "c": np.ones(1, np.int64),
                 "a": np.ones(1, np.float32)})
    loaded = load_safetensors(data)
    assert list(loaded) == ["a", "b", "c"]
    np.testing.assert_array_equal(loaded["b"], np.zeros(2, np.float32))


def test_safetensors_loads_writable_copies() -> None:
    loaded = load_safetensors(save_safetensors({"w": np.zeros(2, np.float32)}))
    loaded["w"][0] = 1.0
    assert loaded["w"].flags.writeable


@pytest.mark.parametrize("data", [
    b"",
    b"\x10\x00\x00",
    b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
    b"\xff" * 64,
    b"\x02\x00\x00\x00\x00\x00\x00\x00[]",
])
def test_load_safetensors_rejects_garbage(data: bytes) -> None:
    with pytest.raises(TensorFormatError, match="not a valid safetensors file"):
        load_safetensors(data)


def test_load_safetensors_rejects_a_truncated_file() -> None:
    data = save_safetensors({"w": np.arange(10, dtype=np.float32)})
    with pytest.raises(TensorFormatError):
        load_safetensors(data[:-4])


def test_load_safetensors_rejects_an_order_that_does_not_name_the_tensors() -> None:
    from safetensors.numpy import save

    data = save({"a": np.zeros(1, np.float32)}, metadata={"order": '["a", "b"]'})
    with pytest.raises(TensorFormatError, match="'order' does not match"):
        load_safetensors(data)


def test_load_safetensors_rejects_an_order_that_is_not_a_list() -> None:
    from safetensors.numpy import save

    data = save({"a": np.zeros(1, np.float32)}, metadata={"order": "{"})
    with pytest.raises(TensorFormatError, match="'order' is malformed"):
        load_safetensors(data)


def test_sha256_hex_is_the_lowercase_hex_digest() -> None:
    assert sha256_hex(b"") == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


def test_every_core_error_derives_from_core_error() -> None:
    from core import errors

    for name in ("TensorFormatError", "ModelSpecError", "DataSpecError"):
        assert issubclass(getattr(errors, name), CoreError)
