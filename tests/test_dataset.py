"""opdcells.dataset: schema, atomic appends, rollback, lazy reading, fingerprints."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tracemalloc

import h5py
import numpy as np
import pytest

import opdcells
from opdcells import dataset as dataset_module
from opdcells.dataset import FORMAT, MAP_COLUMNS, SCHEMA_VERSION, DatasetWriter, open_dataset
from opdcells.errors import DatasetError
from opdcells.metadata import Meta
from opdcells.preprocess import FieldPosition, PreprocessConfig, ProcessedMap

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
    assert not list(dataset.parent.glob(".ds.h5.tmp-*")) and not leftovers(dataset)


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
        label = h5["label"][:2]  # the index's columns are written once, contiguous
        del h5["label"]
        h5["label"] = label
    with pytest.raises(DatasetError, match="label not of length 5"):
        open_dataset(dataset)


# --------------------------------------------------------------------------- the sharded store


def store_files(path):
    """{file name: (inode, size, mtime)} of the index and every shard of the dataset at ``path``."""
    files = [path, *sorted(path.with_name(f"{path.name}.shards").glob("*"))]
    return {f.name: (f.stat().st_ino, f.stat().st_size, f.stat().st_mtime_ns) for f in files}


def leftovers(path):
    """Journal, temporary index or shard that no index names: what a failed append must not leave."""
    with open_dataset(path) as ds:
        named = {name.split("/")[1] for name, _ in ds.shards}
    shards = {p.name for p in path.with_name(f"{path.name}.shards").glob("*")}
    temps = [p.name for p in path.parent.glob(f".{path.name}.*") if not p.name.endswith(".lock")]
    return sorted(shards - named) + temps


def test_append_writes_what_it_adds_not_the_dataset(tmp_path):
    config = PreprocessConfig(out_pixel_size_um=0.5, out_size=64)
    written = {}
    for n in (100, 1000):
        path = tmp_path / f"n{n}.h5"
        with DatasetWriter(path, config) as w:
            w.add_file("big", path="big", sha256="s", label="x", group="g", maps=maps(n, size=64))
        before = store_files(path)
        with DatasetWriter(path, config) as w:
            w.add_file("one", path="one", sha256="t", label="x", group="h", maps=maps(1, seed=7, size=64))
        after = store_files(path)
        assert all(after[name] == stat for name, stat in before.items() if name != path.name)  # untouched
        written[n] = sum(stat[1] for name, stat in after.items() if before.get(name) != stat)
        with open_dataset(path) as ds:
            assert len(ds) == n + 1 and ds.read(n)[0, 0] == 700 and ds.read(n - 1)[0, 0] == n - 1
    opd_bytes_900 = 900 * 64 * 64 * 4
    assert written[1000] - written[100] < 0.02 * opd_bytes_900  # ~ 200 B per map of index, not 16 KB
    assert written[1000] < 0.05 * sum(stat[1] for stat in after.values())


def test_dataset_folder_moves_and_copies_as_a_unit(tmp_path, monkeypatch):
    folder = tmp_path / "a"
    folder.mkdir()
    path = folder / "ds.h5"
    for seed in (1, 2):  # two appends: two shards
        with DatasetWriter(path, CONFIG) as w:
            add(w, f"f{seed}", 3, "SW480", seed=seed)
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    shutil.move(folder, moved)
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative shard paths follow the index, not the cwd
    with open_dataset(moved / "ds.h5") as ds:
        assert len(ds.shards) == 2
        assert ds.read(slice(None))[:, 0, 0].tolist() == [100, 101, 102, 200, 201, 202]
        assert ds.opd[4, 0, 0] == 201
    alone = tmp_path / "alone.h5"
    shutil.copyfile(moved / "ds.h5", alone)  # the index without its shards: refused, not zeros
    with pytest.raises(DatasetError, match="shard ds.h5.shards/.* is missing.*move or copy both"):
        open_dataset(alone)


def write_schema1(path, n):
    """A dataset as opdcells wrote it before shards (schema 1): one file, opd stored in it."""
    with h5py.File(path, "w") as h5:
        h5.attrs.update({"format": FORMAT, "schema_version": 1, "opdcells_version": "0.0.9",
                         "created": "2026-01-01T00:00:00+00:00", "modified": "2026-01-01T00:00:00+00:00",
                         **dataset_module.settings_of(CONFIG), "wavelength_nm": 633.0,
                         "medium_index": math.nan})
        h5.create_dataset("opd", data=np.arange(n, dtype=np.float32)[:, None, None] * np.ones((SIZE, SIZE)),
                          maxshape=(None, SIZE, SIZE), chunks=(1, SIZE, SIZE), dtype=np.float32)
        values = {"label": np.zeros(n), "source_file": ["/old/a.mat"] * n, "source_index": np.arange(n),
                  "source_sha256": ["sha-old"] * n, "group": ["old"] * n, "dry_mass_pg": np.ones(n),
                  "area_um2": np.ones(n), "wavelength_nm": np.full(n, 633.0),
                  "medium_index": np.full(n, np.nan),
                  "input_pixel_size_um": np.full(n, 0.1)}
        for name, dtype in MAP_COLUMNS.items():
            h5.create_dataset(name, data=np.asarray(values[name], dtype=dtype), maxshape=(None,),
                              chunks=(64,))
        h5.create_dataset("class_names", data=np.array(["SW480"], dtype=object), dtype=dataset_module._STR,
                          maxshape=(None,), chunks=(16,))
        for name, value in {"key": ["key-old"], "path": ["/old/a.mat"], "n_maps": [n]}.items():
            dtype = dataset_module.FILE_COLUMNS[name]
            h5.create_dataset(f"files/{name}", data=np.asarray(value, dtype=dtype), maxshape=(None,),
                              chunks=(16,))


def test_schema1_dataset_is_read_and_migrated_on_append(tmp_path):
    path = tmp_path / "old.h5"
    write_schema1(path, 4)
    old_inode = path.stat().st_ino
    with open_dataset(path) as ds:
        assert len(ds) == 4 and not ds.opd.is_virtual and ds.shards == []
        assert ds.read([3])[0, 0, 0] == 3 and ds.source_file.tolist() == ["/old/a.mat"] * 4
        fingerprint = ds.fingerprint
    with DatasetWriter(path, CONFIG) as w:
        assert w.has_file("key-old") and w.class_names == ["SW480"]
        add(w, "new", 2, "PBMCs", seed=5)
    with open_dataset(path) as ds:
        assert ds.attrs["schema_version"] == SCHEMA_VERSION and ds.opd.is_virtual
        assert [rows for _, rows in ds.shards] == [4, 2]
        assert (tmp_path / ds.shards[0][0]).stat().st_ino == old_inode  # linked, not copied
        assert ds.read(slice(None))[:, 0, 0].tolist() == [0, 1, 2, 3, 500, 501]
        assert ds.labels.tolist() == [0, 0, 0, 0, 1, 1] and list(ds.class_names) == ["SW480", "PBMCs"]
        assert ds.attrs["created"] == "2026-01-01T00:00:00+00:00" and ds.fingerprint != fingerprint
        assert ds.column("files/key").tolist() == ["key-old", "key-new"]
    assert path.stat().st_nlink == 1 and not leftovers(path)


def test_killed_migration_is_cleaned_and_retried(tmp_path):
    path = tmp_path / "old.h5"
    write_schema1(path, 4)
    folder = tmp_path / "old.h5.shards"
    folder.mkdir()
    os.link(path, folder / "000000-deadbeef-v1.h5")  # a run killed after linking, before the new index
    (tmp_path / ".old.h5.pending").write_text("old.h5.shards/000000-deadbeef-v1.h5\n")
    with DatasetWriter(path, CONFIG) as w:  # not refused as hard-linked: the journal explains the link
        add(w, "new", 1, "SW480", seed=5)
    with open_dataset(path) as ds:
        assert len(ds) == 5 and [rows for _, rows in ds.shards] == [4, 1]
        assert "deadbeef" not in ds.shards[0][0]
    assert not (folder / "000000-deadbeef-v1.h5").exists() and not leftovers(path)


def test_fingerprint_does_not_depend_on_the_storage_schema(tmp_path):
    """Saved models record their dataset's fingerprint: sharding must not make them disown it."""
    old, new = tmp_path / "old.h5", tmp_path / "new.h5"
    write_schema1(old, 4)
    with DatasetWriter(new, CONFIG) as w:
        w.add_file("key-old", path="/old/a.mat", sha256="sha-old", label="SW480", group="old", maps=maps(4))
    # the formula saved models' fingerprints were computed with (opdcells 0.1.0, schema 1)
    triples = [["sha-old", i, "SW480"] for i in range(4)]
    recorded = hashlib.sha256(json.dumps({"schema_version": 1, "pixel_size_um": 0.5, "out_size": SIZE,
                                          "maps": triples}, separators=(",", ":")).encode()).hexdigest()
    with open_dataset(old) as a, open_dataset(new) as b:
        assert a.attrs["schema_version"] == 1 and b.attrs["schema_version"] == SCHEMA_VERSION
        assert a.fingerprint == b.fingerprint == recorded


