"""opdcells.dataset: schema, atomic appends, rollback, lazy reading, fingerprints."""
from __future__ import annotations

import math
import tracemalloc

import h5py
import numpy as np
import pytest

import opdcells
from opdcells.dataset import FORMAT, SCHEMA_VERSION, DatasetWriter, open_dataset
from opdcells.errors import DatasetError
from opdcells.metadata import Meta
from opdcells.preprocess import PreprocessConfig, ProcessedMap

SIZE = 16
CONFIG = PreprocessConfig(out_pixel_size_um=0.5, out_size=SIZE)


def maps(n, *, seed=0, size=SIZE, wavelength_nm=633.0):
    """``n`` fake processed maps as iter_processed yields them; map i is filled with seed*100 + i."""
    meta = Meta(units="rad", wavelength_nm=wavelength_nm, pixel_size_um=0.1, medium_index=None)
    for i in range(n):
        opd = np.full((size, size), seed * 100 + i, np.float32)
        yield i, ProcessedMap(opd=opd, dry_mass_pg=10.0 + i, area_um2=50.0 + i), meta


def add(writer, name, n, label, *, seed=0, group="g", **kw):
    return writer.add_file(f"key-{name}", path=f"/data/{name}.mat", sha256=f"sha-{name}", label=label,
                           group=group, maps=maps(n, seed=seed, **kw))


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "ds.h5"
    with DatasetWriter(path, CONFIG) as w:
        add(w, "a", 3, "SW480", seed=1, group="SW480/s1")
        add(w, "b", 2, "PBMCs", seed=2, group="PBMCs/b.mat")
    return path


def test_roundtrip_schema_and_columns(dataset):
    with open_dataset(dataset) as ds:
        assert len(ds) == 5
        assert list(ds.class_names) == ["SW480", "PBMCs"]
        assert ds.labels.tolist() == [0, 0, 0, 1, 1]
        assert ds.groups.tolist() == ["SW480/s1"] * 3 + ["PBMCs/b.mat"] * 2
        assert ds.source_file.tolist() == ["/data/a.mat"] * 3 + ["/data/b.mat"] * 2
        assert ds.source_index.tolist() == [0, 1, 2, 0, 1]
        assert ds.source_sha256.tolist() == ["sha-a"] * 3 + ["sha-b"] * 2
        np.testing.assert_allclose(ds.dry_mass_pg, [10, 11, 12, 10, 11])
        np.testing.assert_allclose(ds.column("area_um2"), [50, 51, 52, 50, 51])
        assert ds.opd.dtype == np.float32 and ds.opd.shape == (5, SIZE, SIZE)
        assert ds.opd.is_virtual and [rows for _, rows in ds.shards] == [5]
        with h5py.File(dataset.parent / ds.shards[0][0]) as shard:
            assert shard["opd"].chunks == (1, SIZE, SIZE)
        attrs = ds.attrs
        assert attrs["format"] == FORMAT and attrs["schema_version"] == SCHEMA_VERSION
        assert attrs["opdcells_version"] == opdcells.__version__
        assert attrs["created"] and attrs["modified"] >= attrs["created"]
        assert ds.pixel_size_um == 0.5 and ds.out_size == SIZE
        assert attrs["alpha_ml_per_g"] == pytest.approx(0.19)
        assert attrs["wavelength_nm"] == 633.0 and math.isnan(attrs["medium_index"])
        assert np.isnan(ds.column("medium_index")).all()
        np.testing.assert_allclose(ds.column("input_pixel_size_um"), 0.1)
        assert ds.read(4)[0, 0] == 201


def test_top_level_open_dataset(dataset):
    with opdcells.open_dataset(dataset) as ds:
        assert len(ds) == 5


def test_read_returns_requested_order(dataset):
    with open_dataset(dataset) as ds:
        got = ds.read([4, 0, 4, 2, -1])
        assert got.shape == (5, SIZE, SIZE) and got.dtype == np.float32
        assert got[:, 0, 0].tolist() == [201, 100, 201, 102, 201]
        assert ds.read(slice(1, 3))[:, 0, 0].tolist() == [101, 102]
        assert ds.read(np.array([], dtype=int)).shape == (0, SIZE, SIZE)
        with pytest.raises(IndexError):
            ds.read([5])


def test_open_is_lazy(tmp_path):
    path = tmp_path / "big.h5"
    with DatasetWriter(path, PreprocessConfig(out_size=64)) as w:
        w.add_file("k", path="p", sha256="s", label="x", group="g", maps=maps(600, size=64))
    opd_bytes = 600 * 64 * 64 * 4  # ~9.8 MB
    tracemalloc.start()
    try:
        with open_dataset(path) as ds:
            assert isinstance(ds.opd, h5py.Dataset)
            _ = ds.labels, ds.groups, ds.dry_mass_pg, len(ds)
            one = ds.read([599])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert one[0, 0, 0] == 599
    assert peak < opd_bytes / 10


