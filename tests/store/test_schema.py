"""Store primitives: chunk files written directly are exactly zarr's, and read back through zarr."""

import numpy as np
import zarr

from histokt.store.schema import chunk_file, patch_array, write_chunk


def test_write_chunk_matches_zarr_bytes(tmp_path):
    patches = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    by_zarr = patch_array(tmp_path / "a", 3, 32)
    by_zarr[...] = patches
    patch_array(tmp_path / "b", 3, 32)
    for i, p in enumerate(patches):
        write_chunk(tmp_path / "b", i, p)
        assert chunk_file(tmp_path / "b", i).read_bytes() == chunk_file(tmp_path / "a", i).read_bytes()
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "b"), mode="r")[...], patches)
