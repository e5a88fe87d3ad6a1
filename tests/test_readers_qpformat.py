"""qpformat as a reader backend, hologram sideband/filter options, --inspect, the README format table.

The qpformat test files in ``../shared/cases/qpformat/`` (README there) are the peer test: each gives the
result its README lists, and every map read agrees with qpformat's own decoded phase within 2% of dry mass.
"""
from __future__ import annotations

import argparse
import logging
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from load_data import main
from opdcells.dataset import open_dataset
from opdcells.errors import ExportError, is_odd_library_error
from opdcells.ingest import IngestOptions, add_reading_options, iter_processed, reading_options
from opdcells.metadata import Meta
from opdcells.preprocess import preprocess_map
from opdcells.readers import _reading, format_table, meta_from_qpimage, open_export
from opdcells.readers_qpformat import QPFORMAT_HOLOGRAM_READERS, QPFORMAT_READERS
from opdcells.retrieval import Retrieval, looks_like_hologram, object_sign

REPO = Path(__file__).resolve().parents[1]

#: (file, options, maps stored) as listed in cases/qpformat/README.md
STORED = [
    ("single_phasics.tif", ["--pixel-size-um", "0.3"], 1),   # SID4Bio 29.6 um pixels behind 100x
    ("single_holo.tif", ["--hologram", "--wavelength-nm", "633", "--pixel-size-um", "0.107"], 1),
    ("single_hdf5_raw-oah.h5", [], 1),
    ("series_hdf5_raw-oah.h5", [], 2),
    ("single_hdf5_raw-qlsi.h5", [], 1),
    ("series_hdf5_meep.h5", [], 18),
]


@pytest.fixture(scope="module")
def qpf_cases(cases_dir) -> Path:
    path = cases_dir / "qpformat"
    if not path.is_dir():
        pytest.skip(f"qpformat cases not found at {path}")
    return path


def load(tmp_path, path, *options) -> tuple[int, Path]:
    out = tmp_path / "out.h5"
    return main([str(path), "--label", "cell", "--out", str(out), "-q", *options]), out


def qpformat_dry_masses(path, user: Meta, fmt: str | None = None) -> list[float]:
    """Dry mass of every image of ``path`` from qpformat's own decoded phase (rad), preprocessed like ours
    with the user's metadata over the file's."""
    import qpformat

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = qpformat.load_data(path, fmt=fmt)
        masses = []
        for index in range(len(data)):
            qpi = data.get_qpimage(index)
            phase = np.squeeze(np.asarray(qpi.pha, dtype=np.float64))
            meta = user.over(meta_from_qpimage(qpi.meta, path))
            masses.append(preprocess_map(phase, meta, path=str(path)).dry_mass_pg)
    return masses


@pytest.mark.parametrize("name, options, n_maps", STORED, ids=[s[0] for s in STORED])
def test_qpformat_case_is_stored_and_agrees_with_qpformat(tmp_path, qpf_cases, name, options, n_maps):
    status, out = load(tmp_path, qpf_cases / name, *options)
    assert status == 0
    with open_dataset(out) as ds:
        assert len(ds) == n_maps
        stored = np.asarray(ds.dry_mass_pg)
    user = Meta(wavelength_nm=633.0 if "--wavelength-nm" in options else None,
                pixel_size_um=float(options[options.index("--pixel-size-um") + 1])
                if "--pixel-size-um" in options else None)
    # qpformat's own reader of each file (for the Phasics TIFF: phase at the file's 550 nm, we read the OPD
    # page in nm; for the hologram TIFF: qpformat's retrieval, we reconstruct with qpretrieve ourselves)
    fmt = "SingleRawOAHTif" if "--hologram" in options else None
    theirs = qpformat_dry_masses(qpf_cases / name, user, fmt)
    np.testing.assert_allclose(stored, theirs, rtol=0.02)
    assert np.all(stored > 0)


def test_qpformat_hdf5_metadata_comes_from_the_file_and_options_win(qpf_cases):
    with open_export(qpf_cases / "single_hdf5_raw-oah.h5") as reader:
        assert reader.name == "raw-oah-hdf5" and reader.units_fixed
        assert reader.file_meta == Meta(units="rad", wavelength_nm=532.0, pixel_size_um=0.0847499414455,
                                        medium_index=1.333)
    options = IngestOptions(pixel_size_um=0.1)
    (_, processed, meta), = list(iter_processed(qpf_cases / "single_hdf5_raw-oah.h5", options))
    assert meta.pixel_size_um == 0.1 and meta.wavelength_nm == 532.0


