"""load_data.py and opdcells.ingest: layouts, groups, appends, bad inputs, exit codes, kill safety."""
from __future__ import annotations

import contextlib
import csv
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import tifffile

from load_data import main
from opdcells.dataset import open_dataset
from opdcells.errors import ExportError, MetadataError
from opdcells.ingest import IngestOptions, discover, file_key, iter_processed, read_manifest

REPO = Path(__file__).resolve().parents[1]
PX = 0.25
NM = ["--units", "nm", "--pixel-size-um", str(PX)]


def cell(seed=0, size=64, px=PX, radius_um=5.0, peak_nm=300.0):
    """A noisy spherical cell (OPD in nm) on an offset background, near the centre of the map."""
    rng = np.random.default_rng(seed)
    field = 20.0 + rng.normal(0, 2, (size, size))
    add_disc(field, *(size * px / 2 + rng.uniform(-1, 1, 2)), radius_um, px, peak_nm)
    return field.astype(np.float32)


def add_disc(field, cy_um, cx_um, radius_um, px=PX, peak_nm=300.0):
    y, x = np.mgrid[:field.shape[0], :field.shape[1]] * px
    field += peak_nm * np.sqrt(np.clip(1 - ((x - cx_um) ** 2 + (y - cy_um) ** 2) / radius_um ** 2, 0, None))


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path


def load(argv, capsys):
    """Run main(argv) in-process; return (exit status, stderr)."""
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err


