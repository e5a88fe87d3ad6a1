"""Readers for microscope exports: one class per format, each streaming 2-D maps as :class:`RawMap`.

Formats: MATLAB v4/v5 ``.mat`` (scipy.io) and v7.3 ``.mat`` (HDF5, h5py), ``.npy`` (memory-mapped),
``.npz``, TIFF (single and multi-page, tifffile; Phasics SID4Bio exports via qpformat), qpimage HDF5
images and series, and raw off-axis holograms (qpretrieve). :func:`open_export` picks the reader whose
cheap :meth:`Reader.verify` sniff (suffix + magic bytes) accepts the file.

Conventions: a 2-D array is one map, a 3-D array a stack along ``stack_axis`` (default: last axis for
MATLAB ``H x W x N``, first axis for NumPy/TIFF ``N x H x W``). Complex arrays are optical fields and
become unwrapped phase in radians; holograms are reconstructed to unwrapped phase in radians.
Every failure is an :class:`~opdcells.errors.ExportError` naming the file and the reason.
"""
from __future__ import annotations

import abc
import contextlib
import importlib
import logging
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import scipy.io
import tifffile
from scipy.io.matlab import matfile_version
from skimage.restoration import unwrap_phase

from .errors import ExportError, MetadataError, OPDCellsError
from .metadata import Meta

log = logging.getLogger(__name__)

#: Scalar variables (``.mat``/``.npz``) that carry acquisition metadata rather than maps.
META_VARIABLES = ("wavelength_nm", "pixel_size_um", "medium_index", "units")
#: Variable holding the background hologram beside a raw hologram (qpimage convention).
BACKGROUND_VARIABLE = "bg_data"
#: MATLAB classes that hold numbers (``logical``, ``char``, cells, structs and sparse do not count).
MATLAB_NUMERIC = frozenset({"double", "single", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                            "int64", "uint64"})
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MAT73_USERBLOCK = 512
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
PHASICS_XML_TAG = 61238      # Phasics SID4Bio acquisition XML, present on every page
PHASICS_MAX_TAG = 61242      # value of the largest sample
PHASICS_MIN_TAG = 61243      # value of the smallest sample
PHASICS_OPD_PAGE = 2         # page 0: intensity, 1: OPD in wavelengths, 2: OPD in nm (as in qpformat)

#: What the libraries raise for unreadable content; turned into ExportError by :func:`_reading`. Every
#: Exception: damaged files make them raise far more than the documented kinds (fuzzing found
#: struct.error, zlib.error, RuntimeError and SystemError from h5py, SyntaxError from a .npy header).
_LIBRARY_ERRORS = (Exception,)


@dataclass
class RawMap:
    """One map as stored in the file (phase unwrapped), with what the file says about it."""

    data: np.ndarray
    index: int
    meta: Meta


class Variable(NamedTuple):
    """A named array in a container file (``.mat``, ``.npz``), described without reading it."""

    name: str
    shape: tuple[int, ...]
    type: str
    numeric: bool

    def __str__(self) -> str:
        return f"{self.name} ({'x'.join(map(str, self.shape))} {self.type})"


# --------------------------------------------------------------------------------------------------
# Generic helpers shared by every reader
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _reading(path, action: str):
    """Turn a library's exception while doing ``action`` into an ExportError naming ``path``."""
    try:
        yield
    except OPDCellsError:
        raise
    except _LIBRARY_ERRORS as exc:
        raise ExportError(path, f"{action}: {type(exc).__name__}: {exc}") from exc