def test_qpformat_reader_storage_types_match_qpformat():
    from qpformat.file_formats import formats_dict

    for reader in [*QPFORMAT_READERS, *QPFORMAT_HOLOGRAM_READERS]:
        assert reader.storage == formats_dict[reader.fmt].storage_type, reader.fmt


def test_phasics_zip_is_read_member_by_member(qpf_cases):
    with open_export(qpf_cases / "series_phasics.zip") as reader:
        assert (reader.name, len(reader), reader.map_shape) == ("phasics-zip", 3, (20, 40))
        assert [reader.member_name(i) for i in range(3)] == sorted(reader.member_name(i) for i in range(3))
        assert all(reader.member_name(i).startswith("SID PHA") for i in range(3))
        assert reader.file_meta.wavelength_nm == 550.0
        assert len(list(reader)) == 3


def test_phasics_zip_without_pixel_size_is_one_line(tmp_path, qpf_cases, capsys):
    status, out = load(tmp_path, qpf_cases / "series_phasics.zip")
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert re.search(r"series_phasics\.zip: missing metadata pixel_size_um", err)


def test_phasics_zip_background_tiles_are_refused_per_member(tmp_path, qpf_cases, capsys):
    status, out = load(tmp_path, qpf_cases / "series_phasics.zip", "--pixel-size-um", "0.1")
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.count("SID PHA") >= 3        # each member named with its reason


@pytest.mark.parametrize("options", [[], ["--pixel-size-um", "0.1", "--wavelength-nm", "550"]])
def test_qpimage_without_metadata_is_refused_in_one_line(tmp_path, qpf_cases, capsys, options):
    status, out = load(tmp_path, qpf_cases / "single_qpimage.h5", *options)
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and "MetaDataMissingError" not in err
    skipped = [line for line in err.splitlines() if "single_qpimage.h5" in line]
    assert len(skipped) == 1 and skipped[0].startswith("warning: skipped")


def qpimage_file(path, meta_data, seed=0):
    """A valid qpimage HDF5 file of one cell-like phase blob (rad) with ``meta_data`` (SI units)."""
    import qpimage

    y, x = np.mgrid[:96, :96] * 0.2
    phase = 2.0 * np.sqrt(np.clip(1 - ((x - 9.6) ** 2 + (y - 9.6) ** 2) / 5.0 ** 2, 0, None))
    phase += np.random.default_rng(seed).normal(0, 0.01, phase.shape)
    with qpimage.QPImage(data=phase, which_data="phase", meta_data=meta_data, h5file=path, h5mode="w"):
        pass
    return path


def test_qpimage_without_medium_index_does_not_stop_the_run(tmp_path, capsys):
    """Issue 11: qpimage raised MetaDataMissingError (a BaseException) for the absent medium index."""
    folder = tmp_path / "in"
    folder.mkdir()
    qpimage_file(folder / "a_no_medium.h5", {"wavelength": 633e-9, "pixel size": 0.2e-6})
    qpimage_file(folder / "b_full.h5", {"wavelength": 633e-9, "pixel size": 0.2e-6, "medium index": 1.335})
    status, out = load(tmp_path, folder)
    assert status == 0, capsys.readouterr().err
    with h5py.File(out, "r") as h5:
        order = np.argsort(h5["source_file"].asstr()[:])
        np.testing.assert_array_equal(h5["medium_index"][:][order], [np.nan, np.float32(1.335)])


class OddLibraryError(BaseException):
    """Like qpimage's MetaDataMissingError or qpformat's BadFileFormatError."""


def test_odd_library_errors_become_export_errors_but_interrupts_do_not():
    assert is_odd_library_error(OddLibraryError()) and not is_odd_library_error(KeyboardInterrupt())
    with pytest.raises(ExportError, match=r"^f\.h5: reading: OddLibraryError: odd$"):
        with _reading("f.h5", "reading"):
            raise OddLibraryError("odd")
    with pytest.raises(KeyboardInterrupt):
        with _reading("f.h5", "reading"):
            raise KeyboardInterrupt


# ------------------------------------------------------------------------------ holograms: sideband, filter


