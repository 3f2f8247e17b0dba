import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlcseg_ray.formats.feature_store import KEY_DTYPE, key_column, key_matrix


def test_keys_round_trip_bit_for_bit_through_parquet_slices_and_chunks(tmp_path):
    """Each patch's D float16 go in as one fixed-size binary value and come back as the same bits, from a
    sliced column (an offset into the buffer) and from a column of several chunks."""
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1000, 24)).astype(np.float16)
    col = key_column(keys)
    assert col.type == pa.binary(48) and col.null_count == 0
    assert np.array_equal(key_matrix(col, np.float16).view(np.uint16), keys.view(np.uint16))
    assert np.array_equal(key_matrix(col.slice(37, 500), np.float16), keys[37:537])
    chunked = pa.chunked_array([col.slice(0, 300), col.slice(300)])
    assert np.array_equal(key_matrix(chunked), keys.astype(np.float32))
    pq.write_table(pa.table({"key": col}), tmp_path / "k.parquet")
    back = pq.read_table(tmp_path / "k.parquet").column("key")
    assert np.array_equal(key_matrix(back, np.float16).view(np.uint16), keys.view(np.uint16))
    # the bytes are little-endian float16 whatever the machine: readable with numpy alone
    assert np.array_equal(np.frombuffer(back.combine_chunks().buffers()[1], "<f2").reshape(1000, 24), keys)
    assert KEY_DTYPE == np.dtype("<f2")


def test_a_fixed_size_list_key_column_reads_the_same():
    keys = np.arange(60, dtype=np.float16).reshape(5, 12)
    as_list = pa.FixedSizeListArray.from_arrays(pa.array(keys.ravel(), pa.float16()), 12)
    assert np.array_equal(key_matrix(as_list), key_matrix(key_column(keys)))


def test_the_feature_table_rounds_float32_keys_as_numpy_does():
    """The table converts on torch, for speed: its float16 must be numpy's, ties and overflow included."""
    from mlcseg_ray.formats.feature_store import feature_table

    rng = np.random.default_rng(1)
    halves = np.arange(0x7BFF, dtype=np.uint16).view(np.float16).astype(np.float64)
    ties = ((halves[:-1] + halves[1:]) / 2).astype(np.float32)  # exactly between two float16
    keys = np.concatenate([ties, -ties, rng.standard_normal(600).astype(np.float32) * 1e5])
    keys = np.resize(keys, (len(keys) // 16 * 16,)).reshape(-1, 16)
    images = [("a", keys[:100], np.zeros(100), 10), ("b", keys[100:], np.zeros(len(keys) - 100), 7)]
    with np.errstate(over="ignore"):
        expected = keys.astype(np.float16)
    got = key_matrix(feature_table(images, 16).column("key"), np.float16)
    assert np.array_equal(got.view(np.uint16), expected.view(np.uint16))
    # float64 keys (a brought store's) round once, straight to float16, as numpy rounds them
    wide = rng.standard_normal((50, 16)) * 10.0 ** rng.integers(-6, 5, (50, 1))
    got = key_matrix(feature_table([("c", wide, np.zeros(50), 5)], 16).column("key"), np.float16)
    assert np.array_equal(got.view(np.uint16), wide.astype(np.float16).view(np.uint16))