def _import_quietly(module: str):
    """Import a QPI library, silencing its warnings about unavailable optional GPU back-ends."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Interface .* unavailable", category=UserWarning)
        return importlib.import_module(module)


def _head(path, size: int = 132) -> bytes:
    """First ``size`` bytes of a file."""
    with open(path, "rb") as fh:
        return fh.read(size)


def stack_axis_of(shape: tuple[int, ...], stack_axis: int | None, default_axis: int, path,
                  label: str = "array") -> int | None:
    """Axis along which ``shape`` stacks its 2-D maps (None for a single 2-D map).

    Raises ExportError for an empty array, a rank other than 2 or 3, or an out-of-range ``stack_axis``.
    """
    shape = tuple(shape)
    if len(shape) not in (2, 3):
        raise ExportError(path, f"{label} has shape {shape}: expected a 2-D map or a 3-D stack of maps, "
                                f"not a {len(shape)}-D array")
    if 0 in shape:
        raise ExportError(path, f"{label} is empty (shape {shape})")
    if len(shape) == 2:
        return None
    axis = default_axis if stack_axis is None else stack_axis
    if not -3 <= axis < 3:
        raise ExportError(path, f"stack_axis={stack_axis} is out of range for the 3-D {label} {shape}")
    return axis % 3


def iter_maps(array, axis: int | None) -> Iterator[np.ndarray]:
    """Yield the 2-D maps of an array-like (ndarray, memmap, h5py dataset, ...) one at a time."""
    if axis is None:
        yield np.asarray(array[()])
        return
    for i in range(array.shape[axis]):
        yield np.asarray(array[(slice(None),) * axis + (i,)])


def field_to_phase(field: np.ndarray) -> np.ndarray:
    """Unwrapped phase (rad) of a complex field (skimage), shifted by the multiple of 2 pi that
    brings the median of the image border nearest to zero."""
    phase = unwrap_phase(np.angle(field))
    border = np.concatenate([phase[0], phase[-1], phase[1:-1, 0], phase[1:-1, -1]])
    return phase - 2 * np.pi * np.round(np.median(border) / (2 * np.pi))


def as_map(values: np.ndarray) -> np.ndarray:
    """A stored 2-D map as a new, writable float64 array: complex fields become unwrapped phase (rad)."""
    if np.iscomplexobj(values):
        return field_to_phase(values)
    return np.array(values, dtype=np.float64)    # a copy: never a view into a read-only memory map


def reconstruct_hologram(hologram: np.ndarray, background: np.ndarray | None = None,
                         **qpretrieve_kw) -> np.ndarray:
    """Unwrapped phase (rad) of an off-axis hologram (qpretrieve), referenced to the background
    hologram's field when one is given (processed with the same sideband and filter)."""
    qpretrieve = _import_quietly("qpretrieve")
    holo = qpretrieve.OffAxisHologram(data=hologram, **qpretrieve_kw)
    holo.run_pipeline()
    field = holo.get_data_with_input_layout("field")
    if background is not None:
        bg = qpretrieve.OffAxisHologram(data=background, **qpretrieve_kw)
        bg.process_like(holo)
        field = field / bg.get_data_with_input_layout("field")
    return field_to_phase(field)


def choose_variable(path, variables: list[Variable], var: str | None) -> Variable:
    """The variable named ``var``, else the single numeric 2-D/3-D array that is not metadata."""
    by_name = {v.name: v for v in variables}
    if var is not None:
        if var not in by_name:
            raise ExportError(path, f"no variable {var!r}; the file holds: "
                                    + (", ".join(map(str, variables)) or "nothing"))
        chosen = by_name[var]
        if not chosen.numeric:
            raise ExportError(path, f"variable {chosen} is not a numeric array")
        return chosen
    candidates = [v for v in variables if v.numeric and len(v.shape) in (2, 3)
                  and sum(d > 1 for d in v.shape) >= 2
                  and v.name not in META_VARIABLES and v.name != BACKGROUND_VARIABLE]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ExportError(path, "no numeric 2-D or 3-D array in the file; it holds: "
                                + (", ".join(map(str, variables)) or "nothing"))
    raise ExportError(path, "several candidate maps, choose one with var=NAME (--var): "
                            + ", ".join(map(str, candidates)))