def test_hologram_case_loads_as_one_positive_cell(tmp_path, cases_dir, caplog):
    """cases/ingest/hologram-sideband-sign: qpretrieve's sideband gave the cell below its background."""
    path = cases_dir / "ingest" / "hologram-sideband-sign" / "holo_int.npz"
    with caplog.at_level(logging.INFO, logger="opdcells.retrieval"):
        status, out = load(tmp_path, path, "--wavelength-nm", "633", "--pixel-size-um", "0.2")
    assert status == 0
    with open_dataset(out) as ds:
        assert len(ds) == 1
        assert ds.dry_mass_pg[0] == pytest.approx(108, rel=0.05)    # the synthetic truth (cases README)
        assert ds.read([0]).max() > 300                             # peak OPD ~459 nm, positive
    assert any("sideband -1 (auto" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("sideband, positive", [("+1", False), ("-1", True), ("auto", True)])
def test_sideband_option_forces_the_sign(cases_dir, sideband, positive):
    path = cases_dir / "ingest" / "hologram-sideband-sign" / "holo_int.npz"
    with open_export(path, retrieval=Retrieval(sideband=sideband)) as reader:
        (raw,) = list(reader)
        assert reader.sidebands == {0: -1 if positive else 1}
    assert (object_sign(raw.data) > 0) == positive


def test_filter_options_reach_qpretrieve(cases_dir, qpf_cases):
    retrieval = Retrieval(filter_name="gauss", filter_size=0.2)
    path = cases_dir / "ingest" / "hologram-sideband-sign" / "holo_int.npz"
    with open_export(path, retrieval=retrieval) as reader:
        assert reader.qpretrieve_kw == {"invert_phase": False, "filter_name": "gauss", "filter_size": 0.2}
        gauss = next(iter(reader)).data
    with open_export(path) as reader:
        disk = next(iter(reader)).data
    assert not np.allclose(gauss, disk)
    with open_export(qpf_cases / "single_hdf5_raw-oah.h5", retrieval=retrieval) as reader:
        assert reader._data.qpretrieve_kw["filter_name"] == "gauss"


def test_retrieval_options_on_the_command_line_and_in_the_file_key():
    parser = argparse.ArgumentParser()
    add_reading_options(parser)
    args = parser.parse_args(["--sideband", "-1", "--filter-name", "tukey", "--filter-size", "0.25"])
    options = IngestOptions(**reading_options(args))
    assert options.retrieval == Retrieval("-1", "tukey", 0.25)
    assert options.identity != IngestOptions().identity
    # defaults leave the key of earlier datasets unchanged
    assert IngestOptions().identity == '{"fields":false,"hologram":false,"stack_axis":null,"var":null}'
    with pytest.raises(SystemExit):
        parser.parse_args(["--filter-size", "1.5"])


def synthetic_hologram(phase, frequency=(0.2, 0.25)):
    rows, cols = np.indices(phase.shape)
    return np.round(120 + 100 * np.cos(2 * np.pi * (frequency[0] * rows + frequency[1] * cols) - phase))


def test_object_sign_and_hologram_look():
    y, x = np.mgrid[:96, :96]
    blob = 3.0 * np.exp(-((x - 48) ** 2 + (y - 48) ** 2) / 200.0)
    assert object_sign(blob) == 1 and object_sign(-blob) == -1 and object_sign(np.zeros((8, 8))) == 1
    assert looks_like_hologram(synthetic_hologram(blob))
    assert not looks_like_hologram(blob) and not looks_like_hologram(np.zeros((32, 32)))


# ------------------------------------------------------------------------------ --inspect, --formats


def test_inspect_names_each_format_and_writes_nothing(tmp_path, qpf_cases, capsys):
    before = set(tmp_path.iterdir())
    status = main(["--inspect", str(qpf_cases), "--pixel-size-um", "0.1"])
    text = capsys.readouterr().out
    assert status == 0 and set(tmp_path.iterdir()) == before
    blocks = {Path(b.splitlines()[0]).name: b for b in re.split(r"\n(?=/)", text.strip())}
    assert len(blocks) == 8
    assert "format: raw-qlsi-hdf5 (qpformat: SingleRawQLSIQpformatHDF5)" in blocks["single_hdf5_raw-qlsi.h5"]
    assert "images: 18 maps of 47 x 47 px" in blocks["series_hdf5_meep.h5"]
    assert "wavelength_nm=532nm" in blocks["series_hdf5_raw-oah.h5"]
    assert "hologram sideband: +1" in blocks["series_hdf5_raw-oah.h5"]
    assert "missing: wavelength_nm" in blocks["single_qpimage.h5"]
    assert "give --hologram" in blocks["single_holo.tif"]
    assert "give --hologram" not in blocks["single_phasics.tif"]


def test_inspect_reports_the_chosen_sideband_and_unreadable_files(tmp_path, cases_dir, capsys):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    path = cases_dir / "ingest" / "hologram-sideband-sign" / "holo_int.npz"
    status = main(["--inspect", str(path), str(bad)])
    text = capsys.readouterr().out
    assert status == 1
    assert "format: hologram" in text and "hologram sideband: -1" in text
    assert re.search(r"bad\.h5\n  cannot be read: ", text)


def test_readme_format_table_is_the_generated_one(capsys):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- formats:begin -->\n(.*?)<!-- formats:end -->", readme, re.S)
    assert table, "README.md lacks the generated format table markers"
    assert table.group(1) == format_table(), "regenerate with: python load_data.py --formats"
    assert main(["--formats"]) == 0 and capsys.readouterr().out == format_table()
    for reader in QPFORMAT_READERS + QPFORMAT_HOLOGRAM_READERS:
        assert f"`{reader.fmt}`" in table.group(1)


# ------------------------------------------------------------------------------ zip series of any export


def opd_cell(seed: int) -> np.ndarray:
    """A 64 x 64 OPD map (nm) of one cell at 0.25 um/px on a noisy background."""
    y, x = np.mgrid[:64, :64] * 0.25
    noise = np.random.default_rng(seed).normal(0, 2, (64, 64))
    return (20 + noise + 300 * np.sqrt(np.clip(1 - ((x - 8) ** 2 + (y - 8) ** 2) / 25, 0, None))).astype("f4")


def test_zip_series_is_read_member_by_member_with_per_member_reasons(tmp_path, caplog, monkeypatch):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))   # leftovers would show there
    stack = tmp_path / "stack.npy"
    np.save(stack, np.stack([opd_cell(1), opd_cell(2)]))
    tifffile.imwrite(tmp_path / "one.tif", opd_cell(3))
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(stack, "day1/a_stack.npy")
        zf.write(tmp_path / "one.tif", "day1/b_one.tif")
        zf.writestr("day1/c_broken.npy", b"garbage")
        zf.writestr("__MACOSX/day1/._a_stack.npy", b"resource fork")
        zf.writestr("notes.txt", b"not an export")
    with open_export(archive) as reader:
        assert (reader.name, len(reader)) == ("zip-series", 4)
        assert [reader.member_name(i) for i in range(4)] == [
            "day1/a_stack.npy [map 0]", "day1/a_stack.npy [map 1]", "day1/b_one.tif", "day1/c_broken.npy"]
    with caplog.at_level(logging.WARNING):
        status, out = load(tmp_path, archive, "--units", "nm", "--pixel-size-um", "0.25")
    assert status == 1
    with open_dataset(out) as ds:
        assert len(ds) == 3 and list(ds.source_index) == [0, 1, 2]
        np.testing.assert_allclose(ds.dry_mass_pg, ds.dry_mass_pg[0], rtol=0.05)
    (line,) = [r.getMessage() for r in caplog.records if "c_broken.npy" in r.getMessage()]
    assert "map 3 (day1/c_broken.npy)" in line and "not a readable .npy file" in line
    assert list((tmp_path / "tmp").iterdir()) == []       # members extracted to a private folder, removed


