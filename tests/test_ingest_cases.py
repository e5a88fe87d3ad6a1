"""Real-world export faults (``shared/cases/ingest``) and the kinds around them, through ``load_data.py``.

The rule of every case: a map is loaded correctly (dry mass within a few percent of the same map as a
plain float ``.npy``), or the file is refused with one line that names it and says the real reason;
never a hang, never a map that is not OPD, never a unit silently wrong by orders of magnitude.
The case files are synthetic cells of about 108 pg at 0.2 um/px and 633 nm.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse
import tifffile
from test_readers import write_mat73

from load_data import main
from opdcells.dataset import open_dataset
from opdcells.readers import field_to_phase, open_export

REPO = Path(__file__).resolve().parents[1]
RAD = ["--units", "rad", "--wavelength-nm", "633", "--pixel-size-um", "0.2"]
NM = ["--units", "nm", "--pixel-size-um", "0.2"]
CELL_PG = 108.0


@pytest.fixture
def ingest(cases_dir, tmp_path, capsys):
    """``ingest(relative_path, *options)`` -> (exit status, dry masses of the stored maps, stderr)."""
    def run(rel, *options, label="X"):
        out = tmp_path / f"out_{len(list(tmp_path.glob('out_*.h5')))}.h5"
        path = rel if Path(rel).is_absolute() else cases_dir / "ingest" / rel
        status = main([str(path), *options, "--label", label, "--out", str(out), "-q"])
        err = capsys.readouterr().err
        masses = np.array([])
        if out.exists():
            with open_dataset(out) as ds:
                masses = ds.column("dry_mass_pg")
        return status, masses, err
    return run


def one_line_naming(err: str, path_part: str, *words: str) -> None:
    """``err`` is one line naming the file and saying each of ``words`` (no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert path_part in lines[0], lines[0]
    for word in words:
        assert word in lines[0], lines[0]


# ------------------------------------------------------------------------- non-finite values: no hang

def test_one_nan_in_a_complex_field_is_filled_not_a_hang(ingest):
    status, clean, _ = ingest("complex-nan-hang/field_clean.npy", *RAD[2:])
    status_nan, filled, err = ingest("complex-nan-hang/field_one_nan.npy", *RAD[2:])
    assert (status, status_nan) == (0, 0), err
    assert clean[0] == pytest.approx(CELL_PG, rel=0.03)
    assert filled[0] == pytest.approx(clean[0], rel=0.01)


def test_a_field_mostly_nan_is_refused_in_one_line(ingest):
    status, masses, err = ingest("complex-nan-hang/field_nan_outside_aperture.npy", *RAD[2:])
    assert status == 2 and masses.size == 0
    one_line_naming(err, "field_nan_outside_aperture.npy", "NaN or infinite", "at most 1%")


def test_field_to_phase_never_unwraps_non_finite_values():
    field = np.exp(1j * np.linspace(0, 6, 64 * 64).reshape(64, 64))
    field[3, 5] = np.nan + 1j * np.inf
    assert np.isfinite(field_to_phase(field)).all()
    field[:20] = np.nan
    with pytest.raises(Exception, match="NaN or infinite"):
        field_to_phase(field, "f.npy")
    with pytest.raises(Exception, match="zero everywhere"):
        field_to_phase(np.zeros((16, 16), complex), "dark.npy")


def _non_finite_exports(folder: Path) -> list[tuple[Path, list[str]]]:
    """One file per reader that could unwrap or fit, each with NaN and inf values (and its options)."""
    rng = np.random.default_rng(0)
    field = np.exp(1j * rng.uniform(-3, 3, (48, 48))).astype(np.complex64)
    field[rng.random(field.shape) < 0.3] = np.nan
    real = rng.normal(0, 1, (48, 48)).astype(np.float32)
    real[rng.random(real.shape) < 0.3] = np.inf
    holo = np.cos(np.arange(48)[None, :] * 1.3 + np.arange(48)[:, None] * 0.9) * 50 + 100
    holo[::3] = np.nan
    files = {
        "complex.npy": (lambda p: np.save(p, field), ["--wavelength-nm", "633", "--pixel-size-um", "0.2"]),
        "complex_v5.mat": (lambda p: scipy.io.savemat(p, {"field": field}),
                           ["--wavelength-nm", "633", "--pixel-size-um", "0.2"]),
        "complex_v73.mat": (lambda p: write_mat73(p, {"field": field.astype(np.complex128)}),
                            ["--wavelength-nm", "633", "--pixel-size-um", "0.2"]),
        "real.tif": (lambda p: tifffile.imwrite(p, real), NM),
        "real.npz": (lambda p: np.savez(p, opd=real), NM),
        "hologram.npy": (lambda p: np.save(p, holo), ["--hologram", *RAD[2:]]),
    }
    made = []
    for name, (write, options) in files.items():
        write(folder / name)
        made.append((folder / name, options))
    return made


def test_no_reader_hangs_on_non_finite_values(tmp_path):
    """Each file in its own process with a time limit: a hang fails the test instead of the suite."""
    for path, options in _non_finite_exports(tmp_path):
        command = [sys.executable, str(REPO / "load_data.py"), str(path), *options, "--label", "X",
                   "--out", str(tmp_path / "out.h5"), "-q"]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert proc.returncode == 2, (path, proc.stderr)
        one_line_naming(proc.stderr, path.name, "NaN or infinite")


# ------------------------------------------------------------------------- units the reader fixes

@pytest.mark.parametrize("rel, options", [
    ("complex-units-override/field_v73.mat", ["--wavelength-nm", "633", "--pixel-size-um", "0.2"]),
    ("complex-units-override/cell_qpimage.h5", []),
])
def test_units_a_reader_fixes_win_over_a_conflicting_units_option(ingest, rel, options):
    status, masses, err = ingest(rel, "--units", "nm", *options)
    assert status == 2 and masses.size == 0
    one_line_naming(err, Path(rel).name, "--units nm cannot apply", "phase in rad")
    status, masses, err = ingest(rel, *options)
    assert status == 0, err
    assert masses[0] == pytest.approx(CELL_PG, rel=0.03)
    status, masses, err = ingest(rel, "--units", "rad", *options)   # the same units: no conflict
    assert status == 0 and masses[0] == pytest.approx(CELL_PG, rel=0.03), err


# ------------------------------------------------------------------------- inverted and wrapped maps

def test_an_inverted_map_is_named_and_invert_phase_reads_it(ingest):
    status, masses, err = ingest("hologram-sideband-sign/neg_opd.npy", *NM)
    assert status == 2 and masses.size == 0
    one_line_naming(err, "neg_opd.npy", "inverted map", "--invert-phase")
    status, masses, err = ingest("hologram-sideband-sign/neg_opd.npy", *NM, "--invert-phase")
    assert status == 0, err
    assert masses[0] == pytest.approx(CELL_PG, rel=0.03)


def test_wrapped_phase_is_named_and_unwrapped_phase_reads(ingest):
    status, masses, err = ingest("wrapped-phase-msg/phase_wrapped.tif", *RAD)
    assert status == 2 and masses.size == 0
    one_line_naming(err, "phase_wrapped.tif", "wrapped phase", "unwrap", "complex field")
    status, masses, err = ingest("wrapped-phase-msg/phase_unwrapped.tif", *RAD)
    assert status == 0 and masses.size == 1, err


def test_a_cell_with_a_small_phase_is_not_taken_for_wrapped(tmp_path, ingest):
    """Phase within [-pi, pi] but smooth (no jumps of more than pi) is an ordinary cell."""
    y, x = np.mgrid[:96, :96] * 0.2
    phase = 2.5 * np.sqrt(np.clip(1 - ((x - 9.6) ** 2 + (y - 9.6) ** 2) / 5.0 ** 2, 0, None))
    np.save(tmp_path / "small.npy", phase.astype(np.float32))
    status, masses, err = ingest(tmp_path / "small.npy", *RAD)
    assert status == 0 and masses.size == 1, err


# ------------------------------------------------------------------------- channels

def test_a_hyperstack_channel_is_never_a_map(ingest, cases_dir):
    rel = "imagej-hyperstack-channels/hyperstack_TCYX.tif"
    status, masses, err = ingest(rel, *NM)
    assert status == 2 and masses.size == 0
    one_line_naming(err, "hyperstack_TCYX.tif", "2 channels", "TCYX", "--channel")
    status, masses, err = ingest(rel, *NM, "--channel", "0")
    assert status == 0 and masses.size == 3, err
    opd_pages = tifffile.imread(cases_dir / "ingest" / rel)[:, 0]
    with open_export(cases_dir / "ingest" / rel, channel=0) as reader:
        for raw, page in zip(reader, opd_pages, strict=True):
            np.testing.assert_array_equal(raw.data, page)
    status, _, err = ingest(rel, *NM, "--channel", "2")
    assert status == 2 and "out of range" in err


def test_ome_tiff_channels_and_pixel_size(tmp_path):
    path = tmp_path / "two.ome.tif"
    data = np.stack([np.full((20, 20), 1.0), np.full((20, 20), 2.0)]).astype(np.float32)
    tifffile.imwrite(path, data, metadata={"axes": "CYX", "PhysicalSizeX": 0.3, "PhysicalSizeXUnit": "µm"})
    with pytest.raises(Exception, match="2 channels"):
        open_export(path)
    with open_export(path, channel=1) as reader:
        assert len(reader) == 1 and reader.file_meta.pixel_size_um == pytest.approx(0.3)
        np.testing.assert_array_equal(next(iter(reader)).data, data[1])


def test_channel_on_a_format_without_channels_is_refused(tmp_path):
    np.save(tmp_path / "m.npy", np.ones((20, 20)))
    with pytest.raises(Exception, match="no channel axis"):
        open_export(tmp_path / "m.npy", channel=0)


# ------------------------------------------------------------------------- stack axis

def test_a_numpy_order_stack_in_a_mat_file_is_refused_with_the_axis_hint(ingest, cases_dir, tmp_path):
    rel = "savemat-python-stack-axis/py_stack.mat"
    status, masses, err = ingest(rel, *NM)
    assert status == 2 and masses.size == 0
    one_line_naming(err, "py_stack.mat", "12 x 96 px", "narrower than a cell", "--stack-axis 0")
    status, masses, err = ingest(rel, *NM, "--stack-axis", "0")
    # the cell drifts out of the frame: maps 6-10 hold it cut by the edge (refused, issue 16), 11 a sliver
    assert status == 1 and masses.size == 6 and "skipped 5 maps" in err and "touches the edge" in err, err
    np.save(tmp_path / "same.npy", scipy.io.loadmat(cases_dir / "ingest" / rel)["phase"])  # N x H x W
    np.testing.assert_allclose(masses, ingest(tmp_path / "same.npy", *NM)[1], rtol=1e-6)


def test_a_long_stack_of_full_sized_maps_is_not_refused(tmp_path):
    """200 maps of 64 x 64 (stack longer than a map side) is a normal MATLAB stack."""
    path = tmp_path / "long.mat"
    scipy.io.savemat(path, {"phase": np.zeros((64, 64, 200), np.float32)})
    with open_export(path) as reader:
        assert len(reader) == 200 and reader.map_shape == (64, 64)


# ------------------------------------------------------------------------- integer samples

def test_integer_counts_need_a_scale(ingest, cases_dir):
    rel = "uint16-phase-tiff/phase_u16.tif"
    status, masses, err = ingest(rel, *RAD)
    assert status == 2 and masses.size == 0
    one_line_naming(err, "phase_u16.tif", "integer samples (uint16)", "--scale")
    ref = ingest("uint16-phase-tiff/ref_rad.npy", *RAD)[1][0]
    status, masses, err = ingest(rel, *RAD, "--scale", str(1 / 4096))   # the counts' scale: 4096 per rad
    assert status == 0, err
    assert masses[0] == pytest.approx(ref, rel=0.02) and ref == pytest.approx(CELL_PG, rel=0.03)


def test_imagej_calibration_is_applied(tmp_path, ingest, cases_dir):
    """A calibration the file carries (ImageJ ``cf=0``: value = c0 + c1 * count, in ``vunit``) is used;
    the case file's calibration maps counts to [-pi, pi], so its phase is wrapped, and said so."""
    status, masses, err = ingest("uint16-phase-tiff/phase_u16_imagej_calibrated.tif", *RAD)
    assert status == 2
    one_line_naming(err, "phase_u16_imagej_calibrated.tif", "wrapped phase")
    ref = np.load(cases_dir / "ingest" / "uint16-phase-tiff" / "ref_rad.npy").astype(np.float64)
    c0, c1 = float(ref.min()) - 0.01, 1e-4
    counts = np.round((ref - c0) / c1).astype(np.uint16)
    path = tmp_path / "calibrated.tif"
    tifffile.imwrite(path, counts, imagej=True, resolution=(5, 5),
                     metadata={"unit": "micron", "cf": 0, "c0": c0, "c1": c1, "vunit": "rad"})
    with open_export(path) as reader:
        assert reader.file_meta.pixel_size_um == pytest.approx(0.2) and reader.file_meta.units == "rad"
        assert (reader.sample_scale.scale, reader.sample_scale.offset) == (c1, c0)
    status, masses, err = ingest(path, "--wavelength-nm", "633")   # units and pixel size from the file
    assert status == 0, err
    assert masses[0] == pytest.approx(ingest("uint16-phase-tiff/ref_rad.npy", *RAD)[1][0], rel=0.01)


def test_a_scale_variable_in_a_container_file_is_applied(tmp_path, ingest, cases_dir):
    ref = np.load(cases_dir / "ingest" / "uint16-phase-tiff" / "ref_rad.npy").astype(np.float64)
    counts = np.round(ref * 1000).astype(np.int16)
    scipy.io.savemat(tmp_path / "scaled.mat", {"phase": counts, "scale": 0.001})
    np.save(tmp_path / "unscaled.npy", counts)
    status, masses, err = ingest(tmp_path / "scaled.mat", *RAD)
    assert status == 0 and masses[0] == pytest.approx(CELL_PG, rel=0.03), err
    status, _, err = ingest(tmp_path / "unscaled.npy", *RAD)
    assert status == 2 and "integer samples (int16)" in err


# ------------------------------------------------------------------------- TIFF compressions

@pytest.mark.parametrize("compression, predictor", [("lzw", None), ("zlib", True), ("zstd", None),
                                                    ("lzw", True)])
def test_common_tiff_compressions_read(tmp_path, cases_dir, compression, predictor):
    opd = tifffile.imread(cases_dir / "ingest" / "lzw-tiff" / "lzw_float.tif")
    path = tmp_path / f"{compression}.tif"
    tifffile.imwrite(path, opd, compression=compression, predictor=predictor)
    with open_export(path) as reader:
        np.testing.assert_array_equal(next(iter(reader)).data, opd)


def test_the_lzw_case_loads(ingest):
    status, masses, err = ingest("lzw-tiff/lzw_float.tif", *NM)
    assert status == 0 and masses.size == 1, err


# ------------------------------------------------------------------------- metadata variables

@pytest.mark.parametrize("name", ["cell_string_units.mat", "px_zero.mat", "two_wavelengths.mat",
                                  "units_cell.mat", "units_radians.mat"])
def test_what_the_user_gives_wins_over_odd_metadata_variables(ingest, name):
    status, masses, err = ingest(f"metadata-override/{name}", *RAD)
    assert status == 0, err
    assert masses[0] == pytest.approx(CELL_PG, rel=0.03)


@pytest.mark.parametrize("name, options, words", [
    ("cell_string_units.mat", ["--wavelength-nm", "633", "--pixel-size-um", "0.2"],
     ["'units' variable is a MATLAB string object", "--units"]),
    ("px_zero.mat", ["--units", "rad", "--wavelength-nm", "633"],
     ["'pixel_size_um' variable is 0", "--pixel-size-um"]),
    ("two_wavelengths.mat", ["--units", "rad", "--pixel-size-um", "0.2"],
     ["2 values (633, 532)", "--wavelength-nm"]),
])
def test_without_the_option_the_message_says_what_the_variable_is(ingest, name, options, words):
    status, masses, err = ingest(f"metadata-override/{name}", *options)
    assert status == 2 and masses.size == 0
    one_line_naming(err, name, *words)
    assert "370776473621111" not in err   # never the digits of a MATLAB object reference


@pytest.mark.parametrize("name", ["units_cell.mat", "units_radians.mat"])
def test_readable_spellings_of_units_need_no_option(ingest, name):
    status, masses, err = ingest(f"metadata-override/{name}", *RAD[2:])
    assert status == 0 and masses[0] == pytest.approx(CELL_PG, rel=0.03), err


# ------------------------------------------------------------------------- MATLAB v7.3 like v5

def _v73_with_group(path: Path, kind: str) -> None:
    """A MATLAB v7.3 file holding one struct, sparse matrix or empty array (the HDF5 layout MATLAB writes)."""
    write_mat73(path, {})
    with h5py.File(path, "a") as h5:
        if kind == "struct":
            group = h5.create_group("s")
            group.attrs["MATLAB_class"] = np.bytes_(b"struct")
            group.create_dataset("a", data=np.ones((1, 1)))
        elif kind == "sparse":
            group = h5.create_group("sp")
            group.attrs["MATLAB_class"] = np.bytes_(b"double")
            group.attrs["MATLAB_sparse"] = np.uint64(5)
            for key, value in (("data", np.ones(5)), ("ir", np.arange(5, dtype=np.uint64)),
                               ("jc", np.arange(6, dtype=np.uint64))):
                group.create_dataset(key, data=value)
        else:
            dset = h5.create_dataset("e", data=np.zeros(2, np.uint64))
            dset.attrs["MATLAB_class"] = np.bytes_(b"double")
            dset.attrs["MATLAB_empty"] = np.uint8(1)


@pytest.mark.parametrize("kind, v5_value, name, words", [
    ("struct", {"a": 1.0}, "s", ["s (1x1 struct)"]),
    ("sparse", scipy.sparse.eye(5).tocsc(), "sp", ["sp (5x5 sparse)"]),
    ("empty", np.zeros((0, 0)), "e", ["e (0x0 double)"]),
])
def test_matlab_v73_structs_sparse_and_empty_read_like_v5(tmp_path, kind, v5_value, name, words):
    v5, v73 = tmp_path / "v5.mat", tmp_path / "v73.mat"
    scipy.io.savemat(v5, {name: v5_value})
    _v73_with_group(v73, kind)
    reasons = []
    for path in (v5, v73):
        with pytest.raises(Exception) as info:
            open_export(path)
        reasons.append(info.value.reason)
        assert all(w in info.value.reason for w in words), info.value.reason
    assert reasons[0] == reasons[1]
    for path in (v5, v73):
        with pytest.raises(Exception) as info:
            with open_export(path, var=name) as reader:
                list(reader)
        reason = info.value.reason
        assert name in reason and ("empty" in reason or "not a numeric" in reason), reason


# ------------------------------------------------------------------------- plausibility and units

def _cell_nm(px=0.2, peak=450.0, radius_um=5.0, size=96):
    y, x = np.mgrid[:size, :size] * px
    centre = size * px / 2
    return (peak * np.sqrt(np.clip(1 - ((x - centre) ** 2 + (y - centre) ** 2) / radius_um ** 2, 0, None))
            + np.random.default_rng(1).normal(0, 2, (size, size))).astype(np.float32)


@pytest.mark.parametrize("factor, options, words", [
    (1.0, ["--units", "nm", "--pixel-size-um", "10"], ["dry mass", "pixel size too large"]),
    (1.0, ["--units", "um", "--pixel-size-um", "0.2"], ["peak OPD", "(um or rad given for nm?)"]),
    (1e-3, ["--units", "nm", "--pixel-size-um", "0.2"], ["peak OPD", "wrong --units (nm given for um?)"]),
])
def test_implausible_cells_are_refused_with_the_likely_cause(tmp_path, ingest, factor, options, words):
    np.save(tmp_path / "cell.npy", _cell_nm() * factor)
    status, masses, err = ingest(tmp_path / "cell.npy", *options)
    assert status == 2 and masses.size == 0
    one_line_naming(err, "cell.npy", "implausible cell", *words)


def test_an_expert_widens_a_range(tmp_path, ingest):
    np.save(tmp_path / "cell.npy", _cell_nm())
    status, _, err = ingest(tmp_path / "cell.npy", "--units", "nm", "--pixel-size-um", "1.5")
    assert status == 2 and "implausible" in err
    status, masses, err = ingest(tmp_path / "cell.npy", "--units", "nm", "--pixel-size-um", "1.5",
                                 "--plausible", "dry_mass_pg=1:50000", "--plausible", "area_um2=1:1e6",
                                 "--plausible", "diameter_um=1:1000")
    assert status == 0 and masses[0] > 5000, err
    status, _, err = ingest(tmp_path / "cell.npy", "--units", "nm", "--pixel-size-um", "0.2",
                            "--plausible", "mass=1:2")
    assert status == 2 and "unknown plausibility range" in err


def test_huge_and_infinite_values_never_reach_the_dataset(tmp_path, ingest):
    huge = _cell_nm() * 1e33
    np.save(tmp_path / "huge.npy", huge)
    inf = _cell_nm()
    inf[:30] = np.inf
    np.save(tmp_path / "inf.npy", inf)
    for name, words in (("huge.npy", ["implausible", "peak OPD"]), ("inf.npy", ["NaN or infinite"])):
        status, masses, err = ingest(tmp_path / name, *NM)
        assert status == 2 and masses.size == 0
        one_line_naming(err, name, *words)


def test_dry_mass_surface_density_units(tmp_path, ingest):
    opd = _cell_nm()
    np.save(tmp_path / "nm.npy", opd)
    np.save(tmp_path / "density.npy", opd / (0.19 * 1000))   # pg/um^2 = OPD(um) / alpha(um^3/pg)
    in_nm = ingest(tmp_path / "nm.npy", *NM)[1][0]
    status, masses, err = ingest(tmp_path / "density.npy", "--units", "pg/um2", "--pixel-size-um", "0.2")
    assert status == 0, err
    assert masses[0] == pytest.approx(in_nm, rel=1e-3)