def meta_from_variables(values: dict[str, Any], path) -> Meta:
    """Meta from scalar metadata variables (``wavelength_nm``, ``pixel_size_um``, ``medium_index``,
    ``units`` as text); raises MetadataError for non-scalar or invalid values."""
    fields = {}
    for key, value in values.items():
        arr = np.asarray(value)
        try:
            fields[key] = ("".join(arr.ravel().astype(str)).strip().lower() if key == "units"
                           else float(arr.item()))
        except (ValueError, TypeError) as exc:
            raise MetadataError(path, f"metadata variable {key!r} is not a scalar "
                                      f"(shape {arr.shape}, {arr.dtype})") from exc
    try:
        return Meta(**fields)
    except ValueError as exc:
        raise MetadataError(path, f"invalid metadata in the file: {exc}") from exc


def meta_from_qpimage(meta: dict, path) -> Meta:
    """Meta (units rad) from qpimage metadata, which is in SI units (wavelength and pixel size in m)."""
    def known(key, scale=1.0):
        value = meta.get(key)   # 12 significant digits: 1.39e-07 m -> 0.139 um, not 0.13899999999999998
        return None if value is None or not np.isfinite(value) else float(f"{float(value) * scale:.12g}")
    try:
        return Meta(units="rad", wavelength_nm=known("wavelength", 1e9),
                    pixel_size_um=known("pixel size", 1e6), medium_index=known("medium index"))
    except ValueError as exc:
        raise MetadataError(path, f"invalid qpimage metadata: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Reader base classes
# --------------------------------------------------------------------------------------------------

class Reader(abc.ABC):
    """Abstract base class: one subclass per export format (see docs/architecture.md)."""

    name: str = ""
    suffixes: tuple[str, ...] = ()

    def __init__(self, path, *, var: str | None = None, stack_axis: int | None = None):
        self.path = Path(path)
        self.var = var
        self.stack_axis = stack_axis
        self.variable: str | None = None        # name of the variable read, for container formats
        self.file_meta = Meta()
        #: True when the reader itself fixes the units (phase in rad from complex fields, holograms,
        #: qpimage; OPD in nm from Phasics): a conflicting user ``units`` is then refused by ingest.
        self.units_fixed = False
        self._resources = contextlib.ExitStack()

    @classmethod
    def verify(cls, path) -> bool:
        """Cheap sniff: the suffix is one of ours and the content looks like our format. Never raises."""
        try:
            return Path(path).suffix.lower() in cls.suffixes and cls._sniff(Path(path))
        except Exception as exc:  # a sniff must never raise, whatever the file holds
            log.debug("%s: %s sniff failed: %s", path, cls.name, exc)
            return False

    @classmethod
    @abc.abstractmethod
    def _sniff(cls, path: Path) -> bool:
        """Whether the content of ``path`` looks like this format (may raise; ``verify`` catches)."""

    @property
    @abc.abstractmethod
    def map_shape(self) -> tuple[int, int]:
        """(rows, columns) of each map."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of maps in the file."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[RawMap]:
        """Stream the maps one at a time."""

    def close(self) -> None:
        self._resources.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ignore_var(self) -> None:
        if self.var is not None:
            log.debug("%s: var=%r ignored, %s files hold one image stack", self.path, self.var, self.name)


class ArrayReader(Reader):
    """Base class of formats that store an array: subclasses implement :meth:`_open_array`."""

    default_stack_axis = 0

    def __init__(self, path, *, var=None, stack_axis=None):
        super().__init__(path, var=var, stack_axis=stack_axis)
        try:
            with _reading(self.path, f"cannot read the {self.name} file"):
                self._array = self._open_array()
            self.dtype = np.dtype(self._array.dtype)
            label = "array" if self.variable is None else f"variable {self.variable!r}"
            if self.dtype.kind not in "iufc":
                raise ExportError(self.path, f"{label} has dtype {self.dtype}, not numbers")
            self._axis = stack_axis_of(self._array.shape, stack_axis, self.default_stack_axis,
                                       self.path, label)
        except BaseException:
            self.close()
            raise
        if self.dtype.kind == "c":
            self.file_meta = replace(self.file_meta, units="rad")
            self.units_fixed = True
        log.debug("%s: %s, %d map(s) of %s %s", self.path, self.name, len(self), self.map_shape, self.dtype)

    @abc.abstractmethod
    def _open_array(self):
        """Open the file; return the array-like to read (shape, dtype, numpy-style indexing)."""

    def variable_array(self, name: str) -> np.ndarray | None:
        """Another variable of a container file (e.g. the background hologram), None if absent."""
        return None

    @property
    def map_shape(self) -> tuple[int, int]:
        shape = list(self._array.shape)
        if self._axis is not None:
            del shape[self._axis]
        return tuple(shape)

    def __len__(self) -> int:
        return 1 if self._axis is None else self._array.shape[self._axis]

    def raw_maps(self) -> Iterator[np.ndarray]:
        """The stored 2-D maps in their stored dtype, one at a time."""
        with _reading(self.path, f"cannot read a map from the {self.name} file"):
            yield from iter_maps(self._array, self._axis)

    def __iter__(self) -> Iterator[RawMap]:
        for index, values in enumerate(self.raw_maps()):
            yield RawMap(as_map(values), index, self.file_meta)


# --------------------------------------------------------------------------------------------------
# Array formats
# --------------------------------------------------------------------------------------------------

class NpyReader(ArrayReader):
    """NumPy ``.npy``, memory-mapped (``N x H x W`` stacks)."""

    name = "npy"
    suffixes = (".npy",)

    @classmethod
    def _sniff(cls, path):
        return _head(path, len(NPY_MAGIC)) == NPY_MAGIC

    def _open_array(self):
        self._ignore_var()
        return np.load(self.path, mmap_mode="r", allow_pickle=False)


def npz_variables(path) -> list[Variable]:
    """Names, shapes and dtypes of the arrays in an ``.npz``, read from the headers only."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    variables = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                if version in readers:
                    shape, _, dtype = readers[version](fh)
                else:  # rare header versions: read the array itself
                    array = np.lib.format.read_array(fh, allow_pickle=False)
                    shape, dtype = array.shape, array.dtype
            variables.append(Variable(info.filename[:-4], tuple(shape), str(dtype), dtype.kind in "iufc"))
    return variables


class NpzReader(ArrayReader):
    """NumPy ``.npz``: variable ``var``, else the single numeric 2-D/3-D array; metadata variables."""

    name = "npz"
    suffixes = (".npz",)

    @classmethod
    def _sniff(cls, path):
        return _head(path, len(ZIP_MAGIC)) == ZIP_MAGIC

    def _open_array(self):
        variables = npz_variables(self.path)
        self.variable = choose_variable(self.path, variables, self.var).name
        self._npz = self._resources.enter_context(np.load(self.path, allow_pickle=False))
        present = [v.name for v in variables if v.name in META_VARIABLES]
        self.file_meta = meta_from_variables({k: self._npz[k] for k in present}, self.path)
        return self._npz[self.variable]

    def variable_array(self, name):
        return self._npz[name] if name in self._npz.files else None


class MatReader(ArrayReader):
    """MATLAB v4/v5/v7 ``.mat`` (scipy.io); ``H x W x N`` stacks; metadata variables."""

    name = "mat"
    suffixes = (".mat",)
    default_stack_axis = 2

    @classmethod
    def _sniff(cls, path):
        return matfile_version(str(path))[0] in (0, 1)

    def _open_array(self):
        variables = [Variable(name, tuple(shape), cls, cls in MATLAB_NUMERIC)
                     for name, shape, cls in scipy.io.whosmat(str(self.path))]
        self.variable = choose_variable(self.path, variables, self.var).name
        present = [v.name for v in variables if v.name in META_VARIABLES]
        self._values = scipy.io.loadmat(str(self.path), variable_names=[self.variable, *present])
        self.file_meta = meta_from_variables({k: self._values[k] for k in present}, self.path)
        return self._values[self.variable]

    def variable_array(self, name):
        if name not in self._values:
            self._values.update(scipy.io.loadmat(str(self.path), variable_names=[name]))
        return self._values.get(name)


def check_hdf5_self_contained(h5: h5py.File, path) -> None:
    """Raise ExportError if an HDF5 file keeps data outside itself: external links, datasets with
    external raw data, or virtual datasets. Only link and dataset headers are inspected, nothing is
    followed or read, so a link to a FIFO or a device cannot hang the reader."""
    links: list[str] = []
    h5.visititems_links(lambda name, link: links.append(f"{name} -> {link.filename}")
                        if isinstance(link, h5py.ExternalLink) else None)
    if links:
        raise ExportError(path, "HDF5 external links to other files are not read (exports must be "
                                "self-contained): " + ", ".join(links[:3]))
    outside: list[str] = []

    def check(name, obj):
        if isinstance(obj, h5py.Dataset) and (obj.external or obj.is_virtual):
            outside.append(f"{name} ({'virtual' if obj.is_virtual else 'external raw data'})")

    h5.visititems(check)
    if outside:
        raise ExportError(path, "HDF5 datasets stored in other files are not read (exports must be "
                                "self-contained): " + ", ".join(outside[:3]))


class MatlabH5Array:
    """A dataset written by MATLAB v7.3, seen in MATLAB's axis order (HDF5 stores it reversed,
    because MATLAB is column-major); compound (real, imag) datasets read as complex."""

    def __init__(self, dataset: h5py.Dataset):
        self.dataset = dataset
        self.shape = tuple(reversed(dataset.shape))
        names = dataset.dtype.names or ()
        self.dtype = (np.result_type(dataset.dtype["real"], np.complex64)
                      if {"real", "imag"} <= set(names) else dataset.dtype)
        self.matlab_class = _attr_text(dataset.attrs.get("MATLAB_class", b""))

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (len(self.shape) - len(key))
        values = np.asarray(self.dataset[tuple(reversed(key))])
        if values.dtype.names:
            values = values["real"] + 1j * values["imag"]
        return values.T

    def text(self) -> str:
        """A MATLAB char array (UTF-16 code units) as text."""
        return "".join(map(chr, np.asarray(self.dataset[()]).ravel()))


def _attr_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Mat73Reader(ArrayReader):
    """MATLAB v7.3 ``.mat`` (HDF5 with a 512-byte MATLAB header), read lazily with h5py."""

    name = "mat73"
    suffixes = (".mat",)
    default_stack_axis = 2

    @classmethod
    def _sniff(cls, path):
        head = _head(path, MAT73_USERBLOCK + len(HDF5_SIGNATURE))
        return matfile_version(str(path))[0] == 2 and head[MAT73_USERBLOCK:] == HDF5_SIGNATURE

    def _open_array(self):
        h5 = self._resources.enter_context(h5py.File(self.path, "r"))
        self._arrays = {name: MatlabH5Array(obj) for name, obj in h5.items()
                        if isinstance(obj, h5py.Dataset) and not name.startswith("#")}
        variables = [Variable(name, a.shape, a.matlab_class,
                              a.matlab_class in MATLAB_NUMERIC and "MATLAB_empty" not in a.dataset.attrs)
                     for name, a in self._arrays.items()]
        self.variable = choose_variable(self.path, variables, self.var).name
        self.file_meta = meta_from_variables(
            {k: a.text() if a.matlab_class == "char" else a[()]
             for k, a in self._arrays.items() if k in META_VARIABLES}, self.path)
        return self._arrays[self.variable]

    def variable_array(self, name):
        return self._arrays[name][()] if name in self._arrays else None


class _ErrorLog(logging.Handler):
    """Collects the ERROR records of a library logger."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tifffile_errors(path):
    """Raise ExportError for damage tifffile only logs (e.g. a page offset past the end of a truncated
    file, after which it silently lists fewer pages)."""
    errors, logger = _ErrorLog(), logging.getLogger("tifffile")
    logger.addHandler(errors)
    try:
        yield
    finally:
        logger.removeHandler(errors)
    if errors.messages:
        raise ExportError(path, "damaged TIFF file: " + "; ".join(errors.messages))


class TiffPages:
    """The pages of a TIFF as an array-like: ``(N, H, W)`` (or ``(H, W)`` for one page), each page
    read only when indexed."""

    def __init__(self, tif: tifffile.TiffFile, path):
        self.tif = tif
        with _tifffile_errors(path):
            self.pages = list(tif.pages)
        first = self.pages[0]
        for number, page in enumerate(self.pages):
            if page.shape != first.shape or page.dtype != first.dtype:
                raise ExportError(path, f"TIFF page {number} is {page.shape} {page.dtype}, "
                                        f"page 0 is {first.shape} {first.dtype}: not one stack")
        if len(first.shape) != 2:
            raise ExportError(path, f"TIFF pages have shape {first.shape} ({first.samplesperpixel} samples "
                                    f"per pixel, {first.photometric.name}): colour or multi-sample images "
                                    "are not phase maps; write one single-sample page per map")
        self.dtype = first.dtype
        self.shape = first.shape if len(self.pages) == 1 else (len(self.pages), *first.shape)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if len(self.pages) > 1 and len(key) == 1 and isinstance(key[0], int):
            return self.pages[key[0]].asarray()
        return self.tif.asarray(key=range(len(self.pages)))[key]   # other axes: whole file


class TiffReader(ArrayReader):
    """TIFF, single or multi-page (one map per page), float or integer samples."""

    name = "tiff"
    suffixes = (".tif", ".tiff")

    @classmethod
    def _sniff(cls, path):
        return _head(path, 4) in TIFF_MAGICS

    def _open_array(self):
        self._ignore_var()
        tif = self._resources.enter_context(tifffile.TiffFile(self.path))
        return TiffPages(tif, self.path)


# --------------------------------------------------------------------------------------------------
# Formats with their own structure
# --------------------------------------------------------------------------------------------------

class PhasicsTiffReader(Reader):
    """Phasics SID4Bio TIFF export (recognised by qpformat): the page holding OPD in nm."""

    name = "phasics"
    suffixes = (".tif", ".tiff")

    @classmethod
    def _sniff(cls, path):
        if _head(path, 4) not in TIFF_MAGICS:
            return False
        with tifffile.TiffFile(path) as tif:   # cheap pre-check before importing qpformat
            if PHASICS_XML_TAG not in tif.pages[0].tags:
                return False
        fmt = _import_quietly("qpformat.file_formats.fmts_ready.single_phase_phasics_tif")
        return bool(fmt.SinglePhasePhasicsTif.verify(path))

    def __init__(self, path, *, var=None, stack_axis=None):
        super().__init__(path, var=var, stack_axis=stack_axis)
        self._ignore_var()
        with _reading(self.path, "cannot read the Phasics TIFF"):
            with tifffile.TiffFile(self.path) as tif:
                self._shape = tif.pages[PHASICS_OPD_PAGE].shape
            self.file_meta = Meta(units="nm", wavelength_nm=self._wavelength_nm())
            self.units_fixed = True

    def _wavelength_nm(self) -> float | None:
        """Wavelength from the Phasics XML tags (via qpformat), None when absent."""
        fmt = _import_quietly("qpformat.file_formats.fmts_ready.single_phase_phasics_tif")
        try:
            wavelength = fmt.SinglePhasePhasicsTif(self.path).meta_data.get("wavelength")
        except fmt.LoadTifPhasicsError:   # qpformat raises this (a BaseException) without a wavelength
            return None
        return None if wavelength is None else float(wavelength) * 1e9

    @property
    def map_shape(self):
        return tuple(self._shape)

    def __len__(self):
        return 1

    def __iter__(self):
        with _reading(self.path, "cannot read the OPD page of the Phasics TIFF"):
            with tifffile.TiffFile(self.path) as tif:
                page = tif.pages[PHASICS_OPD_PAGE]
                lo, hi = page.tags[PHASICS_MIN_TAG].value, page.tags[PHASICS_MAX_TAG].value
                full_scale = page.tags["MaxSampleValue"].value
                opd = page.asarray() * ((hi - lo) / full_scale) + lo
        yield RawMap(opd.astype(np.float64), 0, self.file_meta)


class QPImageReader(Reader):
    """qpimage HDF5 file (one QPImage) or series (QPSeries): background-corrected phase in rad,
    metadata from the file (SI units)."""

    name = "qpimage"
    suffixes = (".h5", ".hdf5")

    @classmethod
    def _sniff(cls, path):
        return _head(path, len(HDF5_SIGNATURE)) == HDF5_SIGNATURE

    def __init__(self, path, *, var=None, stack_axis=None):
        super().__init__(path, var=var, stack_axis=stack_axis)
        self._ignore_var()
        qpimage = _import_quietly("qpimage")
        try:
            with _reading(self.path, "cannot read the qpimage file"):
                is_series = self._check_layout()
                if is_series:
                    self._series = self._resources.enter_context(
                        qpimage.QPSeries(h5file=self.path, h5mode="r"))
                    self._images = None
                else:
                    self._series = None
                    self._images = [self._resources.enter_context(
                        qpimage.QPImage(h5file=self.path, h5mode="r"))]
                self._n = len(self._series) if is_series else 1
                first = self._image(0)
                self._shape = tuple(first.shape)
                self.file_meta = meta_from_qpimage(first.meta, self.path)
                self.units_fixed = True
        except BaseException:
            self.close()
            raise

    def _check_layout(self) -> bool:
        """True for a QPSeries, False for a single QPImage; ExportError for other HDF5 files."""
        with h5py.File(self.path, "r") as h5:
            if "qpi_0" in h5:
                return True
            if "phase" in h5 and "qpimage version" in h5.attrs:
                return False
        raise ExportError(self.path, "HDF5 file is neither a qpimage image nor a qpimage series "
                                     "(no 'phase' group or 'qpi_0' image)")

    def _image(self, index: int):
        return self._images[index] if self._series is None else self._series.get_qpimage(index)

    @property
    def map_shape(self):
        return self._shape

    def __len__(self):
        return self._n

    def __iter__(self):
        with _reading(self.path, "cannot read an image from the qpimage file"):
            for index in range(len(self)):
                qpi = self._image(index)
                yield RawMap(np.asarray(qpi.pha, dtype=np.float64), index,
                             meta_from_qpimage(qpi.meta, self.path))


class HologramReader(Reader):
    """Raw off-axis holograms reconstructed to unwrapped phase (rad) with qpretrieve.

    Recognised by itself: an ``.npz`` with integer arrays ``data`` and ``bg_data`` (qpimage's layout).
    Any other array file (a 2-D integer image, a stack) is read as holograms with
    ``open_export(path, hologram=True)``; a ``bg_data`` variable beside it is the background hologram.
    """

    name = "hologram"
    suffixes = (".npz",)

    @classmethod
    def _sniff(cls, path):
        if _head(path, len(ZIP_MAGIC)) != ZIP_MAGIC:
            return False
        kinds = {v.name: np.dtype(v.type).kind for v in npz_variables(path)}
        return kinds.get("data") in ("i", "u") and kinds.get(BACKGROUND_VARIABLE) in ("i", "u")

    def __init__(self, path, *, var=None, stack_axis=None, qpretrieve_kw: dict | None = None):
        super().__init__(path, var=var, stack_axis=stack_axis)
        self.qpretrieve_kw = dict(qpretrieve_kw or {})
        source = _open_with(path, [r for r in READERS if r is not HologramReader], var=var,
                            stack_axis=stack_axis)
        self._resources.push(source)
        try:
            self._source = self._check_source(source)
            self._background = self._load_background()
        except BaseException:
            self.close()
            raise
        self.variable = source.variable
        self.file_meta = replace(source.file_meta, units="rad")
        self.units_fixed = True

    def _check_source(self, source: Reader) -> ArrayReader:
        if not isinstance(source, ArrayReader):
            raise ExportError(self.path, f"a {source.name} file holds phase maps, not raw holograms")
        if source.dtype.kind == "c":
            raise ExportError(self.path, "holds complex fields, not raw holograms (read it without hologram)")
        return source

    def _load_background(self) -> np.ndarray | None:
        if self._source.variable == BACKGROUND_VARIABLE:
            return None
        with _reading(self.path, "cannot read the background hologram"):
            background = self._source.variable_array(BACKGROUND_VARIABLE)
        if background is not None and background.shape != self._source.map_shape:
            raise ExportError(self.path, f"background hologram {BACKGROUND_VARIABLE!r} has shape "
                                         f"{background.shape}, holograms {self._source.map_shape}")
        return background

    @property
    def map_shape(self):
        return self._source.map_shape

    def __len__(self):
        return len(self._source)

    def __iter__(self):
        for index, hologram in enumerate(self._source.raw_maps()):
            with _reading(self.path, f"cannot reconstruct hologram {index}"):
                phase = reconstruct_hologram(hologram, self._background, **self.qpretrieve_kw)
            yield RawMap(phase, index, self.file_meta)


# --------------------------------------------------------------------------------------------------
# Choosing a reader
# --------------------------------------------------------------------------------------------------

#: Readers in the order :func:`open_export` tries them (specific formats before generic ones).
READERS: list[type[Reader]] = [MatReader, Mat73Reader, NpyReader, HologramReader, NpzReader,
                               PhasicsTiffReader, TiffReader, QPImageReader]
#: Suffixes (lower case, with the dot) considered exports when walking folders.
EXPORT_SUFFIXES: set[str] = {suffix for reader in READERS for suffix in reader.suffixes}


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ExportError(path, "no such file")
    if not path.is_file():
        raise ExportError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise ExportError(path, "empty file (0 bytes)")
    _check_hdf5_file(path)


#: Offsets where the HDF5 library looks for its signature (0, then user blocks of 512 bytes and up).
HDF5_SIGNATURE_OFFSETS = (0, *(512 << k for k in range(8)))


def _check_hdf5_file(path: Path) -> None:
    """For an HDF5 file (a v7.3 .mat, qpimage, any .h5), :func:`check_hdf5_self_contained` before any
    reader or sniff (qpformat's too) opens it: following an external link into a FIFO blocks forever."""
    with _reading(path, "cannot read the file"):
        head = _head(path, HDF5_SIGNATURE_OFFSETS[-1] + len(HDF5_SIGNATURE))
    if not any(head[o:o + len(HDF5_SIGNATURE)] == HDF5_SIGNATURE for o in HDF5_SIGNATURE_OFFSETS):
        return
    try:
        h5 = h5py.File(path, "r")
    except Exception:  # noqa: BLE001 - unreadable: the reader that takes the file says why
        return
    with h5, _reading(path, "cannot read the HDF5 file"):
        check_hdf5_self_contained(h5, path)


def _open_with(path, readers: list[type[Reader]], **kwargs) -> Reader:
    """Open ``path`` with the first of ``readers`` whose sniff accepts it."""
    path = Path(path)
    _check_file(path)
    for reader in readers:
        if reader.verify(path):
            return reader(path, **kwargs)
    suffix = path.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise ExportError(path, f"unsupported file type {suffix or '(no suffix)'!r}; readable: "
                                + ", ".join(sorted(EXPORT_SUFFIXES)))
    with _reading(path, "cannot read the file"):
        head = _head(path, 16)
    raise ExportError(path, f"content is not a readable {suffix} file (it starts with {head!r})")


def open_export(path: str | os.PathLike, *, var: str | None = None, stack_axis: int | None = None,
                hologram: bool = False) -> Reader:
    """Open a microscope export with the reader whose sniff accepts it.

    ``var``: variable to read from ``.mat``/``.npz``; ``stack_axis``: axis of a 3-D stack;
    ``hologram``: read the images as raw off-axis holograms and reconstruct their phase.
    """
    if hologram:
        return HologramReader(path, var=var, stack_axis=stack_axis)
    return _open_with(path, READERS, var=var, stack_axis=stack_axis)


def describe(path: str | os.PathLike, **kwargs) -> dict:
    """Format, number of maps, map shape, variable read and file metadata of an export (for the CLI).

    ``kwargs`` are those of :func:`open_export`.
    """
    with open_export(path, **kwargs) as reader:
        return {"path": str(path), "format": reader.name, "n_maps": len(reader),
                "shape": tuple(int(n) for n in reader.map_shape), "variable": reader.variable,
                "meta": reader.file_meta.as_dict()}