def test_lock_follows_the_real_file(tmp_path, dataset):
    (tmp_path / "link.h5").symlink_to(dataset)
    (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
    with DatasetWriter(dataset, CONFIG):
        for other in (tmp_path / "link.h5", tmp_path / "alias" / "ds.h5"):
            with pytest.raises(DatasetError, match="another"):
                DatasetWriter(other, CONFIG).open()
    os.link(dataset, tmp_path / "hard.h5")
    for name in ("hard.h5", "ds.h5"):
        with pytest.raises(DatasetError, match="2 hard links"):
            DatasetWriter(tmp_path / name, CONFIG).open()


def test_writing_through_a_symlink_updates_its_target(tmp_path, dataset):
    link = tmp_path / "links" / "ds.h5"
    link.parent.mkdir()
    link.symlink_to(dataset)
    with DatasetWriter(link, CONFIG) as w:
        add(w, "c", 2, "SW480", seed=3)
    assert link.is_symlink() and link.resolve() == dataset
    assert not (tmp_path / "links" / "ds.h5.shards").exists()
    with open_dataset(dataset) as ds, open_dataset(link) as via_link:
        assert len(ds) == len(via_link) == 7 and via_link.read(6)[0, 0] == 301


@pytest.mark.parametrize("code, reason", [(errno.EIO, "cannot write .*Input/output error"),
                                          (errno.ENOSPC, "disk full")])
def test_fsync_failure_is_an_error_and_changes_nothing(dataset, monkeypatch, code, reason):
    before = store_files(dataset)

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(DatasetError, match=reason) as info, DatasetWriter(dataset, CONFIG) as w:
        add(w, "c", 2, "SW480", seed=3)
    assert str(dataset) in str(info.value) and "\n" not in str(info.value)
    monkeypatch.undo()
    assert store_files(dataset) == before and not leftovers(dataset)


def test_disk_full_while_writing_maps_changes_nothing(dataset, monkeypatch):
    before = store_files(dataset)
    real_setitem = h5py.Dataset.__setitem__

    def full_after_first_batch(self, key, value):
        if self.name == "/opd" and self.shape[0] > 2:
            raise OSError("Can't write data (file write failed: time = now, filename = 'x', "
                          "errno = 28, error message = 'No space left on device')")
        real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full_after_first_batch)
    with pytest.raises(DatasetError, match="disk full while writing ds.h5.shards/"), \
            DatasetWriter(dataset, CONFIG, batch_size=2) as w:
        add(w, "c", 6, "SW480", seed=3)
    monkeypatch.undo()
    assert store_files(dataset) == before and not leftovers(dataset)