def test_zip_without_exports_is_refused_in_one_line(tmp_path):
    archive = tmp_path / "notes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("notes.txt", b"no export here")
    with pytest.raises(ExportError, match=r"notes\.zip: content is not a readable \.zip file"):
        open_export(archive)


def test_zip_of_holograms_is_read_with_hologram(tmp_path, cases_dir):
    source = cases_dir / "ingest" / "hologram-sideband-sign" / "holo_int.npz"
    archive = tmp_path / "holograms.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(source, "a.npz")
        zf.write(source, "b.npz")
    with open_export(archive, hologram=True) as reader:
        raws = list(reader)
    assert reader.name == "zip-series" and [r.index for r in raws] == [0, 1]
    assert all(r.meta.units == "rad" and object_sign(r.data) > 0 for r in raws)


def test_qpimage_series_subjoined_in_another_hdf5_file(tmp_path):
    import qpimage

    path = tmp_path / "experiment.h5"
    y, x = np.mgrid[:64, :64] * 0.25
    blob = 2.0 * np.sqrt(np.clip(1 - ((x - 8) ** 2 + (y - 8) ** 2) / 25, 0, None))
    meta = {"wavelength": 550e-9, "pixel size": 0.25e-6, "medium index": 1.335}
    with h5py.File(path, "w") as h5:
        h5["other/data"] = np.arange(5)                    # the file holds more than the series
        with qpimage.QPSeries(h5file=h5.require_group("qpseries"), h5mode="a") as series:
            for scale in (1.0, 1.5):
                series.add_qpimage(qpimage.QPImage(data=scale * blob, which_data="phase", meta_data=meta))
    with open_export(path) as reader:
        raws = list(reader)
    assert (reader.name, len(raws)) == ("qpimage-subjoined", 2)
    assert reader.file_meta == Meta(units="rad", wavelength_nm=550.0, pixel_size_um=0.25, medium_index=1.335)
    np.testing.assert_allclose(raws[1].data.max() / raws[0].data.max(), 1.5, rtol=1e-3)