@pytest.fixture
def classes(tmp_path):
    """SRC/SW480/s1/{a,b}.npy, SRC/SW480/s2/stack.npy (3 maps), SRC/PBMCs/c.npy, plus non-exports."""
    src = tmp_path / "SRC"
    save(src / "SW480" / "s1" / "a.npy", cell(1))
    save(src / "SW480" / "s1" / "b.npy", cell(2))
    save(src / "SW480" / "s2" / "stack.npy", np.stack([cell(3), cell(4), cell(5)]))
    save(src / "PBMCs" / "c.npy", cell(6, radius_um=3.5))
    (src / "README.txt").write_text("not data")
    (src / "truth.csv").write_text("path,label\n")
    (src / "SW480" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (src / "SW480" / "s1" / "._a.npy").write_bytes(b"AppleDouble")
    return src


def test_class_folders_groups_and_non_exports(classes, tmp_path, capsys):
    out = tmp_path / "ds.h5"
    status, err = load([classes, "--out", out, *NM], capsys)
    assert status == 0, err
    assert "added 6 maps from 4 files" in err and "skipped" not in err.replace("0 files skipped", "")
    with open_dataset(out) as ds:
        names = list(ds.class_names)
        assert sorted(names) == ["PBMCs", "SW480"]
        assert [names[i] for i in ds.labels] == ["PBMCs"] + ["SW480"] * 5
        assert ds.groups.tolist() == ["PBMCs", "SW480/s1", "SW480/s1"] + ["SW480/s2/stack.npy"] * 3
        assert ds.source_index.tolist() == [0, 0, 0, 0, 1, 2]
        assert [Path(p).name for p in ds.source_file] == ["c.npy", "a.npy", "b.npy"] + ["stack.npy"] * 3
        assert ds.dry_mass_pg[0] < ds.dry_mass_pg[1]  # the PBMC is the smaller cell
        assert ds.opd.shape == (6, 128, 128) and ds.pixel_size_um == 0.25


def test_rerun_adds_nothing_and_append_keeps_ids(classes, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ds.h5"
    assert load([classes, "--out", out, *NM], capsys)[0] == 0
    with open_dataset(out) as ds:
        fingerprint, labels, names = ds.fingerprint, ds.labels.tolist(), list(ds.class_names)
    before = out.read_bytes()

    with monkeypatch.context() as patch:  # files already present are not even opened
        patch.setattr("opdcells.ingest.open_export", lambda *a, **k: pytest.fail("decoded a known file"))
        status, err = load([classes, "--out", out, *NM], capsys)
    assert status == 0 and "added 0 maps" in err and "4 files already present" in err
    assert out.read_bytes() == before

    save(classes / "monocytes" / "m.npy", cell(7))
    save(classes / "SW480" / "s3" / "d.npy", cell(8))
    status, err = load([classes, "--out", out, *NM], capsys)
    assert status == 0 and "added 2 maps from 2 files" in err and "4 files already present" in err
    with open_dataset(out) as ds:
        assert ds.labels.tolist()[:6] == labels and list(ds.class_names) == [*names, "monocytes"]
        assert ds.labels.tolist()[6:] == [names.index("SW480"), 2]
        assert ds.fingerprint != fingerprint


def test_same_content_twice_is_loaded_once(classes, tmp_path, capsys):
    shutil.copy(classes / "PBMCs" / "c.npy", classes / "PBMCs" / "copy_of_c.npy")
    status, err = load([classes, "--out", tmp_path / "ds.h5", *NM], capsys)
    assert status == 0 and "added 6 maps from 4 files" in err and "1 file already present" in err


def test_label_mode_and_single_files(tmp_path, capsys):
    day = tmp_path / "day1"
    save(day / "x.npy", cell(1))
    save(day / "sessionA" / "y.npy", cell(2))
    loose = save(tmp_path / "loose" / "z.npy", cell(3))
    out = tmp_path / "ds.h5"
    status, err = load([day, loose, "--label", "SW620", "--out", out, *NM], capsys)
    assert status == 0, err
    with open_dataset(out) as ds:
        assert list(ds.class_names) == ["SW620"] and ds.labels.tolist() == [0, 0, 0]
        assert ds.groups.tolist() == ["day1/sessionA", "day1", "loose"]


def test_manifest_with_per_row_units(tmp_path, capsys):
    opd = cell(1).astype(np.float64)
    data = tmp_path / "data"
    save(data / "nm.npy", opd)
    save(data / "sub" / "um.npy", opd / 1000)
    save(data / "rad.npy", opd * 2 * np.pi / 600)
    np.savez(data / "two.npz", phase=opd, other=np.ones((4, 4)))
    rows = [("nm.npy", "SW480", "nm", "", ""), ("sub/um.npy", "SW480", "um", "", ""),
            ("rad.npy", "SW620", "rad", "600", ""), ("two.npz", "SW620", "nm", "", "phase")]
    manifest = data / "files.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "units", "wavelength_nm", "var"])
        writer.writerows(rows)
    out = tmp_path / "ds.h5"
    status, err = load(["--manifest", manifest, "--out", out, "--pixel-size-um", PX], capsys)
    assert status == 0, err
    with open_dataset(out) as ds:
        assert [Path(p).name for p in ds.source_file] == ["nm.npy", "um.npy", "rad.npy", "two.npz"]
        assert ds.groups.tolist() == ["data", "sub", "data", "data"]
        np.testing.assert_allclose(ds.dry_mass_pg, ds.dry_mass_pg[0], rtol=1e-4)
        np.testing.assert_allclose(ds.read([1, 2, 3]), np.repeat(ds.read([0]), 3, axis=0), atol=1e-2)
        assert np.isnan(ds.column("wavelength_nm")[0]) and ds.column("wavelength_nm")[2] == 600


def test_manifest_errors_name_the_line(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,pixel_size_um\na.npy,SW480,0.2\nb.npy,SW480,big\n")
    with pytest.raises(ExportError, match=r"m\.csv: line 3: could not convert"):
        read_manifest(manifest)
    manifest.write_text("path,units\na.npy,nm\n")
    with pytest.raises(ExportError, match="line 2: empty or missing column 'label'"):
        read_manifest(manifest)


BAD = {  # file name -> (writer, expected reason)
    "empty.npy": (lambda p: p.write_bytes(b""), "empty file"),
    "truncated.npy": (lambda p: p.write_bytes(_npy_bytes(cell(9))[:3000]), "cannot read"),
    "nan.npy": (lambda p: np.save(p, np.full((64, 64), np.nan)), "NaN"),
    "rank4.npy": (lambda p: np.save(p, np.ones((2, 3, 4, 5))), "4-D"),
    "zeros.npy": (lambda p: np.save(p, np.zeros((64, 64))), "all zeros"),
    "fake.mat": (lambda p: p.write_text("hello, I am text"), "not a readable .mat"),
    "notes.tif": (lambda p: p.write_text("just text"), "not a readable .tif"),
}


def _npy_bytes(array):
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def make_bad_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, (write, _) in BAD.items():
        write(folder / name)


def test_bad_inputs_are_reported_once_each(classes, tmp_path, capsys):
    make_bad_files(classes / "SW480" / "bad")
    np.save(classes / "SW480" / "s2" / "stack.npy", np.stack([cell(3), np.full((64, 64), np.nan), cell(5)]))
    status, err = load([classes, "--out", tmp_path / "ds.h5", *NM], capsys)
    assert status == 1
    lines = err.splitlines()
    for name, (_, reason) in BAD.items():
        hits = [line for line in lines if f"{name}:" in line]
        assert len(hits) == 1 and reason in hits[0], (name, hits)
    [stack_line] = [line for line in lines if "stack.npy" in line]
    stack = classes / "SW480" / "s2" / "stack.npy"
    assert stack_line.startswith(f"warning: skipped 1 map of {stack} (map 1): ")
    assert "NaN" in stack_line
    assert "added 5 maps from 4 files" in err and f"{len(BAD)} files skipped" in err
    assert "1 bad map skipped" in err
    with open_dataset(tmp_path / "ds.h5") as ds:
        assert len(ds) == 5 and ds.source_index.tolist()[-2:] == [0, 2]


def test_nothing_loadable_exits_2_and_writes_nothing(tmp_path, capsys):
    make_bad_files(tmp_path / "SRC" / "X")
    status, err = load([tmp_path / "SRC", "--out", tmp_path / "ds.h5", *NM], capsys)
    assert status == 2 and f"{len(BAD)} files skipped" in err
    assert not (tmp_path / "ds.h5").exists()


def test_strict_stops_and_leaves_dataset_untouched(classes, tmp_path, capsys):
    out = tmp_path / "ds.h5"
    assert load([classes, "--out", out, *NM], capsys)[0] == 0
    before = out.read_bytes()
    save(classes / "SW480" / "s4" / "good.npy", cell(11))
    save(classes / "SW480" / "s5" / "zeros.npy", np.zeros((64, 64)))
    status, err = load([classes, "--out", out, "--strict", *NM], capsys)
    assert status == 2 and "--strict" in err and "zeros.npy: map is all zeros" in err
    assert out.read_bytes() == before
    assert not list(tmp_path.glob(".ds.h5.tmp-*"))


def test_missing_metadata_is_a_clear_error(classes, tmp_path, capsys):
    status, err = load([classes, "--out", tmp_path / "ds.h5", "--pixel-size-um", PX], capsys)
    assert status == 2
    assert f"{classes / 'PBMCs' / 'c.npy'}: missing metadata units (give --units nm|um|rad" in err
    with pytest.raises(MetadataError, match="wavelength_nm"):
        list(iter_processed(classes / "PBMCs" / "c.npy", IngestOptions(units="rad", pixel_size_um=PX)))


def test_file_metadata_fills_gaps_user_wins(tmp_path):
    path = tmp_path / "m.mat"
    scipy.io.savemat(path, {"phase": cell(1) * 2 * np.pi / 633, "units": "rad", "wavelength_nm": 633.0,
                            "pixel_size_um": 0.2, "medium_index": 1.337})
    [(index, processed, meta)] = list(iter_processed(path, IngestOptions(pixel_size_um=PX)))
    assert index == 0 and processed.opd.shape == (128, 128)
    assert meta.as_dict() == {"units": "rad", "wavelength_nm": 633.0, "pixel_size_um": PX,
                              "medium_index": 1.337}


def test_usage_and_dataset_errors(classes, tmp_path, capsys):
    out = tmp_path / "ds.h5"
    assert load(["--out", out], capsys)[0] == 2
    assert load([classes, "--out", out, "--units", "furlongs"], capsys)[0] == 2
    status, err = load([tmp_path / "nowhere", "--out", out, *NM], capsys)
    assert status == 2 and "nowhere: no such file or folder" in err
    status, err = load([classes / "PBMCs" / "c.npy", "--out", out, *NM], capsys)
    assert status == 2 and "needs --label" in err
    assert load([classes, "--out", out, *NM], capsys)[0] == 0
    status, err = load([classes, "--out", out, "--out-size", 64, *NM], capsys)
    assert status == 2 and "out_size=128, this run asks for 64" in err
    text = tmp_path / "text.h5"
    text.write_text("precious notes")
    status, err = load([classes, "--out", text, *NM], capsys)
    assert status == 2 and "not a readable HDF5" in err and text.read_text() == "precious notes"


def test_stray_export_outside_class_folder_and_output_inside_source(classes, capsys):
    save(classes / "orphan.npy", cell(12))
    out = classes / "ds.h5"
    status, err = load([classes, "--out", out, *NM], capsys)
    assert status == 1 and "orphan.npy: not inside a class folder" in err
    status, err = load([classes, "--out", out, *NM, "--quiet"], capsys)
    assert status == 1 and "orphan.npy" in err and "ds.h5" not in err and "added" not in err


def test_discover_is_sorted_and_deterministic(classes):
    found = discover([classes])
    assert [f.path.relative_to(classes).as_posix() for f in found] == [
        "PBMCs/c.npy", "SW480/s1/a.npy", "SW480/s1/b.npy", "SW480/s2/stack.npy"]
    assert found == discover([str(classes)])


def test_fields_are_segmented_into_cells(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for k in range(2):
        field = 15.0 + rng.normal(0, 2, (160, 160))
        for cy, cx in [(8, 8), (8, 30), (30, 18), (38.5, 38.5)]:  # the last one touches the border
            add_disc(field, cy + k, cx, 4.0)
        (tmp_path / "SRC" / "PBMCs").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(tmp_path / "SRC" / "PBMCs" / f"f{k}.tif", field.astype(np.float32))
    out = tmp_path / "ds.h5"
    status, err = load([tmp_path / "SRC", "--out", out, "--fields", *NM], capsys)
    assert status == 0, err
    with open_dataset(out) as ds:
        assert len(ds) == 6 and ds.source_index.tolist() == [0] * 6
        assert ds.groups.tolist() == ["PBMCs/f0.tif"] * 3 + ["PBMCs/f1.tif"] * 3
        assert np.all((ds.area_um2 > 40) & (ds.area_um2 < 70))  # pi * 4^2 = 50 um^2


def test_simulated_exports_with_v73_stacks(tmp_path, capsys):
    simulate = pytest.importorskip("opdcells.simulate")
    src = tmp_path / "sim"
    simulate.simulate_dataset(src, n_per_class=4, seed=1, sessions_per_class=2, progress=False)
    out = tmp_path / "ds.h5"
    status, err = load([src, "--out", out], capsys)
    assert status == 0, err
    with open(src / "truth.csv") as fh:
        truth = {(row["path"], int(row["index"])): row["class"] for row in csv.DictReader(fh)}
    with open_dataset(out) as ds:
        loaded = {(Path(f).relative_to(src.resolve()).as_posix(), int(i)): ds.class_names[label]
                  for f, i, label in zip(ds.source_file, ds.source_index, ds.labels, strict=True)}
        assert loaded == truth
        stack_rows = [g for g in ds.groups if g.endswith("stack.mat")]
        assert len(stack_rows) == 10 and "SW480/session_2/stack.mat" in stack_rows
        assert np.isfinite(ds.column("wavelength_nm")).all()


def test_real_qpimage_series_metadata_from_file(real_qpi, tmp_path, capsys):
    src = tmp_path / "hl60"
    src.mkdir()
    with h5py.File(real_qpi / "hl60_qlsi_series" / "series.h5") as h5, h5py.File(src / "few.h5", "w") as few:
        for key in ("qpi_0", "qpi_1", "qpi_2"):
            h5.copy(h5[key], few, key)
        few.attrs.update(h5.attrs)
    out = tmp_path / "ds.h5"
    status, err = load([src, "--label", "HL60", "--out", out], capsys)
    assert status == 0, err
    with open_dataset(out) as ds:
        assert len(ds) == 3 and ds.groups.tolist() == ["hl60/few.h5"] * 3
        assert ds.attrs["wavelength_nm"] == pytest.approx(647)
        assert ds.attrs["medium_index"] == pytest.approx(1.335)
        np.testing.assert_allclose(ds.column("input_pixel_size_um"), 0.139, rtol=1e-3)


#: The data side, and the modules of the learning side that must stay without TensorFlow (their users --
#: the command line's parsers, metrics, corpus simulation -- start in a second, not in ten).
WITHOUT_TENSORFLOW = ("load_data", "opdcells.errors", "opdcells.metadata", "opdcells.readers",
                      "opdcells.readers_qpformat", "opdcells.readers_archive", "opdcells.retrieval",
                      "opdcells.describe", "opdcells.preprocess", "opdcells.segment", "opdcells.dataset",
                      "opdcells.ingest", "opdcells.load", "opdcells.simulate", "opdcells.spikein",
                      "opdcells.features", "opdcells.console", "opdcells.config", "opdcells.registry",
                      "opdcells.files", "opdcells.tasks", "opdcells.splits", "opdcells.evaluate",
                      "opdcells.pretrain_corpus", "opdcells.pretrain_options", "opdcells.cli")


def test_data_side_does_not_import_tensorflow():
    code = (f"import sys, {', '.join(WITHOUT_TENSORFLOW)}\n"
            "assert not any(m.startswith(('tensorflow', 'keras')) for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def _temps(out):
    """What an append in progress leaves: its journal of started shards and a temporary index."""
    return [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.pending")]


def _shard_files(out):
    return sorted(p.name for p in out.with_name(f"{out.name}.shards").iterdir())


def test_sigkill_leaves_old_or_new_dataset(tmp_path, capsys):
    out = tmp_path / "ds.h5"
    base = save(tmp_path / "base" / "A" / "a.npy", np.stack([cell(1), cell(2)]))
    assert load([base.parents[1], "--out", out, *NM], capsys)[0] == 0
    for i in range(120):  # the first 64 maps are processed before the temporary file appears
        save(tmp_path / "new" / f"m{i:03d}.npy", cell(100 + i))
    pristine = out.read_bytes()
    cmd = [sys.executable, str(REPO / "load_data.py"), str(tmp_path / "new"), "--label", "B",
           "--out", str(out), "--quiet", *NM]

    def start():
        out.write_bytes(pristine)  # back to 2 maps: the shard of a completed run is now unnamed
        journal = out.with_name(f".{out.name}.pending")
        pending = journal.read_text() if journal.exists() else ""  # killed runs' shards: left to load_data
        for name in _shard_files(out):
            if name != base_shard and name not in pending:
                (out.with_name(f"{out.name}.shards") / name).unlink()
        existing = set(_shard_files(out))
        return subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.DEVNULL), existing

    def wait_for_temp(proc, existing):
        """Until this run has created its shard (after its journal entry; stale journals don't count)."""
        while not set(_shard_files(out)) - existing and proc.poll() is None:
            time.sleep(0.002)

    def outcome():
        with open_dataset(out) as ds:  # must always open
            named = {name.split("/")[1] for name, _ in ds.shards}
            return len(ds), bool(_temps(out)), bool(set(_shard_files(out)) - named)

    with open_dataset(out) as ds:
        base_shard = ds.shards[0][0].split("/")[1]
    proc, existing = start()  # an uninterrupted run: how long from the first shard write to the end
    wait_for_temp(proc, existing)
    t0 = time.monotonic()
    assert proc.wait(timeout=60) == 0
    window = time.monotonic() - t0
    assert outcome() == (122, False, False)

    outcomes = []
    for fraction in (None, 0.0, 0.3, 0.6, 0.9, 3.0):
        proc, existing = start()
        if fraction is None:
            time.sleep(0.3)  # during start-up, before anything is written
        else:
            wait_for_temp(proc, existing)
            time.sleep(fraction * window)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        outcomes.append(outcome())
    assert all(n in (2, 122) for n, _, _ in outcomes), outcomes
    assert any(n == 2 and temp and orphan for n, temp, orphan in outcomes), f"no kill mid-write: {outcomes}"
    assert load([tmp_path / "new", "--label", "B", "--out", out, *NM], capsys)[0] == 0
    with open_dataset(out) as ds:
        assert len(ds) == 122 and not _temps(out)
        named = sorted(name.split("/")[1] for name, _ in ds.shards)
    assert named[0] == base_shard and _shard_files(out) == named  # killed runs' shards are gone


def _load_peak(folder: Path, n_maps: int, capsys) -> tuple[int, int]:
    """Peak traced bytes of loading one stack of ``n_maps`` 128 x 128 maps, and the stack's float32 bytes."""
    stack = np.stack([cell(i) for i in range(n_maps)])
    save(folder / "SRC" / "X" / "stack.npy", stack)
    del stack
    out = folder / "ds.h5"
    tracemalloc.start()
    try:
        status, err = load([folder / "SRC", "--out", out, *NM], capsys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 0, err
    with open_dataset(out) as ds:
        assert len(ds) == n_maps
        return peak, ds.opd.size * 4


def test_memory_stays_bounded(tmp_path, capsys):
    """Memory does not grow with the stack (maps are read, preprocessed in small batches and written as they
    come): 200 more maps (13 MB) add less than a quarter of their size to the peak, and 300 maps (19.7 MB)
    never sit in memory at once."""
    small, small_bytes = _load_peak(tmp_path / "small", 100, capsys)
    peak, all_maps = _load_peak(tmp_path / "large", 300, capsys)
    assert peak - small < (all_maps - small_bytes) / 4, (small, peak)
    assert peak < all_maps


def test_reading_options_are_part_of_the_file_identity(classes):
    path = classes / "SW480" / "s2" / "stack.npy"
    sha, key = file_key(path, IngestOptions())
    assert file_key(path, IngestOptions(units="nm", pixel_size_um=1.0)) == (sha, key)
    others = {file_key(path, IngestOptions(**change))[1]
              for change in ({"stack_axis": 0}, {"var": "x"}, {"fields": True}, {"hologram": True})}
    assert len(others) == 4 and key not in others and all(k.startswith(sha) for k in others)


def test_out_through_a_symlink_updates_its_target(classes, tmp_path, capsys):
    real = tmp_path / "store" / "ds.h5"
    real.parent.mkdir()
    assert load([classes / "PBMCs", "--label", "PBMCs", "--out", real, *NM], capsys)[0] == 0
    link = tmp_path / "ds.h5"
    link.symlink_to(real)
    status, err = load([classes, "--out", link, *NM], capsys)
    assert status == 0, err
    assert link.is_symlink() and link.resolve() == real and not (tmp_path / "ds.h5.shards").exists()
    with open_dataset(real) as ds:
        assert len(ds) == 6 and sorted(set(ds.class_names)) == ["PBMCs", "SW480"]


def test_failed_fsync_exits_2_with_one_line(classes, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ds.h5"
    assert load([classes / "PBMCs", "--label", "PBMCs", "--out", out, *NM], capsys)[0] == 0
    before = out.read_bytes()

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    status, err = load([classes, "--out", out, *NM], capsys)
    assert status == 2 and err.count("\n") == 1 and err.startswith(f"error: {out}: cannot write"), err
    monkeypatch.undo()
    assert out.read_bytes() == before and not _temps(out) and len(_shard_files(out)) == 1


@contextlib.contextmanager
def small_tmpfs(folder, size):
    """A ``size`` tmpfs mounted on ``folder`` (skips where mounting is not allowed)."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_full_disk_is_one_line_exit_2_and_the_old_dataset_survives(tmp_path):
    for i in range(100):  # 100 maps of 64 KB: more than the disk has left
        save(tmp_path / "new" / f"m{i:02d}.npy", cell(200 + i))
    save(tmp_path / "base" / "a.npy", cell(1))
    with small_tmpfs(tmp_path / "disk", "5m") as disk:
        out = disk / "ds.h5"
        cmd = [sys.executable, str(REPO / "load_data.py"), "--out", str(out), "--quiet", *NM, "--label", "A"]
        assert subprocess.run([*cmd, str(tmp_path / "base")], cwd=REPO).returncode == 0
        before = out.read_bytes()
        done = subprocess.run([*cmd, str(tmp_path / "new")], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 2, done
        assert done.stderr.count("\n") == 1 and f"{out}: disk full" in done.stderr, done.stderr
        assert out.read_bytes() == before and not _temps(out) and len(_shard_files(out)) == 1
        with open_dataset(out) as ds:
            assert len(ds) == 1 and ds.read(0).any()


def test_rejected_maps_keep_only_their_reason(tmp_path, capsys):
    stack = np.full((200, 128, 128), 5.0, np.float32)  # constant maps: rejected, 64 KB each on disk
    stack[0] = cell(1, size=128)
    save(tmp_path / "SRC" / "X" / "stack.npy", stack)
    del stack
    tracemalloc.start()
    try:
        status, err = load([tmp_path / "SRC", "--out", tmp_path / "ds.h5", *NM], capsys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 1 and "skipped 199 maps of" in err and "and 194 more" in err, err
    assert err.count("skipped 199 maps") == 1
    assert peak < 200 * 128 * 128 * 4, peak  # < the stack: rejected maps (and tracebacks) are not kept


def test_disk_full_while_writing_the_index_is_one_line_too(tmp_path):
    from opdcells.dataset import DatasetWriter
    from opdcells.metadata import Meta
    from opdcells.preprocess import PreprocessConfig, ProcessedMap

    save(tmp_path / "new" / "a.npy", cell(1, radius_um=1.0))  # fits the 16 px (4 um) maps
    meta = Meta(units="nm", pixel_size_um=PX)
    rows = ((i, ProcessedMap(np.full((16, 16), i, np.float32), 1.0, 1.0), meta) for i in range(3000))
    with small_tmpfs(tmp_path / "disk", "8m") as disk:
        out = disk / "ds.h5"
        with DatasetWriter(out, PreprocessConfig(out_size=16)) as w:  # an index of ~1 MB
            w.add_file("k", path="/a/long/path/to/an/export.mat", sha256="0" * 64, label="A", group="g",
                       maps=rows)
        before = out.read_bytes()
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with open(disk / "filler", "wb") as f:  # room for the new shard, not for the new index
            f.truncate(free - 300_000)
            os.posix_fallocate(f.fileno(), 0, free - 300_000)
        code = ("import sys, load_data, opdcells.dataset as d; d._ensure_space = lambda folder, need: None; "
                "sys.exit(load_data.main(sys.argv[1:]))")  # no early refusal: HDF5 or the index meet ENOSPC
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "new"), "--label", "A", "--out",
                               str(out), "--out-size", "16", "--quiet", *NM], cwd=REPO, capture_output=True,
                              text=True)
        assert done.returncode == 2, done
        assert done.stderr.count("\n") == 1 and f"{out}: disk full" in done.stderr, done.stderr
        assert out.read_bytes() == before and not _temps(out) and len(_shard_files(out)) == 1