def test_damaged_shard_is_an_error_naming_the_dataset(dataset):
    with DatasetWriter(dataset, CONFIG) as w:
        add(w, "c", 2, "SW480", seed=3)
    with open_dataset(dataset) as ds:
        second = dataset.parent / ds.shards[1][0]
    os.truncate(second, 1000)
    with open_dataset(dataset) as ds:
        assert ds.read([0, 4])[:, 0, 0].tolist() == [100, 201]  # the intact shard still reads
        with pytest.raises(DatasetError, match="cannot read maps.*truncated") as info:
            ds.read([4, 5])
    assert str(dataset) in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------ trace columns (schema 3)


def cells_of_a_field(n, *, seed=0):
    """``n`` processed cells of one field of view, with their FieldPosition (cell i at row 10 i, col 5)."""
    for index, processed, meta in maps(n, seed=seed):
        processed.position = FieldPosition(cell=index, label=index + 7, centroid_px=(10.0 * index, 5.5),
                                           bbox=(10 * index - 3, 2, 10 * index + 4, 9), pixel_size_um=0.1)
        yield 0, processed, meta


def test_positions_in_the_field_round_trip_and_whole_maps_have_none(tmp_path):
    path = tmp_path / "ds.h5"
    with DatasetWriter(path, CONFIG) as w:
        w.add_file("key-field", path="/data/field.mat", sha256="sha-field", label="SW480", group="f",
                   maps=cells_of_a_field(3))
        add(w, "stack", 2, "SW480")
    with open_dataset(path) as ds:
        origin = ds.origins()
        assert origin["cell"].tolist() == [0, 1, 2, -1, -1]
        assert origin["source_index"].tolist() == [0, 0, 0, 0, 1]
        np.testing.assert_allclose(origin["centroid_row_px"][:3], [0, 10, 20])
        np.testing.assert_allclose(origin["centroid_col_um"][:3], 0.55, rtol=1e-6)   # 5.5 px at 0.1 um
        assert origin["bbox_row1"].tolist() == [4, 14, 24, -1, -1]
        assert np.isnan(origin["centroid_row_um"][3:]).all()
        picked = ds.origins([4, 1])
        assert picked["cell"].tolist() == [-1, 1] and picked["source_file"].tolist()[1] == "/data/field.mat"


