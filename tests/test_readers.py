"""Tests of opdcells.readers on synthetic files (written to tmp_path) and on the real QPI data."""
from __future__ import annotations

import zipfile

import h5py
import numpy as np
import pytest
import scipy.io
import tifffile
from scipy import ndimage

from opdcells.errors import ExportError, MetadataError
from opdcells.metadata import Meta
from opdcells.readers import (
    EXPORT_SUFFIXES,
    READERS,
    HologramReader,
    Mat73Reader,
    MatReader,
    NpyReader,
    NpzReader,
    PhasicsTiffReader,
    TiffReader,
    open_export,
)

MATLAB_CLASSES = {"float64": "double", "float32": "single", "int16": "int16", "uint8": "uint8",
                  "uint16": "uint16", "int32": "int32"}


# ------------------------------------------------------------------------------------------ helpers

def write_mat73(path, variables: dict) -> None:
    """Write a MATLAB v7.3-style file: HDF5 with a 512-byte MATLAB header, arrays stored transposed
    (MATLAB is column-major), ``MATLAB_class`` attributes, text as uint16 char, complex as compound."""
    with h5py.File(path, "w", userblock_size=512) as h5:
        for name, value in variables.items():
            if isinstance(value, str):
                data, cls = np.array([[ord(c) for c in value]], dtype=np.uint16), "char"
            else:
                data = np.atleast_2d(np.asarray(value))
                cls = MATLAB_CLASSES[data.real.dtype.name]
                if np.iscomplexobj(data):
                    compound = np.empty(data.shape, dtype=[("real", "<f8"), ("imag", "<f8")])
                    compound["real"], compound["imag"] = data.real, data.imag
                    data = compound
            h5.create_dataset(name, data=data.T)
            h5[name].attrs["MATLAB_class"] = np.bytes_(cls)
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as fh:
        fh.write(header.ljust(512, b"\x00"))


def write_npy(path, array):
    np.save(path, array)


def write_npz(path, array):
    np.savez(path, phase=array)


def write_mat(path, array):
    scipy.io.savemat(path, {"phase": array})


def write_mat73_phase(path, array):
    write_mat73(path, {"phase": array})


def bump(shape, peak, sigma_frac=0.15):
    """A smooth Gaussian bump of height ``peak`` centred in an image of ``shape``."""
    rows, cols = np.indices(shape)
    r2 = ((rows - shape[0] / 2) / shape[0]) ** 2 + ((cols - shape[1] / 2) / shape[1]) ** 2
    return peak * np.exp(-r2 / (2 * sigma_frac ** 2))


