"""Fuzzing the readers (issue 11 item 5): whatever bytes sit in a file with an export's name, every outcome
of ``open_export`` + iteration, and of ``ingest.iter_processed``, is a map or an OPDCellsError (one line
naming the file), within a time limit. Hypothesis, derandomized so CI sees the same examples each run."""
from __future__ import annotations

import io
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import tifffile
from helpers import tiny_session
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.extra import numpy as hnp

from opdcells.errors import ExportError, OPDCellsError
from opdcells.ingest import IngestOptions, iter_processed
from opdcells.preprocess import PreprocessConfig
from opdcells.readers import EXPORT_SUFFIXES, HDF5_SIGNATURE, NPY_MAGIC, TIFF_MAGICS, ZIP_MAGIC, open_export
from opdcells.simulate import Mat73Stack

LIMIT_S = 5.0   # per example; the slowest legitimate example here takes well under a second
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
OPTIONS = IngestOptions(units="nm", pixel_size_um=0.5, wavelength_nm=633.0,
                        config=PreprocessConfig(out_pixel_size_um=1.0, out_size=32))
MAGICS = (b"", NPY_MAGIC, ZIP_MAGIC, HDF5_SIGNATURE, *TIFF_MAGICS, b"MATLAB 5.0 MAT-file",
          b"MATLAB 7.3 MAT-file".ljust(512, b" ") + HDF5_SIGNATURE)


class Overran(Exception):
    """Raised by the alarm inside an example that runs past LIMIT_S."""


def _overran(signum, frame):
    raise Overran(f"example ran past {LIMIT_S} s")


def outcome(path: Path, *, processed: bool) -> str:
    """Read every map of ``path``; 'maps' or 'error'. Fails the example on any other exception, on a
    map that is not a 2-D float array, on a multi-line error, or on running past LIMIT_S."""
    previous = signal.signal(signal.SIGALRM, _overran)
    signal.setitimer(signal.ITIMER_REAL, LIMIT_S + 1.0, 1.0)   # backstop; the elapsed check is the test
    start = time.perf_counter()
    try:
        if processed:
            options = OPTIONS.replace(units=None) if path.suffix == ".h5" else OPTIONS   # qpimage: rad
            for _index, item, _meta in iter_processed(path, options, on_error=lambda exc: None):
                assert item.opd.shape == (32, 32) and np.isfinite(item.opd).all()
        else:
            with open_export(path) as reader:
                for raw in reader:
                    assert raw.data.ndim == 2 and raw.data.dtype.kind == "f"
        result = "maps"
    except OPDCellsError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path)), str(exc)
        if isinstance(exc, ExportError):
            assert "Overran" not in exc.reason   # the alarm turned into a skip is still a time-out
        result = "error"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.perf_counter() - start < LIMIT_S
    if currently_in_test_context():   # shown by --hypothesis-show-statistics
        event(f"{'processed' if processed else 'read'}: {result}")
    return result


# ------------------------------------------------------------------------------------ valid templates


def cell_map(size=64) -> np.ndarray:
    y, x = np.mgrid[:size, :size] / size - 0.5
    rng = np.random.default_rng(0)
    return (300.0 * np.clip(1 - (x * x + y * y) / 0.09, 0, None) + rng.normal(0, 2, (size, size))).astype(
        np.float32)


def _bytes(write) -> bytes:
    buf = io.BytesIO()
    write(buf)
    return buf.getvalue()


def _mat73_bytes(tmp: Path) -> bytes:
    path = tmp / "template73.mat"
    with Mat73Stack(path, 2, tiny_session("SW480", 1)) as stack:
        for i in range(2):
            stack.write(i, cell_map() / 100.0)
    return path.read_bytes()