def test_datasets_before_trace_columns_open_read_and_append(tmp_path):
    """Schema 1 files and schema 2 indexes have no trace columns: they read as 'not recorded', and the
    next append keeps every old row, filled so, beside the new rows' positions."""
    old1 = tmp_path / "v1.h5"
    write_schema1(old1, 2)
    old2 = tmp_path / "v2.h5"
    with DatasetWriter(old2, CONFIG) as w:
        add(w, "a", 2, "SW480")
    with h5py.File(old2, "r+") as h5:   # what opdcells wrote before schema 3
        for name in dataset_module.TRACE_COLUMNS:
            del h5[name]
        h5.attrs["schema_version"] = 2
    for path in (old1, old2):
        with open_dataset(path) as ds:
            origin = ds.origins()
            assert origin["cell"].tolist() == [-1, -1] and np.isnan(origin["centroid_col_um"]).all()
            fingerprint = ds.fingerprint
        with DatasetWriter(path, CONFIG) as w:
            w.add_file("key-field", path="/data/field.mat", sha256="sha-field", label="SW480", group="f",
                       maps=cells_of_a_field(2))
        with open_dataset(path) as ds:
            assert ds.attrs["schema_version"] == SCHEMA_VERSION == 3 and len(ds) == 4
            assert ds.origins()["cell"].tolist() == [-1, -1, 0, 1]
            assert ds.origins()["bbox_col0"].tolist() == [-1, -1, 2, 2]
            assert ds.read([0, 1])[:, 0, 0].tolist() == [0, 1] and ds.fingerprint != fingerprint