def stack(n=3, shape=(20, 30)):
    """N x H x W stack whose maps all differ (so any axis or transpose mix-up is caught)."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, *shape))


@pytest.fixture(scope="module")
def hl60_field(real_qpi):
    """The real HL60 complex field (112 x 112) from the two text matrices in HL60_field.zip."""
    with zipfile.ZipFile(real_qpi / "hl60_field" / "HL60_field.zip") as zf:
        real = np.loadtxt(zf.open("HL60_real.txt"))
        imag = np.loadtxt(zf.open("HL60_imag.txt"))
    return real + 1j * imag


def read_all(path, **kwargs):
    with open_export(path, **kwargs) as reader:
        return reader, list(reader)


def raises_export_error(path, *words, **kwargs):
    """open_export(path) and iterate; assert an ExportError naming ``path`` with each of ``words``."""
    with pytest.raises(ExportError) as info:
        read_all(path, **kwargs)
    assert info.value.path == str(path)
    for word in words:
        assert word in info.value.reason, info.value.reason
    return info.value


# ------------------------------------------------------------------------------------- MATLAB files

@pytest.mark.parametrize("writer, name", [(scipy.io.savemat, "mat"), (write_mat73, "mat73")])
def test_matlab_stack_is_h_w_n_with_metadata(tmp_path, writer, name):
    maps = stack(4, (20, 30))
    path = tmp_path / "stack.mat"
    writer(path, {"phase": np.moveaxis(maps, 0, -1), "wavelength_nm": 633.0, "pixel_size_um": 0.107,
                  "medium_index": 1.335, "units": "rad"})
    reader, raws = read_all(path)
    assert reader.name == name and reader.variable == "phase"
    assert len(reader) == 4 and reader.map_shape == (20, 30)
    assert reader.file_meta == Meta(units="rad", wavelength_nm=633.0, pixel_size_um=0.107, medium_index=1.335)
    assert [r.index for r in raws] == [0, 1, 2, 3]
    for raw, expected in zip(raws, maps, strict=True):
        assert raw.data.dtype == np.float64
        np.testing.assert_array_equal(raw.data, expected)


@pytest.mark.parametrize("writer", [scipy.io.savemat, write_mat73])
def test_matlab_stack_axis_override(tmp_path, writer):
    array = stack(5, (6, 7))                       # MATLAB 5 x 6 x 7: with stack_axis=0, 5 maps of 6 x 7
    path = tmp_path / "a.mat"
    writer(path, {"phase": array})
    reader, raws = read_all(path, stack_axis=0)
    assert len(raws) == 5
    np.testing.assert_array_equal(raws[2].data, array[2])


def test_mat73_single_map_is_not_transposed(tmp_path):
    image = np.arange(12.0).reshape(3, 4)
    path = tmp_path / "one.mat"
    write_mat73(path, {"img": image, "units": "nm"})
    reader, raws = read_all(path)
    assert len(reader) == 1 and reader.file_meta.units == "nm"
    np.testing.assert_array_equal(raws[0].data, image)


@pytest.mark.parametrize("writer", [scipy.io.savemat, write_mat73])
def test_matlab_variable_choice(tmp_path, writer):
    path = tmp_path / "two.mat"
    a, b = np.ones((8, 9)), np.full((10, 11), 2.0)
    writer(path, {"a": a, "b": b, "wavelength_nm": 532.0})
    error = raises_export_error(path, "var=NAME", "a (8x9", "b (10x11")
    assert "wavelength_nm" not in error.reason      # metadata scalars are not candidates
    _, raws = read_all(path, var="b")
    np.testing.assert_array_equal(raws[0].data, b)
    raises_export_error(path, "no variable 'c'", "a (8x9", var="c")


@pytest.mark.parametrize("writer", [scipy.io.savemat, write_mat73])
def test_matlab_without_a_map(tmp_path, writer):
    path = tmp_path / "none.mat"
    writer(path, {"v": np.arange(5.0), "s": 3.0})
    raises_export_error(path, "no numeric 2-D or 3-D array", "v (")


def test_mat_4d_variable_is_wrong_rank(tmp_path):
    path = tmp_path / "four.mat"
    scipy.io.savemat(path, {"x": np.zeros((2, 3, 4, 5))})
    raises_export_error(path, "no numeric 2-D or 3-D array", "x (2x3x4x5 double)")
    raises_export_error(path, "variable 'x'", "4-D", var="x")


def test_mat_text_variable_is_not_numbers(tmp_path):
    path = tmp_path / "text.mat"
    scipy.io.savemat(path, {"phase": np.ones((4, 4)), "note": "hello"})
    raises_export_error(path, "note", "not a numeric array", var="note")


@pytest.mark.parametrize("variables, key, words", [
    ({"wavelength_nm": -5.0}, "wavelength_nm", ["-5, not a positive number"]),
    ({"units": "furlongs"}, "units", ["'furlongs', not a unit opdcells knows"]),
    ({"pixel_size_um": np.ones(3)}, "pixel_size_um", ["3 values (1, 1, 1), not one"]),
    ({"units": np.array(["rad", "nm"], dtype=object)}, "units", ["a cell of 2 elements"]),
])
def test_mat_bad_metadata_is_noted_not_fatal(tmp_path, variables, key, words):
    """An unusable metadata variable does not stop the reader (the user's value wins); when the key is
    still missing, the message says what the variable holds."""
    path = tmp_path / "bad_meta.mat"
    scipy.io.savemat(path, {"phase": np.ones((5, 5)), **variables})
    with open_export(path) as reader:
        assert getattr(reader.file_meta, key) is None
        problem = reader.meta_problems[key]
        assert all(w in problem for w in words), problem
    with pytest.raises(MetadataError) as info:
        Meta(units="rad" if key != "units" else None).check(path, {key: problem})
    assert problem in info.value.reason and info.value.path == str(path)


@pytest.mark.parametrize("text, units", [("radians", "rad"), ("Nanometers", "nm"), ("µm", "um"),
                                         ("pg/um^2", "pg/um2")])
def test_units_spellings_of_exports(tmp_path, text, units):
    path = tmp_path / "spelled.mat"
    scipy.io.savemat(path, {"phase": np.ones((5, 5)), "units": text})
    with open_export(path) as reader:
        assert reader.file_meta.units == units and not reader.meta_problems


@pytest.mark.parametrize("number", [1, 2, 3, 4])
def test_real_red_blood_cell_fields_read_through_v5_reader(real_qpi, number):
    path = real_qpi / "rbc_phase_fields" / f"gt_phase{number}.mat"
    assert MatReader.verify(path) and not Mat73Reader.verify(path)
    reader, raws = read_all(path)
    assert (reader.name, reader.variable, len(raws)) == ("mat", "gt_phase", 1)
    data = raws[0].data
    assert data.shape == (256, 256) and data.dtype == np.float64
    assert -1.0 < data.min() < -0.3 and 2.5 < data.max() < 3.3      # radians, as SOURCES.md states


# ---------------------------------------------------------------------------------- NumPy and TIFF

def test_npy_stack_is_memory_mapped(tmp_path):
    maps = stack(3, (9, 11)).astype(np.float32)
    path = tmp_path / "s.npy"
    np.save(path, maps)
    with open_export(path) as reader:
        assert reader.name == "npy" and isinstance(reader._array, np.memmap)   # bounded memory
        raws = list(reader)
    assert len(raws) == 3 and raws[1].data.dtype == np.float64 and raws[1].data.flags.writeable
    np.testing.assert_array_equal(raws[1].data, maps[1])
    _, by_column = read_all(path, stack_axis=2)
    assert len(by_column) == 11 and by_column[0].data.shape == (3, 9)


def test_npz_variables_integers_and_metadata(tmp_path):
    path = tmp_path / "m.npz"
    counts = np.arange(30, dtype=np.int16).reshape(5, 6)
    np.savez(path, opd=counts, mask=np.ones((5, 6), bool), units=np.array("nm"), pixel_size_um=0.2)
    reader, raws = read_all(path)
    assert (reader.name, reader.variable) == ("npz", "opd")        # the boolean mask is no candidate
    assert reader.file_meta == Meta(units="nm", pixel_size_um=0.2)
    np.testing.assert_array_equal(raws[0].data, counts.astype(float))


def test_npz_several_maps_need_var(tmp_path):
    path = tmp_path / "two.npz"
    np.savez(path, first=np.ones((4, 4)), second=np.zeros((2, 4, 4)))
    raises_export_error(path, "first (4x4 float64)", "second (2x4x4 float64)")
    reader, raws = read_all(path, var="second")
    assert len(raws) == 2


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_tiff_single_and_multi_page(tmp_path, dtype):
    maps = (stack(3, (16, 12)) * 100 + 1000).astype(dtype)
    single, multi = tmp_path / "one.tif", tmp_path / "many.tiff"
    tifffile.imwrite(single, maps[0])
    with tifffile.TiffWriter(multi) as tif:
        for page in maps:
            tif.write(page)
    assert TiffReader.verify(single) and not PhasicsTiffReader.verify(single)
    reader, raws = read_all(single)
    assert (reader.name, len(raws)) == ("tiff", 1)
    np.testing.assert_array_equal(raws[0].data, maps[0].astype(float))
    reader, raws = read_all(multi)
    assert (reader.name, len(reader), reader.map_shape) == ("tiff", 3, (16, 12))
    for raw, expected in zip(raws, maps, strict=True):
        np.testing.assert_array_equal(raw.data, expected.astype(float))
    _, by_row = read_all(multi, stack_axis=1)
    assert len(by_row) == 16
    np.testing.assert_array_equal(by_row[5].data, maps[:, 5, :].astype(float))


def test_colour_tiff_is_refused_unless_a_channel_is_named(tmp_path):
    path = tmp_path / "rgb.tif"
    rgb = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    tifffile.imwrite(path, rgb, photometric="rgb")
    raises_export_error(path, "3 samples per pixel (RGB)", "--channel K (0 to 2)")
    reader, raws = read_all(path, channel=1)
    assert len(raws) == 1 and reader.integer_samples
    np.testing.assert_array_equal(raws[0].data, rgb[..., 1])
    raises_export_error(path, "--channel 3 is out of range", channel=3)


def test_real_phasics_tiff_is_opd_in_nm(real_qpi):
    path = real_qpi / "phasics_opd" / "single_phasics.tif"
    assert PhasicsTiffReader.verify(path) and READERS.index(PhasicsTiffReader) < READERS.index(TiffReader)
    reader, raws = read_all(path)
    assert reader.name == "phasics" and len(raws) == 1
    assert reader.file_meta.units == "nm" and reader.file_meta.wavelength_nm == pytest.approx(550.0)
    data = raws[0].data
    assert data.shape == (80, 120)
    assert data.min() == pytest.approx(427, abs=1) and data.max() == pytest.approx(792, abs=1)


# --------------------------------------------------------------------------------------- qpimage

def test_real_qpimage_series(real_qpi):
    path = real_qpi / "hl60_qlsi_series" / "series.h5"
    reader, raws = read_all(path)
    assert reader.name == "qpimage" and len(reader) == 140 and len(raws) == 140
    expected = Meta(units="rad", wavelength_nm=647.0, pixel_size_um=0.139, medium_index=1.335)
    assert reader.file_meta == expected
    assert all(r.data.shape == (140, 140) and r.meta == expected for r in raws)
    assert [r.index for r in raws] == list(range(140))
    peak = raws[0].data.max()
    assert 2.0 < peak < 4.0 and abs(np.median(raws[0].data[:10])) < 0.2   # a cell over a flat background
    assert not np.array_equal(raws[0].data, raws[70].data)


def test_qpimage_single_file_background_corrected(tmp_path):
    qpimage = pytest.importorskip("qpimage")
    phase = bump((40, 50), 2.0) + 0.5
    path = tmp_path / "single.h5"
    with qpimage.QPImage(data=phase, which_data="phase", h5file=path, h5mode="w", h5dtype="float64",
                         meta_data={"wavelength": 5.5e-7, "pixel size": 2.5e-7, "medium index": 1.33}) as qpi:
        qpi.compute_bg(which_data="phase", fit_offset="mean", fit_profile="offset",
                       border_px=3)
        expected = qpi.pha
    reader, raws = read_all(path)
    assert reader.name == "qpimage" and len(raws) == 1
    assert reader.file_meta == Meta(units="rad", wavelength_nm=550.0, pixel_size_um=0.25, medium_index=1.33)
    np.testing.assert_allclose(raws[0].data, expected)
    assert not np.allclose(raws[0].data, phase)          # the stored background was applied


def test_plain_hdf5_is_not_qpimage(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h5:
        h5["opd"] = np.ones((4, 4))
    raises_export_error(path, "neither a qpimage image nor a qpimage series")


# ---------------------------------------------------------------------------------- complex fields

@pytest.mark.parametrize("writer", [write_npy, write_npz, write_mat, write_mat73_phase])
def test_complex_field_becomes_unwrapped_phase(tmp_path, writer):
    phase = bump((48, 40), 9.0)                   # wraps more than once
    field = 0.8 * np.exp(1j * phase)
    path = tmp_path / ("field" + {write_npy: ".npy", write_npz: ".npz"}.get(writer, ".mat"))
    writer(path, field)
    reader, raws = read_all(path)
    assert reader.file_meta.units == "rad"
    np.testing.assert_allclose(raws[0].data, phase, atol=1e-9)


def test_real_hl60_complex_field(tmp_path, hl60_field):
    npy, mat = tmp_path / "hl60.npy", tmp_path / "hl60.mat"
    np.save(npy, hl60_field)
    scipy.io.savemat(mat, {"field": hl60_field})
    phases = []
    for path in (npy, mat):
        reader, raws = read_all(path)
        assert reader.file_meta.units == "rad" and raws[0].data.shape == (112, 112)
        phases.append(raws[0].data)
    np.testing.assert_allclose(phases[0], phases[1])
    assert phases[0].min() == pytest.approx(-0.3, abs=0.1)
    assert phases[0].max() == pytest.approx(5.4, abs=0.1)


# ---------------------------------------------------------------------------------------- holograms

def test_real_hl60_hologram_shows_one_cell(real_qpi):
    path = real_qpi / "hl60_hologram" / "hologram_cell.npz"
    reader, raws = read_all(path)
    assert (reader.name, len(raws), reader.map_shape) == ("hologram", 1, (200, 210))
    assert reader.file_meta.units == "rad"
    phase = raws[0].data
    border = np.concatenate([phase[:10].ravel(), phase[-10:].ravel()])
    assert abs(np.median(border)) < 0.5 and np.percentile(border, 95) < 1.0   # background near 0
    assert 4.0 < phase.max() < 6.0
    labels, n = ndimage.label(phase > phase.max() / 2)
    sizes = ndimage.sum_labels(np.ones_like(phase), labels, range(1, n + 1))
    assert np.sort(sizes)[-1] > 20 * np.sort(np.r_[0, sizes])[-2]    # one dominant blob
    blob = labels == 1 + np.argmax(sizes)
    centre = np.array(ndimage.center_of_mass(blob))
    assert np.linalg.norm(centre - np.array([100, 105])) < 20       # roughly centred
    diameter_um = 2 * np.sqrt(blob.sum() / np.pi) * 0.107
    assert 8 < diameter_um < 14                                     # an HL60 cell (~12 um)


def fringes(phase, frequency):
    """uint8 off-axis hologram of ``phase`` on a carrier of ``frequency`` (cycles/px, rows and columns),
    with the sign convention of qpretrieve's default sideband."""
    rows, cols = np.indices(phase.shape)
    carrier = 2 * np.pi * (frequency[0] * rows + frequency[1] * cols)
    return np.round(120 + 100 * np.cos(carrier - phase)).astype(np.uint8)


def test_integer_image_read_as_hologram_on_request(tmp_path):
    phase = bump((128, 128), 3.0, sigma_frac=0.1)
    path = tmp_path / "holo.tif"
    tifffile.imwrite(path, fringes(phase, (0.25, 0.125)))
    reader, raws = read_all(path)
    assert reader.name == "tiff"                                   # without hologram=True: an image
    reader, raws = read_all(path, hologram=True)
    assert reader.name == "hologram" and reader.file_meta.units == "rad"
    np.testing.assert_allclose(raws[0].data, phase, atol=0.1)


def test_hologram_pair_uses_background_and_qpretrieve_options(tmp_path):
    phase = bump((128, 128), 3.0, sigma_frac=0.1)
    carrier = (0.23, 0.19)                 # off the FFT grid: the background removes the residual tilt
    pair = tmp_path / "pair.npz"
    np.savez(pair, data=fringes(phase, carrier), bg_data=fringes(np.zeros_like(phase), carrier))
    reader, raws = read_all(pair)
    assert reader.name == "hologram"
    np.testing.assert_allclose(raws[0].data, phase, atol=0.1)
    alone = tmp_path / "alone.npz"
    np.savez(alone, data=fringes(phase, carrier))
    assert read_all(alone)[0].name == "npz"                        # no background: not auto-detected
    reader, raws = read_all(alone, hologram=True)
    assert reader.name == "hologram"
    assert np.abs(raws[0].data - phase).max() > 0.3                # residual carrier tilt without background
    flipped = tmp_path / "flipped.npz"
    np.savez(flipped, data=fringes(-phase, carrier), bg_data=fringes(np.zeros_like(phase), carrier))
    with HologramReader(flipped, qpretrieve_kw={"invert_phase": True}) as reader:
        np.testing.assert_allclose(next(iter(reader)).data, phase, atol=0.1)


def test_hologram_refuses_phase_files(tmp_path, real_qpi):
    raises_export_error(real_qpi / "hl60_qlsi_series" / "series.h5", "qpimage file holds phase maps",
                        hologram=True)
    path = tmp_path / "field.npy"
    np.save(path, np.exp(1j * np.ones((8, 8))))
    raises_export_error(path, "complex fields, not raw holograms", hologram=True)


# ------------------------------------------------------------------------------------ bad files

def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _truncated_npy(p):
    np.save(p / "t.npy", np.ones((50, 50)))
    return _truncate(p / "t.npy")


def _truncated_npz(p):
    np.savez(p / "t.npz", phase=np.ones((50, 50)))
    return _truncate(p / "t.npz")


def _truncated_mat(p):
    scipy.io.savemat(p / "t.mat", {"phase": np.random.default_rng(0).normal(size=(50, 50))})
    return _truncate(p / "t.mat")


def _truncated_tif(p):
    tifffile.imwrite(p / "t.tif", np.ones((5, 50, 50), np.float32))
    return _truncate(p / "t.tif", 0.3)


def _truncated_tif_data(p):
    with tifffile.TiffWriter(p / "d.tif") as tif:
        for value in range(3):
            tif.write(np.full((60, 60), value, np.float32))
    return _truncate(p / "d.tif", 0.9)


def _truncated_h5(p):
    qpimage = pytest.importorskip("qpimage")
    with qpimage.QPImage(data=np.ones((50, 50)), which_data="phase", h5file=p / "t.h5", h5mode="w"):
        pass
    return _truncate(p / "t.h5")


def _text(name):
    def make(p):
        (p / name).write_text("this is not an export\n" * 20)
        return p / name
    return make


def _empty(name):
    def make(p):
        (p / name).write_bytes(b"")
        return p / name
    return make


def _array(name, array):
    def make(p):
        np.save(p / name, array)
        return p / name
    return make


@pytest.mark.parametrize("make, words", [
    (_truncated_npy, ["cannot read the npy file"]),
    (_truncated_npz, ["npz"]),
    (_truncated_mat, ["mat"]),
    (_truncated_tif, ["damaged TIFF file", "offset"]),
    (_truncated_tif_data, ["cannot read a map from the tiff file", "failed to read"]),
    (_truncated_h5, ["cannot read the qpimage file"]),
    (_text("notes.mat"), ["not a readable .mat file", "this is"]),
    (_text("notes.npy"), ["not a readable .npy file"]),
    (_text("notes.tif"), ["not a readable .tif file"]),
    (_text("notes.txt"), ["unsupported file type '.txt'", ".mat"]),
    (_empty("empty.mat"), ["empty file"]),
    (_empty("empty.npy"), ["empty file"]),
    (_empty("empty.tif"), ["empty file"]),
    (_array("line.npy", np.ones(10)), ["1-D array"]),
    (_array("cube.npy", np.ones((2, 3, 4, 5))), ["4-D array"]),
    (_array("nothing.npy", np.ones((0, 5))), ["empty"]),
    (_array("words.npy", np.array([["a", "b"], ["c", "d"]])), ["not numbers"]),
    (_array("objects.npy", np.array([[None, 1], [2, 3]], dtype=object)), ["cannot read the npy file"]),
    (lambda p: p / "missing.npy", ["no such file"]),
    (lambda p: p, ["not a regular file"]),
], ids=lambda value: getattr(value, "__name__", None) if callable(value) else None)
def test_bad_files_raise_export_error(tmp_path, make, words):
    raises_export_error(make(tmp_path), *words)


def test_stack_axis_out_of_range(tmp_path):
    path = tmp_path / "s.npy"
    np.save(path, np.ones((2, 3, 4)))
    raises_export_error(path, "stack_axis=5", stack_axis=5)


def test_verify_never_raises_and_sniffs_content(tmp_path):
    text = _text("x.npy")(tmp_path)
    for reader in READERS:
        for path in (tmp_path, tmp_path / "missing.mat", text, _empty("e.mat")(tmp_path)):
            assert reader.verify(path) is False
    good = _array("ok.npy", np.ones((3, 3)))(tmp_path)
    assert NpyReader.verify(good) and not NpzReader.verify(good) and not MatReader.verify(good)


def test_export_suffixes():
    assert {".mat", ".npy", ".npz", ".tif", ".tiff", ".h5"} <= EXPORT_SUFFIXES
    assert all(s == s.lower() and s.startswith(".") for s in EXPORT_SUFFIXES)


def test_describe(tmp_path):
    from opdcells.describe import describe_export
    from opdcells.ingest import IngestOptions

    path = tmp_path / "d.mat"
    scipy.io.savemat(path, {"phase": np.ones((12, 10, 3)), "units": "RAD", "wavelength_nm": 532.0})
    info = describe_export(path)
    assert (info["format"], info["n_maps"], info["shape"], info["variable"]) == ("mat", 3, (12, 10), "phase")
    assert info["meta"] == {"units": "rad", "wavelength_nm": 532.0, "pixel_size_um": None,
                            "medium_index": None}
    assert info["missing"] == ["pixel_size_um"] and info["error"] is None
    assert describe_export(path, IngestOptions(stack_axis=0))["n_maps"] == 12
    counts = tmp_path / "counts.npy"
    np.save(counts, np.arange(400, dtype=np.uint16).reshape(20, 20))
    assert any("integer samples (uint16)" in note for note in describe_export(counts)["notes"])


@pytest.mark.parametrize("compressed", [True, False])
def test_npz_stack_is_streamed_map_by_map(tmp_path, compressed):
    """Iterating an .npz stack holds about one map in memory, not the archive's array."""
    import tracemalloc

    maps = np.random.default_rng(0).normal(size=(40, 256, 256))     # 40 maps of 512 KiB: 20 MiB
    path = tmp_path / "stack.npz"
    (np.savez_compressed if compressed else np.savez)(path, opd=maps, units=np.array("nm"))
    tracemalloc.start()
    try:
        with open_export(path) as reader:
            for raw in reader:
                np.testing.assert_array_equal(raw.data, maps[raw.index])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert raw.index == 39 and peak < 8 * maps[0].nbytes, peak


@pytest.mark.parametrize("compressed", [True, False])
def test_mat_v5_stack_is_streamed_map_by_map(tmp_path, compressed):
    """Iterating a MATLAB v5/v7 H x W x N stack holds about one map in memory, not the variable."""
    import tracemalloc

    maps = np.random.default_rng(0).normal(size=(256, 200, 40))     # 40 maps of 400 KiB: 16 MiB
    path = tmp_path / "stack.mat"
    scipy.io.savemat(path, {"phase": maps, "units": "rad", "scale": 1.0}, do_compression=compressed)
    tracemalloc.start()
    try:
        with open_export(path) as reader:
            for raw in reader:
                np.testing.assert_array_equal(raw.data, maps[:, :, raw.index])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert raw.index == 39 and peak < 8 * maps[:, :, 0].nbytes, peak
    assert reader.file_meta.units == "rad"


@pytest.mark.parametrize("dtype", [np.complex128, np.float32, np.int16])
def test_mat_v5_stacks_of_every_kind_read_like_loadmat(tmp_path, dtype):
    rng = np.random.default_rng(1)
    maps = (rng.normal(size=(12, 10, 3)) * 100).astype(dtype)
    if np.iscomplexobj(maps):
        maps = maps + 1j * rng.normal(size=maps.shape)
    path = tmp_path / "kind.mat"
    scipy.io.savemat(path, {"phase": maps}, do_compression=True)
    with open_export(path) as reader:
        assert reader.dtype == np.dtype(dtype) and len(reader) == 3
        for i, values in enumerate(reader.raw_maps()):
            np.testing.assert_array_equal(values, maps[:, :, i])