def _qpimage_bytes(tmp: Path) -> bytes:
    import qpimage

    path = tmp / "template.h5"
    meta = {"wavelength": 633e-9, "pixel size": 0.5e-6, "medium index": 1.335}
    with qpimage.QPImage(data=cell_map().astype(np.float64) / 100.0, which_data="phase", meta_data=meta,
                         h5file=path, h5mode="w"):
        pass
    return path.read_bytes()


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, bytes]:
    """Valid exports of one cell in each format, as bytes (suffix -> bytes)."""
    tmp = tmp_path_factory.mktemp("templates")
    opd = cell_map()
    return {
        ".npy": _bytes(lambda fh: np.save(fh, np.stack([opd, opd]))),
        ".npz": _bytes(lambda fh: np.savez(fh, phase=opd, pixel_size_um=np.float64(0.5))),
        ".mat": _bytes(lambda fh: scipy.io.savemat(fh, {"phase": opd, "units": "nm"}, do_compression=True)),
        "v73.mat": _mat73_bytes(tmp),
        ".tif": _bytes(lambda fh: tifffile.imwrite(fh, np.stack([opd, opd]))),
        ".h5": _qpimage_bytes(tmp),
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def suffix_of(name: str) -> str:
    return ".mat" if name == "v73.mat" else name


def test_templates_are_readable(templates, work):
    """The fuzzer starts from exports that really are valid (else truncating them would prove nothing)."""
    for name, data in templates.items():
        path = work / f"valid{suffix_of(name)}"
        path.write_bytes(data)
        assert outcome(path, processed=False) == "maps", name
        assert outcome(path, processed=True) == "maps", name


# ------------------------------------------------------------------------------------ fuzz tests


@FUZZ
@given(suffix=st.sampled_from(sorted(EXPORT_SUFFIXES)), magic=st.sampled_from(MAGICS),
       body=st.binary(max_size=4096), processed=st.booleans())
def test_random_bytes_behind_an_export_name(work, suffix, magic, body, processed):
    path = work / f"random{suffix}"
    path.write_bytes(magic + body)
    outcome(path, processed=processed)


#: HDF5 templates are truncated but not altered: the HDF5 C library itself crashes (segmentation fault in
#: H5A attribute reads) or spins on some altered files, which no Python handler or alarm can stop; only
#: reading HDF5 in a separate process with a time limit would contain that.
HDF5_TEMPLATES = ("v73.mat", ".h5")


@FUZZ
@given(data=st.data(), processed=st.booleans())
def test_truncated_and_corrupted_exports(templates, work, data, processed):
    name = data.draw(st.sampled_from(sorted(templates)), label="format")
    raw = bytearray(templates[name])
    cut = data.draw(st.just(len(raw)) | st.integers(1, len(raw)), label="truncate at")
    changes = st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=8)
    flips = [] if name in HDF5_TEMPLATES else data.draw(changes, label="byte changes")
    for position, value in flips:
        raw[position] = value
    path = work / f"damaged{suffix_of(name)}"
    path.write_bytes(bytes(raw[:cut]))
    outcome(path, processed=processed)


#: Sample types and shapes an export could hold: any finite or non-finite value, complex fields with NaN
#: and inf too (readers.field_to_phase fills or refuses them before skimage's unwrap_phase, which would spin
#: forever on a NaN field in a C loop no alarm can interrupt; preprocess refuses implausible OPD).
MAX_VALUE = float(np.finfo(np.float64).max)
REAL_DTYPES = st.sampled_from(["float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32",
                               "uint32", "int64", "uint64", "bool"])
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=12) | hnp.array_shapes(
    min_dims=2, max_dims=3, min_side=1, max_side=48)


@st.composite
def arrays(draw):
    if draw(st.booleans()):
        dtype = np.dtype(draw(REAL_DTYPES))
        top = float(dtype.type(min(MAX_VALUE, float(np.finfo(dtype).max)))) if dtype.kind == "f" else None
        elements = None if top is None else st.floats(-top, top, width=8 * dtype.itemsize) | st.sampled_from(
            [np.nan, np.inf, -np.inf])
    else:
        dtype = np.dtype(draw(st.sampled_from(["complex64", "complex128"])))
        elements = st.complex_numbers(width=8 * dtype.itemsize) | st.sampled_from(
            [complex(np.nan, 0), complex(0, np.inf), complex(np.nan, np.nan)])
    return draw(hnp.arrays(dtype, SHAPES, elements=elements))


def _write(fmt: str, path: Path, array: np.ndarray) -> None:
    if fmt == "npy":
        np.save(path, array)
    elif fmt == "npz":
        np.savez(path, phase=array)
    elif fmt == "mat":
        scipy.io.savemat(path, {"phase": array})
    elif fmt == "tif":
        tifffile.imwrite(path, array)
    else:   # an HDF5 file that is not a qpimage file
        with h5py.File(path, "w") as h5:
            h5["phase"] = array


@FUZZ
@given(fmt=st.sampled_from(["npy", "npz", "mat", "tif", "h5"]), array=arrays(), processed=st.booleans())
def test_odd_dtypes_dims_and_non_finite_values(work, fmt, array, processed):
    path = work / f"odd.{fmt}"
    try:
        _write(fmt, path, array)
    except Exception:   # noqa: BLE001 - the writer itself cannot store this array: not an export
        reject()
    outcome(path, processed=processed)