def test_append_keeps_label_ids_and_adds_new_class(dataset):
    with DatasetWriter(dataset, CONFIG) as w:
        assert w.has_file("key-a") and not w.has_file("key-c")
        add(w, "c", 1, "PBMCs", seed=3)
        add(w, "d", 1, "monocytes", seed=4)
    with open_dataset(dataset) as ds:
        assert list(ds.class_names) == ["SW480", "PBMCs", "monocytes"]
        assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2]
        assert ds.read([5, 6])[:, 0, 0].tolist() == [300, 400]


def test_fingerprint_ignores_order_and_label_numbering(tmp_path, dataset):
    other = tmp_path / "other.h5"
    with DatasetWriter(other, CONFIG) as w:  # same content, opposite order -> other label ids
        add(w, "b", 2, "PBMCs", seed=2, group="PBMCs/b.mat")
        add(w, "a", 3, "SW480", seed=1, group="SW480/s1")
    with open_dataset(dataset) as a, open_dataset(other) as b:
        assert a.labels.tolist() != b.labels.tolist()
        assert a.fingerprint == b.fingerprint
        before = a.fingerprint
    with DatasetWriter(other, CONFIG) as w:
        add(w, "c", 1, "PBMCs")
    with open_dataset(other) as b:
        assert b.fingerprint != before


def test_failing_file_is_rolled_back(dataset):
    def broken():
        yield from maps(3, seed=9)
        raise ValueError("truncated")

    with DatasetWriter(dataset, CONFIG, batch_size=2) as w:  # rows 1-2 already flushed when it fails
        with pytest.raises(ValueError, match="truncated"):
            w.add_file("key-x", path="x", sha256="x", label="NEW", group="g", maps=broken())
        assert len(w) == 5 and w.class_names == ["SW480", "PBMCs"] and not w.has_file("key-x")
        add(w, "c", 3, "SW480", seed=3)
    with open_dataset(dataset) as ds:
        assert len(ds) == 8 and list(ds.class_names) == ["SW480", "PBMCs"]
        assert ds.read(slice(5, 8))[:, 0, 0].tolist() == [300, 301, 302]
        assert ds.source_sha256.tolist()[5:] == ["sha-c"] * 3


def test_exception_discards_everything(dataset):
    before = dataset.read_bytes()
    with pytest.raises(RuntimeError), DatasetWriter(dataset, CONFIG, batch_size=1) as w:
        add(w, "c", 4, "SW480")
        raise RuntimeError("boom")
    assert dataset.read_bytes() == before
    assert not list(dataset.parent.glob(".ds.h5.tmp-*"))


def test_nothing_added_writes_nothing(tmp_path, dataset):
    before = dataset.read_bytes()
    with DatasetWriter(dataset, CONFIG) as w:
        w.add_file("empty", path="e", sha256="e", label="NEW", group="g", maps=iter(()))
    assert dataset.read_bytes() == before
    fresh = tmp_path / "fresh.h5"
    with DatasetWriter(fresh, CONFIG):
        pass
    assert not fresh.exists()


def test_stale_temp_files_are_removed(dataset):
    stale = dataset.with_name(".ds.h5.tmp-999-deadbeef")
    stale.write_bytes(b"half a dataset")
    with DatasetWriter(dataset, CONFIG):
        assert not stale.exists()


def test_second_writer_is_refused(dataset):
    with DatasetWriter(dataset, CONFIG), pytest.raises(DatasetError, match="another"):
        DatasetWriter(dataset, CONFIG).open()
    with DatasetWriter(dataset, CONFIG):  # lock released
        pass


def test_settings_mismatch_is_refused(dataset):
    with pytest.raises(DatasetError, match="out_size=16.*asks for 32"):
        DatasetWriter(dataset, PreprocessConfig(out_pixel_size_um=0.5, out_size=32)).open()
    with pytest.raises(DatasetError, match="pixel_size_um"):
        DatasetWriter(dataset, PreprocessConfig(out_pixel_size_um=0.25, out_size=SIZE)).open()


def test_wrong_map_shape_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="shape"), DatasetWriter(tmp_path / "x.h5", CONFIG) as w:
        w.add_file("k", path="p", sha256="s", label="x", group="g", maps=maps(1, size=SIZE + 1))
    assert not (tmp_path / "x.h5").exists()


def test_not_a_dataset(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as h5:
        h5["x"] = [1, 2, 3]
    for path, reason in [(tmp_path / "missing.h5", "no such"), (text, "not a readable HDF5"),
                         (plain, "not an opdcells dataset")]:
        with pytest.raises(DatasetError, match=reason) as info:
            open_dataset(path)
        assert str(path) in str(info.value)
    before = plain.read_bytes()
    with pytest.raises(DatasetError, match="not an opdcells dataset"):
        DatasetWriter(plain, CONFIG).open()
    assert plain.read_bytes() == before


def test_newer_schema_is_refused(dataset):
    with h5py.File(dataset, "r+") as h5:
        h5.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(DatasetError, match="newer") as info:
        open_dataset(dataset)
    assert str(dataset) in str(info.value)


def test_corrupt_layout_is_reported(dataset):
    with h5py.File(dataset, "r+") as h5:
        h5["label"].resize(2, axis=0)
    with pytest.raises(DatasetError, match="label not of length 5"):
        open_dataset(dataset)
