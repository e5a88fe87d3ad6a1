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
import math
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

from .errors import ExportError, MetadataError, OPDCellsError, is_odd_library_error
from .metadata import UNITS, Meta
from .preprocess import MAX_NONFINITE_FRACTION, fill_nonfinite
from .retrieval import Retrieval, orient_phase

log = logging.getLogger(__name__)

#: Scalar variables (``.mat``/``.npz``) that carry acquisition metadata rather than maps.
META_VARIABLES = ("wavelength_nm", "pixel_size_um", "medium_index", "units")
#: Scalar variables that turn integer samples into values: ``value = offset + scale * sample``.
SCALE_VARIABLES = ("scale", "offset")
#: Spellings of units found in exports, mapped to opdcells' names (see :data:`opdcells.metadata.UNITS`).
UNIT_SYNONYMS = {"rad": "rad", "radian": "rad", "radians": "rad", "nm": "nm", "nanometer": "nm",
                 "nanometers": "nm", "nanometre": "nm", "nanometres": "nm", "um": "um", "µm": "um",
                 "μm": "um", "micron": "um", "microns": "um", "micrometer": "um", "micrometers": "um",
                 "micrometre": "um", "micrometres": "um", "pg/um2": "pg/um2", "pg/um^2": "pg/um2",
                 "pg/µm2": "pg/um2", "pg/µm^2": "pg/um2", "pg/µm²": "pg/um2"}
#: Length units of image calibrations (ImageJ ``unit``, OME ``PhysicalSizeXUnit``) in micrometres.
LENGTH_UNITS_UM = {"um": 1.0, "µm": 1.0, "μm": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
                   "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "m": 1e6}
#: Smallest plausible side (px) of a map in a stack whose side is also shorter than the stack is long:
#: below it the stack axis is almost certainly wrong (a NumPy ``N x H x W`` stack read as ``H x W x N``).
MIN_STACK_MAP_SIDE_PX = 32
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
    """One map as stored in the file (phase unwrapped), with what the file says about it.

    Attributes
    ----------
    data : (H, W) float64 ndarray
        The map in the units of ``meta`` (or of the user's ``--units``): OPD in nm or um, unwrapped phase
        in rad, dry-mass density in pg/um2, or integer samples still to be scaled.
    index : int
        Its position in the file (0-based).
    meta : Meta
        What the file says about it (units, wavelength nm, pixel size um, medium index).
    """

    data: np.ndarray
    index: int
    meta: Meta


@dataclass(frozen=True)
class SampleScale:
    """Linear calibration of integer samples: ``value = offset + scale * sample`` (ImageJ ``c0 + c1 x``).

    Attributes
    ----------
    scale : float
        Value per sample step (in ``units``).
    offset : float
        Value of sample 0.
    units : str or None
        Unit of the calibrated values when the file names it (None otherwise).
    source : str
        Where the calibration was found (for messages).
    """

    scale: float
    offset: float = 0.0
    units: str | None = None
    source: str = "the file"

    def apply(self, samples: np.ndarray) -> np.ndarray:
        """The calibrated values of ``samples``.

        Parameters
        ----------
        samples : array_like
            Integer samples.

        Returns
        -------
        float64 ndarray
            ``offset + scale * samples``, same shape.
        """
        return self.offset + self.scale * np.asarray(samples, dtype=np.float64)


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
    except BaseException as exc:   # qpimage/qpformat derive some of their errors from BaseException
        if not is_odd_library_error(exc):
            raise
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

    Parameters
    ----------
    shape : tuple of int
        The stored array's shape.
    stack_axis : int or None
        The user's axis (negative counts from the end); None takes ``default_axis``.
    default_axis : int
        The format's stack axis.
    path : str or os.PathLike
        What an error names.
    label : str
        How the message names the array.

    Returns
    -------
    int or None
        The axis (0-2), None for a 2-D map.

    Raises
    ------
    ExportError
        For an empty array, a rank other than 2 or 3, or an out-of-range ``stack_axis``.
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


def check_stack_axis(shape: tuple[int, ...], axis: int | None, path, label: str = "array") -> None:
    """Refuse a stack whose maps cannot be cells: narrower than ``MIN_STACK_MAP_SIDE_PX`` and than the
    stack is long (a NumPy ``N x H x W`` stack saved to MATLAB and read as ``H x W x N``, say).

    Parameters
    ----------
    shape : tuple of int
        The stored array's shape.
    axis : int or None
        The stack axis (:func:`stack_axis_of`); None (a 2-D map) passes.
    path : str or os.PathLike
        What an error names.
    label : str
        How the message names the array.

    Raises
    ------
    ExportError
        Naming the axis that would give plausible maps (``--stack-axis``).
    """
    if axis is None:
        return
    sides = [n for i, n in enumerate(shape) if i != axis]
    if min(sides) >= MIN_STACK_MAP_SIDE_PX or min(sides) >= shape[axis]:
        return
    better = int(np.argmin(shape))
    maps_of = " x ".join(str(n) for i, n in enumerate(shape) if i != better)
    hint = (f"; the maps are probably along axis {better} ({shape[better]} maps of {maps_of} px): "
            f"give --stack-axis {better}" if better != axis else "")
    raise ExportError(path, f"{label} {' x '.join(map(str, shape))} read along axis {axis} gives "
                            f"{shape[axis]} maps of {' x '.join(map(str, sides))} px, narrower than a cell"
                            + hint)


def iter_maps(array, axis: int | None) -> Iterator[np.ndarray]:
    """Yield the 2-D maps of an array-like (ndarray, memmap, h5py dataset, ...) one at a time.

    Parameters
    ----------
    array : array-like
        A 2-D map or a 3-D stack with numpy-style indexing.
    axis : int or None
        The stack axis; None for a single 2-D map.

    Yields
    ------
    (H, W) ndarray
        Each map in its stored dtype.
    """
    if axis is None:
        yield np.asarray(array[()])
        return
    for i in range(array.shape[axis]):
        yield np.asarray(array[(slice(None),) * axis + (i,)])


def field_to_phase(field: np.ndarray, path="<array>") -> np.ndarray:
    """Unwrapped phase (rad) of a complex field (skimage), shifted by the multiple of 2 pi that
    brings the median of the image border nearest to zero.

    Non-finite values are dealt with before unwrapping (scikit-image's ``unwrap_phase`` never returns
    on NaN input): a few (at most ``MAX_NONFINITE_FRACTION`` of the pixels) are filled from their
    nearest finite neighbour.

    Parameters
    ----------
    field : (H, W) complex ndarray
        The complex field.
    path : str or os.PathLike
        What an error names.

    Returns
    -------
    (H, W) float64 ndarray
        Unwrapped phase (rad), background near 0.

    Raises
    ------
    ExportError
        When more than ``MAX_NONFINITE_FRACTION`` of the field is NaN or infinite, or the field is zero
        everywhere (a dark hologram, an empty export).
    """
    field = np.asarray(field)
    bad = ~np.isfinite(field)
    if bad.mean() > MAX_NONFINITE_FRACTION:
        raise ExportError(path, f"{bad.mean():.1%} of the complex field is NaN or infinite (at most "
                                f"{MAX_NONFINITE_FRACTION:.0%} can be filled); crop the field to its "
                                "valid aperture before export")
    if bad.any():
        field = fill_nonfinite(field)
    if not np.any(np.abs(field) > 0):
        raise ExportError(path, "the complex field is zero everywhere: no phase to read (a dark "
                                "hologram or an empty export)")
    phase = unwrap_phase(np.angle(field))
    border = np.concatenate([phase[0], phase[-1], phase[1:-1, 0], phase[1:-1, -1]])
    return phase - 2 * np.pi * np.round(np.median(border) / (2 * np.pi))


def as_map(values: np.ndarray, path="<array>") -> np.ndarray:
    """A stored 2-D map as a new, writable float64 array: complex fields become unwrapped phase (rad).

    Parameters
    ----------
    values : (H, W) ndarray
        A stored map (real or complex).
    path : str or os.PathLike
        What an error names.

    Returns
    -------
    (H, W) float64 ndarray
        A copy (never a view into a read-only memory map).

    Raises
    ------
    ExportError
        For an unusable complex field (:func:`field_to_phase`).
    """
    if np.iscomplexobj(values):
        return field_to_phase(values, path)
    return np.array(values, dtype=np.float64)    # a copy: never a view into a read-only memory map


def reconstruct_hologram(hologram: np.ndarray, background: np.ndarray | None = None, path="<array>",
                         **qpretrieve_kw) -> np.ndarray:
    """Unwrapped phase (rad) of an off-axis hologram (qpretrieve), referenced to the background
    hologram's field when one is given (processed with the same sideband and filter).

    Parameters
    ----------
    hologram : (H, W) ndarray
        The raw interferogram (camera counts).
    background : (H, W) ndarray, optional
        A hologram of the empty field of view.
    path : str or os.PathLike
        What an error names.
    **qpretrieve_kw
        Arguments of ``qpretrieve.OffAxisHologram`` (sideband, filter name and size).

    Returns
    -------
    (H, W) float64 ndarray
        Unwrapped phase (rad).

    Raises
    ------
    ExportError
        When the reconstructed field is unusable (:func:`field_to_phase`).
    """
    qpretrieve = _import_quietly("qpretrieve")
    holo = qpretrieve.OffAxisHologram(data=hologram, **qpretrieve_kw)
    holo.run_pipeline()
    field = holo.get_data_with_input_layout("field")
    if background is not None:
        bg = qpretrieve.OffAxisHologram(data=background, **qpretrieve_kw)
        bg.process_like(holo)
        with np.errstate(divide="ignore", invalid="ignore"):
            field = field / bg.get_data_with_input_layout("field")
    return field_to_phase(field, path)


def choose_variable(path, variables: list[Variable], var: str | None) -> Variable:
    """The variable named ``var``, else the single numeric 2-D/3-D array that is not metadata.

    Parameters
    ----------
    path : str or os.PathLike
        The container file, for messages.
    variables : list of Variable
        What the file holds.
    var : str or None
        The user's choice (``--var``).

    Returns
    -------
    Variable

    Raises
    ------
    ExportError
        When ``var`` is absent or not numeric, or, without ``var``, there is no candidate or several.
    """
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


def _unwrap_object(value):
    """The content of a one-element object array (a MATLAB cell ``{'rad'}``), else ``value``."""
    arr = np.asarray(value)
    while arr.dtype == object and arr.size == 1:
        arr = np.asarray(arr.item())
    return arr


def _describe_value(arr: np.ndarray, matlab_class: str | None) -> str:
    """What a metadata variable holds, in words (for messages; never raw object references)."""
    if matlab_class == "string":
        return "a MATLAB string object (save it as a char array, e.g. char(units))"
    if arr.dtype == object or matlab_class in ("cell", "struct"):
        return f"a {matlab_class or 'container'} of {arr.size} elements, not a value"
    if arr.size != 1:
        shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in arr.ravel()[:4].tolist())
        return f"{arr.size} values ({shown}{', ...' if arr.size > 4 else ''}), not one"
    return repr(arr.item())


def _meta_value(key: str, value, matlab_class: str | None):
    """A metadata variable as a Meta value; ValueError with a description when it is unusable."""
    arr = _unwrap_object(value)
    if matlab_class == "string" or arr.dtype == object:
        raise ValueError(_describe_value(arr, matlab_class))
    if key == "units":
        text = "".join(arr.ravel().astype(str)).strip() if arr.dtype.kind in "US" else None
        if text is None or text.lower() not in UNIT_SYNONYMS:
            raise ValueError(f"{text!r}, not a unit opdcells knows ({', '.join(UNITS)})" if text is not None
                             else _describe_value(arr, matlab_class))
        return UNIT_SYNONYMS[text.lower()]
    if arr.size != 1 or arr.dtype.kind not in "iuf":
        raise ValueError(_describe_value(arr, matlab_class))
    number = float(arr.item())
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{number:g}, not a positive number (a placeholder?)")
    return number


def meta_from_variables(values: dict[str, Any], path, classes: dict[str, str] | None = None,
                        ) -> tuple[Meta, dict[str, str]]:
    """Meta from scalar metadata variables (``wavelength_nm``, ``pixel_size_um``, ``medium_index``,
    ``units`` as text, with the usual spellings such as ``'radians'``), and the unusable ones.

    Parameters
    ----------
    values : dict
        Variable name -> stored value (array, text, one-element cell).
    path : path-like
        The file, for messages.
    classes : dict, optional
        Variable name -> MATLAB class (``'string'``, ``'cell'``, ...), to describe what a variable is.

    Returns
    -------
    meta : Meta
        The usable values.
    problems : dict
        Key -> what the unusable variable holds, in words. Not an error here: a value the user gives
        wins, and only a required key that is still missing is refused (:meth:`Meta.check`).
    """
    classes = classes or {}
    fields, problems = {}, {}
    for key, value in values.items():
        try:
            fields[key] = _meta_value(key, value, classes.get(key))
        except (ValueError, TypeError) as exc:
            problems[key] = str(exc)
            log.debug("%s: metadata variable %r unusable: %s", path, key, exc)
    return Meta(**fields), problems


def scale_from_variables(values: dict[str, Any], path) -> SampleScale | None:
    """SampleScale from ``scale`` (and ``offset``) variables of a container file, None without ``scale``.

    Parameters
    ----------
    values : dict
        Variable name -> stored value.
    path : str or os.PathLike
        The file, for messages.

    Returns
    -------
    SampleScale or None

    Raises
    ------
    ExportError
        When they are present but not single finite numbers (or the scale is 0).
    """
    if "scale" not in values:
        return None
    try:
        scale = float(_unwrap_object(values["scale"]).item())
        offset = float(_unwrap_object(values.get("offset", 0.0)).item())
    except (ValueError, TypeError):
        raise ExportError(path, "the file's 'scale'/'offset' variables are not single numbers") from None
    if not (math.isfinite(scale) and scale != 0 and math.isfinite(offset)):
        raise ExportError(path, f"the file's sample scale {scale!r} (offset {offset!r}) is not usable")
    return SampleScale(scale, offset, source="the file's 'scale' variable")


def meta_from_qpimage(meta: dict, path) -> Meta:
    """Meta (units rad) from qpimage metadata, which is in SI units (wavelength and pixel size in m).

    Parameters
    ----------
    meta : dict
        qpimage's metadata (``wavelength`` m, ``pixel size`` m, ``medium index``).
    path : str or os.PathLike
        The file, for messages.

    Returns
    -------
    Meta
        Units rad, wavelength in nm, pixel size in um, medium index; absent values None.

    Raises
    ------
    MetadataError
        For invalid values.
    """
    def known(key, scale=1.0):
        # ``in`` first: qpimage's MetaDict.get raises MetaDataMissingError (a BaseException) for a
        # known key that is absent, e.g. a file without wavelength or medium index
        value = meta[key] if key in meta else None
        # 12 significant digits: 1.39e-07 m -> 0.139 um, not 0.13899999999999998
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
    #: True for readers that retrieve phase from interferograms: they take ``retrieval=`` (a
    #: :class:`~opdcells.retrieval.Retrieval`: sideband and Fourier filter).
    reconstructs: bool = False

    def __init__(self, path, *, var: str | None = None, stack_axis: int | None = None):
        """Open ``path``; subclasses read the file's headers and metadata here, not its maps.

        Parameters
        ----------
        path : str or os.PathLike
            The export file.
        var : str, optional
            Variable to read from a container file (``.mat``, ``.npz``); default: the single numeric 2-D/3-D
            array that is not metadata. Ignored (logged) by formats that hold one image stack.
        stack_axis : int, optional
            Axis of a 3-D stack along which the maps lie (default: the format's, ``N x H x W`` for NumPy and
            TIFF, ``H x W x N`` for MATLAB).

        Raises
        ------
        ExportError
            When the file cannot be read (a library's error, named with the file), holds no numeric array,
            several candidates without ``var``, a stack whose maps are narrower than a cell, or an unusable
            sample scale. (Unusable metadata variables are not an error here: see ``meta_problems``.)
        """
        self.path = Path(path)
        self.var = var
        self.stack_axis = stack_axis
        self.variable: str | None = None        # name of the variable read, for container formats
        self.file_meta = Meta()
        #: True when the reader itself fixes the units (phase in rad from complex fields, holograms,
        #: qpimage; OPD in nm from Phasics): a conflicting user ``units`` is then refused by ingest.
        self.units_fixed = False
        #: Metadata keys whose variable in the file is unusable -> what it holds (see meta_from_variables).
        self.meta_problems: dict[str, str] = {}
        #: Samples are integers (camera counts or scaled values): they need a SampleScale to mean OPD.
        self.integer_samples = False
        #: Calibration of integer samples found in the file (ImageJ, a 'scale' variable), None if none.
        self.sample_scale: SampleScale | None = None
        self._resources = contextlib.ExitStack()

    @classmethod
    def verify(cls, path) -> bool:
        """Cheap sniff: the suffix is one of ours and the content looks like our format. Never raises.

        Parameters
        ----------
        path : str or os.PathLike
            A file.

        Returns
        -------
        bool
        """
        try:
            return Path(path).suffix.lower() in cls.suffixes and cls._sniff(Path(path))
        except BaseException as exc:  # a sniff must never raise, whatever the file holds
            if not isinstance(exc, Exception) and not is_odd_library_error(exc):
                raise
            log.debug("%s: %s sniff failed: %s", path, cls.name, exc)
            return False

    @classmethod
    @abc.abstractmethod
    def _sniff(cls, path: Path) -> bool:
        """Whether the content of ``path`` looks like this format (may raise; ``verify`` catches)."""

    @property
    @abc.abstractmethod
    def map_shape(self) -> tuple[int, int]:
        """(rows, columns) of each map.

        Returns
        -------
        tuple of int
            (H, W) in pixels of the stored map.
        """

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of maps in the file."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[RawMap]:
        """Stream the maps one at a time (the read of a reader: one map in memory at a time).

        Yields
        ------
        RawMap
            Each map, in file order, as (H, W) float64 values in the file's (or the user's) units; unwrapped
            phase (rad) for complex fields and holograms.

        Raises
        ------
        ExportError
            When a map cannot be read (a truncated file, a library's error), naming the file.
        """

    def close(self) -> None:
        """Release the file handles and temporary files the reader holds (also on leaving ``with``)."""
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
        """Open the array (:meth:`_open_array`) and check its dtype, rank and stack axis.

        Parameters
        ----------
        path : str or os.PathLike
            The export file.
        var : str, optional
            Variable to read from a container file (``.mat``, ``.npz``); default: the single numeric 2-D/3-D
            array that is not metadata. Ignored (logged) by formats that hold one image stack.
        stack_axis : int, optional
            Axis of a 3-D stack along which the maps lie (default: the format's, ``N x H x W`` for NumPy and
            TIFF, ``H x W x N`` for MATLAB).

        Raises
        ------
        ExportError
            When the file cannot be read (a library's error, named with the file), holds no numeric array,
            several candidates without ``var``, a stack whose maps are narrower than a cell, or an unusable
            sample scale. (Unusable metadata variables are not an error here: see ``meta_problems``.)
        """
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
            if stack_axis is None:   # an axis the user chose is taken as given
                check_stack_axis(self._array.shape, self._axis, self.path, label)
        except BaseException:
            self.close()
            raise
        if self.dtype.kind == "c":
            self.file_meta = replace(self.file_meta, units="rad")
            self.units_fixed = True
        self.integer_samples = self.dtype.kind in "iu"
        log.debug("%s: %s, %d map(s) of %s %s", self.path, self.name, len(self), self.map_shape, self.dtype)

    @abc.abstractmethod
    def _open_array(self):
        """Open the file; return the array-like to read (shape, dtype, numpy-style indexing)."""

    def _read_meta(self, values: dict[str, Any], classes: dict[str, str] | None = None) -> None:
        """Set file_meta, meta_problems and sample_scale from a container's metadata variables."""
        self.file_meta, self.meta_problems = meta_from_variables(
            {k: v for k, v in values.items() if k in META_VARIABLES}, self.path, classes)
        self.sample_scale = scale_from_variables(values, self.path)

    def variable_array(self, name: str) -> np.ndarray | None:
        """Another variable of a container file (e.g. the background hologram), None if absent.

        Parameters
        ----------
        name : str
            The variable.

        Returns
        -------
        ndarray or None
        """
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
        """The stored 2-D maps in their stored dtype, one at a time.

        Yields
        ------
        (H, W) ndarray
            Each map as stored (integers, floats or complex values; no unit conversion).

        Raises
        ------
        ExportError
            When a map cannot be read, naming the file.
        """
        with _reading(self.path, f"cannot read a map from the {self.name} file"):
            yield from iter_maps(self._array, self._axis)

    def __iter__(self) -> Iterator[RawMap]:
        for index, values in enumerate(self.raw_maps()):
            yield RawMap(as_map(values, self.path), index, self.file_meta)


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


def _npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) from an open ``.npy`` stream, None for header versions not parsed."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    version = np.lib.format.read_magic(fh)
    if version not in readers:
        return None
    shape, fortran_order, dtype = readers[version](fh)
    return tuple(shape), fortran_order, np.dtype(dtype)


def npz_variables(path) -> list[Variable]:
    """Names, shapes and dtypes of the arrays in an ``.npz``, read from the headers only.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.npz`` file.

    Returns
    -------
    list of Variable
    """
    variables = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as fh:
                header = _npy_header(fh)
                if header is None:  # rare header versions: read the array itself
                    array = np.lib.format.read_array(fh, allow_pickle=False)
                    header = (array.shape, False, array.dtype)
            shape, _, dtype = header
            variables.append(Variable(info.filename[:-4], tuple(shape), str(dtype), dtype.kind in "iufc"))
    return variables


class NpzMember:
    """One array of an ``.npz``, decompressed as a stream from its zip member: the maps of a C-order
    ``N x H x W`` stack are read one at a time in order (memory of one map, whatever the archive's
    size); other access (a 2-D map, other axes) reads the array whole."""

    def __init__(self, path: Path, name: str):
        """Read the member's ``.npy`` header.

        Parameters
        ----------
        path : Path
            The ``.npz`` file.
        name : str
            The array's name (its member is ``name.npy``).
        """
        self.path, self.member = path, f"{name}.npy"
        self._zip = self._stream = None
        self._next = 0
        with zipfile.ZipFile(path) as zf, zf.open(self.member) as fh:
            header = _npy_header(fh)
        self._streamable = header is not None and not header[1] and len(header[0]) == 3
        if header is None:
            array = self._whole()
            header = (array.shape, False, array.dtype)
        self.shape, _, self.dtype = header

    def _restart(self) -> None:
        self.close()
        self._zip = zipfile.ZipFile(self.path)
        self._stream = self._zip.open(self.member)
        _npy_header(self._stream)
        self._next = 0

    def _map(self, index: int) -> np.ndarray:
        if self._stream is None or index < self._next:
            self._restart()
        size = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        for _ in range(index - self._next):     # skip maps before ``index`` (a later start)
            self._stream.read(size)
        data = self._stream.read(size)
        if len(data) < size:
            raise EOFError(f"array {self.member!r} ends inside map {index} (truncated file)")
        self._next = index + 1
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape[1:]).copy()

    def _whole(self) -> np.ndarray:
        with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if self._streamable and len(key) == 1 and isinstance(key[0], int) and 0 <= key[0] < self.shape[0]:
            return self._map(key[0])
        return self._whole()[key]

    def close(self) -> None:
        for handle in (self._stream, self._zip):
            if handle is not None:
                handle.close()
        self._zip = self._stream = None


class NpzReader(ArrayReader):
    """NumPy ``.npz``: variable ``var``, else the single numeric 2-D/3-D array; metadata variables;
    stacks streamed map by map.

    See :class:`NpzMember` for the streaming.
    """

    name = "npz"
    suffixes = (".npz",)

    @classmethod
    def _sniff(cls, path):
        return _head(path, len(ZIP_MAGIC)) == ZIP_MAGIC

    def _open_array(self):
        variables = npz_variables(self.path)
        self.variable = choose_variable(self.path, variables, self.var).name
        self._npz = self._resources.enter_context(np.load(self.path, allow_pickle=False))
        self._read_meta({v.name: self._npz[v.name] for v in variables
                         if v.name in META_VARIABLES + SCALE_VARIABLES})
        member = NpzMember(self.path, self.variable)
        self._resources.callback(member.close)
        return member

    def variable_array(self, name):
        return self._npz[name] if name in self._npz.files else None


#: MAT-file v5 element types of numeric data (MAT-File Format, MathWorks, table 1-1) -> NumPy type codes.
MAT5_DATA_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
MAT5_COMPRESSED = 15


class Mat5Stack:
    """A real numeric ``H x W x N`` variable of a MATLAB v5/v7 file whose maps are read one at a time in
    order, from the (zlib-compressed or plain) data element: MATLAB stores arrays column-major, so map
    ``k`` is one contiguous run of ``H * W`` values. Memory holds one map, whatever the file's size.

    Parsing uses scipy's MAT v5 reader for the file and variable headers (``scipy.io.matlab._mio5``);
    anything it cannot stream (complex, sparse, other axes) is read whole by :meth:`whole`.
    """

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype):
        """Find the variable's data element (a complex one is read whole).

        Parameters
        ----------
        path : Path
            The MATLAB v5/v7 file.
        name : str
            The variable.
        shape : tuple of int
            Its ``H x W x N`` shape (``scipy.io.whosmat``).
        dtype : numpy.dtype
            Its NumPy type (``MATLAB_DTYPES`` of its class).
        """
        self.path, self.name, self.shape, self.dtype = path, name, tuple(shape), np.dtype(dtype)
        self._fh = self._data = None
        self._next = 0
        self.streamable = True
        self._open()        # reads the headers: a complex variable (real, then imaginary part) is read whole
        if not self.streamable:
            self.dtype = np.result_type(self.dtype, np.complex64)
            self.close()

    def _open(self) -> None:
        """Position a stream at the variable's real-part data; set ``_data`` to (stream, element dtype)."""
        from scipy.io.matlab import _mio5

        self.close()
        self._fh = open(self.path, "rb")
        reader = _mio5.MatFile5Reader(self._fh)
        reader.initialize_read()
        reader.read_file_header()
        while not reader.end_of_stream():
            mdtype, byte_count = reader._file_reader.read_full_tag()
            next_position = reader.mat_stream.tell() + byte_count
            stream = (_mio5.ZlibInputStream(reader.mat_stream, byte_count) if mdtype == MAT5_COMPRESSED
                      else reader.mat_stream)
            reader._matrix_reader.set_stream(stream)
            if mdtype == MAT5_COMPRESSED:
                byte_count = reader._matrix_reader.read_full_tag()[1]   # the miMATRIX element inside
            start = stream.tell()
            header = reader._matrix_reader.read_header(False)
            if header.name.decode("latin1") == self.name:
                tag = np.frombuffer(stream.read(8), dtype=f"{reader.byte_order}u4")
                element, size = int(tag[0]), int(tag[1])
                if element >> 16 or element not in MAT5_DATA_TYPES:
                    raise EOFError("unexpected layout of the variable's data")
                # an imaginary part follows the real one when the matrix element holds more than that
                if byte_count - (stream.tell() - start) - (size + 7) // 8 * 8 > 0:
                    self.streamable = False
                    return
                self._data = stream, np.dtype(reader.byte_order + MAT5_DATA_TYPES[element])
                self._next = 0
                return
            reader.mat_stream.seek(next_position)
        raise KeyError(f"no variable {self.name!r}")

    def _map(self, index: int) -> np.ndarray:
        if self._data is None or index < self._next:
            self._open()
        stream, stored = self._data
        count = self.shape[0] * self.shape[1]
        for _ in range(index - self._next):     # skip maps before ``index``
            stream.read(count * stored.itemsize)
        raw = stream.read(count * stored.itemsize)
        if len(raw) < count * stored.itemsize:
            raise EOFError(f"variable {self.name!r} ends inside map {index} (truncated file)")
        self._next = index + 1
        values = np.frombuffer(raw, dtype=stored).reshape(self.shape[1], self.shape[0]).T
        return values.astype(self.dtype)

    def whole(self) -> np.ndarray:
        return scipy.io.loadmat(str(self.path), variable_names=[self.name])[self.name]

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if (self.streamable and len(key) == 3 and key[:2] == (slice(None), slice(None))
                and isinstance(key[2], int) and 0 <= key[2] < self.shape[2]):
            return self._map(key[2])
        return self.whole()[key]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = self._data = None


#: NumPy types of MATLAB's numeric classes (what ``whosmat`` names).
MATLAB_DTYPES = {"double": "f8", "single": "f4", "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2",
                 "int32": "i4", "uint32": "u4", "int64": "i8", "uint64": "u8"}


class MatReader(ArrayReader):
    """MATLAB v4/v5/v7 ``.mat`` (scipy.io); ``H x W x N`` stacks (streamed map by map); metadata
    variables."""

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
        chosen = next(v for v in variables if v.name == self.variable)
        present = [v.name for v in variables if v.name in META_VARIABLES + SCALE_VARIABLES]
        if len(chosen.shape) == 3 and matfile_version(str(self.path))[0] == 1:   # v5/v7 stack: streamed
            self._values = scipy.io.loadmat(str(self.path), variable_names=present)
            array = Mat5Stack(self.path, self.variable, chosen.shape, MATLAB_DTYPES[chosen.type])
            self._resources.callback(array.close)
        else:
            self._values = scipy.io.loadmat(str(self.path), variable_names=[self.variable, *present])
            array = self._values[self.variable]
        self._read_meta({k: self._values[k] for k in present}, {v.name: v.type for v in variables})
        return array

    def variable_array(self, name):
        if name not in self._values:
            self._values.update(scipy.io.loadmat(str(self.path), variable_names=[name]))
        return self._values.get(name)


def check_hdf5_self_contained(h5: h5py.File, path) -> None:
    """Raise ExportError if an HDF5 file keeps data outside itself: external links, datasets with
    external raw data, or virtual datasets. Only link and dataset headers are inspected, nothing is
    followed or read, so a link to a FIFO or a device cannot hang the reader.

    Parameters
    ----------
    h5 : h5py.File
        The open file.
    path : str or os.PathLike
        What the error names.

    Raises
    ------
    ExportError
        Naming up to three of the links or datasets stored elsewhere.
    """
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
        """Wrap ``dataset`` (nothing is read).

        Parameters
        ----------
        dataset : h5py.Dataset
            A top-level dataset of a MATLAB v7.3 file.
        """
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


def mat73_variable(name: str, obj) -> Variable:
    """A top-level MATLAB v7.3 object described like ``scipy.io.whosmat`` describes v5 variables:
    structs and sparse matrices (HDF5 groups) by their class, empty arrays with their zero shape.

    Parameters
    ----------
    name : str
        The variable's name.
    obj : h5py.Dataset or h5py.Group
        The object.

    Returns
    -------
    Variable
        Shape in MATLAB's axis order.
    """
    matlab_class = _attr_text(obj.attrs.get("MATLAB_class", b""))
    if isinstance(obj, h5py.Group):
        if "MATLAB_sparse" in obj.attrs:
            columns = len(obj["jc"]) - 1 if "jc" in obj else 0
            return Variable(name, (int(obj.attrs["MATLAB_sparse"]), columns), "sparse", False)
        return Variable(name, (1, 1), matlab_class or "group", False)
    if "MATLAB_empty" in obj.attrs:
        dims = np.asarray(obj[()]).ravel() if obj.size else np.zeros(2, int)
        return Variable(name, tuple(int(d) for d in reversed(dims)), matlab_class,
                        matlab_class in MATLAB_NUMERIC)
    return Variable(name, tuple(reversed(obj.shape)), matlab_class, matlab_class in MATLAB_NUMERIC)


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
        variables = [mat73_variable(name, obj) for name, obj in h5.items() if not name.startswith("#")]
        chosen = choose_variable(self.path, variables, self.var)
        if 0 in chosen.shape:
            raise ExportError(self.path, f"variable {chosen.name!r} is empty (shape {chosen.shape})")
        self.variable = chosen.name
        self._read_meta({k: a.text() if a.matlab_class == "char" else a.dataset[()]
                         for k, a in self._arrays.items() if k in META_VARIABLES + SCALE_VARIABLES},
                        {k: a.matlab_class for k, a in self._arrays.items()})
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


def _single_series(tif: tifffile.TiffFile):
    """The file's one series (its axes: ImageJ, OME, shaped), None for several or an inconsistent one
    (tifffile logs, not raises, a series whose metadata do not match the pages: not damage)."""
    logger = logging.getLogger("tifffile")
    quiet = logging.Filter("opdcells.no-such-logger")   # rejects every record of the tifffile logger
    logger.addFilter(quiet)
    try:
        series = tif.series
        return series[0] if len(series) == 1 and series[0].shape else None
    finally:
        logger.removeFilter(quiet)


def channel_index(path, n: int, channel: int | None, what: str) -> int:
    """The channel to read among ``n``: ``channel`` if in range; ExportError if not given or out of range.

    A second channel (intensity, fluorescence, a mask) is never a map, so a multi-channel file without
    ``--channel`` is refused rather than split into maps.

    Parameters
    ----------
    path : str or os.PathLike
        What an error names.
    n : int
        Channels in the file.
    channel : int or None
        The user's ``--channel``.
    what : str
        What the file holds, in words (for the message).

    Returns
    -------
    int

    Raises
    ------
    ExportError
        When ``channel`` is None or not in ``0 .. n - 1``.
    """
    if channel is None:
        raise ExportError(path, f"holds {what}: a channel (intensity, fluorescence, ...) is never a map; "
                                f"give --channel K (0 to {n - 1}) for the OPD/phase channel")
    if not 0 <= channel < n:
        raise ExportError(path, f"--channel {channel} is out of range: the file holds {what}")
    return channel


class TiffPages:
    """The pages of a TIFF as an array-like: ``(N, H, W)`` (or ``(H, W)`` for one page), each page
    read only when indexed.

    Multi-channel files are read through their axes (tifffile's series: ImageJ hyperstacks, OME-TIFF,
    samples per pixel): only the pages (or samples) of ``channel`` are maps, and without ``channel`` the
    file is refused (:func:`channel_index`).
    """

    def __init__(self, tif: tifffile.TiffFile, path, channel: int | None = None):
        """List the pages and choose those of ``channel`` (no page is read).

        Parameters
        ----------
        tif : tifffile.TiffFile
            The open TIFF.
        path : str or os.PathLike
            What an error names.
        channel : int, optional
            The channel holding the maps in a multi-channel file.

        Raises
        ------
        ExportError
            For a damaged file, pages of different shapes or types, pages that are not single-sample 2-D
            images, or a multi-channel file without a valid ``channel``.
        """
        self.tif = tif
        with _tifffile_errors(path):
            self.pages = list(tif.pages)
        series = _single_series(tif)
        first = self.pages[0]
        for number, page in enumerate(self.pages):
            if page.shape != first.shape or page.dtype != first.dtype:
                raise ExportError(path, f"TIFF page {number} is {page.shape} {page.dtype}, "
                                        f"page 0 is {first.shape} {first.dtype}: not one stack")
        self._sample_axis = self._sample = None
        if len(first.shape) == 3 and "S" in first.axes:
            n = first.shape[first.axes.index("S")]
            self._sample_axis = first.axes.index("S")
            what = f"{n} samples per pixel ({first.photometric.name})"
            self._sample = channel_index(path, n, channel, what)
        elif len(first.shape) != 2:
            raise ExportError(path, f"TIFF pages have shape {first.shape} (axes {first.axes}): "
                                    "write one single-sample page per map")
        elif series is not None:
            self.pages = self._channel_pages(series, len(first.axes), path, channel)
        self.dtype = first.dtype
        page_shape = tuple(n for i, n in enumerate(first.shape) if i != self._sample_axis)
        self.shape = page_shape if len(self.pages) == 1 else (len(self.pages), *page_shape)

    def _channel_pages(self, series, in_page_dims: int, path, channel: int | None) -> list:
        """The pages of ``channel`` when the series has a channel axis ``C`` (ImageJ, OME)."""
        page_axes, page_shape = series.axes[:-in_page_dims], series.shape[:-in_page_dims]
        if "C" not in page_axes or int(np.prod(page_shape)) != len(self.pages):
            return self.pages
        axis = page_axes.index("C")
        n = page_shape[axis]
        if n == 1:
            return self.pages
        k = channel_index(path, n, channel, f"{n} channels (axes {series.axes} {series.shape})")
        order = np.take(np.arange(len(self.pages)).reshape(page_shape), k, axis=axis).ravel()
        return [self.pages[i] for i in order]

    def _page(self, number: int) -> np.ndarray:
        values = self.pages[number].asarray()
        return values if self._sample_axis is None else np.take(values, self._sample, axis=self._sample_axis)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if len(self.pages) > 1 and len(key) == 1 and isinstance(key[0], int):
            return self._page(key[0])
        if len(self.pages) == 1:
            return self._page(0)[key]
        return np.stack([self._page(i) for i in range(len(self.pages))])[key]   # other axes: whole file


def _length_um(value: float, unit: str | None) -> float | None:
    """A length in micrometres, None for an unknown unit or a non-positive value."""
    factor = LENGTH_UNITS_UM.get((unit or "").strip().lower())
    return value * factor if factor is not None and value > 0 and math.isfinite(value) else None


def imagej_meta(tif: tifffile.TiffFile) -> tuple[Meta, SampleScale | None]:
    """Pixel size (``XResolution`` in ImageJ's ``unit``) and the straight-line calibration of sample
    values (``cf=0``: value = c0 + c1 * sample, in ``vunit``) of an ImageJ TIFF.

    Parameters
    ----------
    tif : tifffile.TiffFile
        An open ImageJ TIFF.

    Returns
    -------
    tuple of (Meta, SampleScale or None)
        The pixel size (um; None when the unit is unknown) and units of the calibrated values, and the
        calibration (None without one).
    """
    info = tif.imagej_metadata or {}
    page = tif.pages[0]
    pixel_size_um = None
    resolution = page.tags.get("XResolution")
    if resolution is not None and info.get("unit"):
        numerator, denominator = resolution.value
        if numerator > 0:
            pixel_size_um = _length_um(denominator / numerator, info["unit"])
    scale = None
    units = UNIT_SYNONYMS.get(str(info.get("vunit", "")).strip().lower())
    if info.get("cf") == 0 and "c1" in info:
        scale = SampleScale(float(info["c1"]), float(info.get("c0", 0.0)), units, "the ImageJ calibration")
    return Meta(pixel_size_um=pixel_size_um, units=units if scale else None), scale


def ome_meta(tif: tifffile.TiffFile) -> Meta:
    """Pixel size from OME-XML (``Pixels`` ``PhysicalSizeX`` in ``PhysicalSizeXUnit``, default um).

    Parameters
    ----------
    tif : tifffile.TiffFile
        An open OME-TIFF.

    Returns
    -------
    Meta
        ``pixel_size_um`` (um) when found, else empty.
    """
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.fromstring(tif.ome_metadata or "")
    except ElementTree.ParseError:
        return Meta()
    for element in root.iter():
        if element.tag.endswith("}Pixels") or element.tag == "Pixels":
            size = element.get("PhysicalSizeX")
            if size is not None:
                return Meta(pixel_size_um=_length_um(float(size), element.get("PhysicalSizeXUnit", "um")))
    return Meta()


class TiffReader(ArrayReader):
    """TIFF, single or multi-page (one map per page), float or integer samples; ImageJ hyperstacks and
    OME-TIFF read through their axes (``channel``), pixel size and value calibration from their metadata."""

    name = "tiff"
    suffixes = (".tif", ".tiff")

    def __init__(self, path, *, var=None, stack_axis=None, channel: int | None = None):
        """Open the TIFF (pages, ImageJ/OME metadata) without reading its maps.

        Parameters
        ----------
        path : str or os.PathLike
            The export file.
        var : str, optional
            Variable to read from a container file (``.mat``, ``.npz``); default: the single numeric 2-D/3-D
            array that is not metadata. Ignored (logged) by formats that hold one image stack.
        stack_axis : int, optional
            Axis of a 3-D stack along which the maps lie (default: the format's, ``N x H x W`` for NumPy and
            TIFF, ``H x W x N`` for MATLAB).
        channel : int, optional
            Channel of a multi-channel file (ImageJ, OME, samples per pixel) holding the maps.

        Raises
        ------
        ExportError
            When the file cannot be read (a library's error, named with the file), holds no numeric array,
            several candidates without ``var``, a stack whose maps are narrower than a cell, or an unusable
            sample scale, a damaged TIFF, pages that are not one stack, or a multi-channel file without a
            valid ``channel``. (Unusable metadata variables are not an error here: see ``meta_problems``.)
        """
        self.channel = channel
        super().__init__(path, var=var, stack_axis=stack_axis)

    @classmethod
    def _sniff(cls, path):
        return _head(path, 4) in TIFF_MAGICS

    def _open_array(self):
        self._ignore_var()
        tif = self._resources.enter_context(tifffile.TiffFile(self.path))
        pages = TiffPages(tif, self.path, self.channel)
        meta, self.sample_scale = imagej_meta(tif) if tif.is_imagej else (Meta(), None)
        if tif.is_ome:
            meta = ome_meta(tif).over(meta)
        self.file_meta = meta
        return pages


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
        """Read the OPD page's shape and the wavelength (nm) from the Phasics tags.

        Parameters
        ----------
        path : str or os.PathLike
            The export file.
        var : str, optional
            Variable to read from a container file (``.mat``, ``.npz``); default: the single numeric 2-D/3-D
            array that is not metadata. Ignored (logged) by formats that hold one image stack.
        stack_axis : int, optional
            Axis of a 3-D stack along which the maps lie (default: the format's, ``N x H x W`` for NumPy and
            TIFF, ``H x W x N`` for MATLAB).

        Raises
        ------
        ExportError
            When the file cannot be read.
        """
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
        """Open the qpimage file or series and read the first image's metadata (SI units -> nm, um).

        Parameters
        ----------
        path : str or os.PathLike
            The export file.
        var : str, optional
            Variable to read from a container file (``.mat``, ``.npz``); default: the single numeric 2-D/3-D
            array that is not metadata. Ignored (logged) by formats that hold one image stack.
        stack_axis : int, optional
            Axis of a 3-D stack along which the maps lie (default: the format's, ``N x H x W`` for NumPy and
            TIFF, ``H x W x N`` for MATLAB).

        Raises
        ------
        ExportError
            When the HDF5 file is neither a qpimage image nor a series, or cannot be read.
        MetadataError
            For invalid qpimage metadata.
        """
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
    reconstructs = True

    @classmethod
    def _sniff(cls, path):
        if _head(path, len(ZIP_MAGIC)) != ZIP_MAGIC:
            return False
        kinds = {v.name: np.dtype(v.type).kind for v in npz_variables(path)}
        return kinds.get("data") in ("i", "u") and kinds.get(BACKGROUND_VARIABLE) in ("i", "u")

    def __init__(self, path, *, var=None, stack_axis=None, channel: int | None = None,
                 qpretrieve_kw: dict | None = None, retrieval: Retrieval | None = None):
        """Open the holograms with the reader of their file format, and the background hologram ``bg_data``.

        Parameters
        ----------
        path : str or os.PathLike
            The export file.
        var : str, optional
            Variable to read from a container file (``.mat``, ``.npz``); default: the single numeric 2-D/3-D
            array that is not metadata. Ignored (logged) by formats that hold one image stack.
        stack_axis : int, optional
            Axis of a 3-D stack along which the maps lie (default: the format's, ``N x H x W`` for NumPy and
            TIFF, ``H x W x N`` for MATLAB).
        channel : int, optional
            Channel of a multi-channel file holding the holograms.
        qpretrieve_kw : dict, optional
            Extra ``qpretrieve.OffAxisHologram`` arguments, over those of ``retrieval``.
        retrieval : Retrieval, optional
            Sideband and Fourier filter of the phase retrieval (default:
            :class:`~opdcells.retrieval.Retrieval` with its defaults).

        Raises
        ------
        ExportError
            When the file holds phase maps or complex fields rather than raw holograms, cannot be read, or
            its background hologram's shape differs from the holograms'.
        """
        super().__init__(path, var=var, stack_axis=stack_axis)
        self.retrieval = retrieval or Retrieval()
        self.qpretrieve_kw = {**self.retrieval.qpretrieve_kw(), **(qpretrieve_kw or {})}
        #: sideband (+1/-1) used for each hologram reconstructed so far, by index
        self.sidebands: dict[int, int] = {}
        extra = {} if channel is None else {"channel": channel}
        source = _open_with(path, [r for r in READERS if r is not HologramReader], var=var,
                            stack_axis=stack_axis, **extra)
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
                phase = reconstruct_hologram(hologram, self._background, self.path, **self.qpretrieve_kw)
            phase, self.sidebands[index] = orient_phase(phase, self.retrieval, f"{self.path} [map {index}]")
            yield RawMap(phase, index, self.file_meta)


# --------------------------------------------------------------------------------------------------
# Choosing a reader
# --------------------------------------------------------------------------------------------------

#: Readers in the order :func:`open_export` tries them (specific formats before generic ones).
READERS: list[type[Reader]] = [MatReader, Mat73Reader, NpyReader, HologramReader, NpzReader,
                               PhasicsTiffReader, TiffReader, QPImageReader]
#: Suffixes (lower case, with the dot) considered exports when walking folders.
EXPORT_SUFFIXES: set[str] = {suffix for reader in READERS for suffix in reader.suffixes}
#: Readers used only with ``hologram=True``: their sniff cannot tell holograms from phase maps.
HOLOGRAM_ONLY_READERS: list[type[Reader]] = []


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


def _takes_channel(reader: type[Reader]) -> bool:
    import inspect

    return "channel" in inspect.signature(reader.__init__).parameters


def _open_with(path, readers: list[type[Reader]], **kwargs) -> Reader:
    """Open ``path`` with the first of ``readers`` whose sniff accepts it."""
    path = Path(path)
    _check_file(path)
    retrieval = kwargs.pop("retrieval", None)
    for reader in readers:
        if reader.verify(path):
            if "channel" in kwargs and not _takes_channel(reader):
                raise ExportError(path, f"a {reader.name} file has no channel axis: --channel does not apply")
            return reader(path, **kwargs, **({"retrieval": retrieval} if reader.reconstructs else {}))
    suffix = path.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise ExportError(path, f"unsupported file type {suffix or '(no suffix)'!r}; readable: "
                                + ", ".join(sorted(EXPORT_SUFFIXES)))
    with _reading(path, "cannot read the file"):
        head = _head(path, 16)
    raise ExportError(path, f"content is not a readable {suffix} file (it starts with {head!r})")


def open_export(path: str | os.PathLike, *, var: str | None = None, stack_axis: int | None = None,
                hologram: bool = False, channel: int | None = None,
                retrieval: Retrieval | None = None) -> Reader:
    """Open a microscope export with the reader whose sniff accepts it.

    Parameters
    ----------
    path : str or os.PathLike
        The export file.
    var : str, optional
        Variable to read from ``.mat``/``.npz``.
    stack_axis : int, optional
        Axis of a 3-D stack.
    hologram : bool
        Read the images as raw off-axis holograms and reconstruct their phase (a format that holds
        interferograms by its layout, e.g. qpformat's raw HDF5, is read by its own reader).
    channel : int, optional
        Channel of a multi-channel file (TIFF: ImageJ, OME, samples per pixel) holding the maps.
    retrieval : Retrieval, optional
        Sideband and Fourier filter of the phase retrieval (readers that reconstruct).

    Returns
    -------
    Reader
        Open (a context manager; close it).

    Raises
    ------
    ExportError
        When the file is missing, empty, not a regular file, an HDF5 file with data outside itself, of an
        unsupported type, not readable by any reader, or refused by the reader that takes it.
    MetadataError
        When metadata stored in the file are invalid.
    """
    kwargs = {"var": var, "stack_axis": stack_axis} | ({} if channel is None else {"channel": channel})
    if hologram:
        _check_file(Path(path))
        for reader in [*HOLOGRAM_ONLY_READERS, *(r for r in READERS if r.reconstructs)]:
            if reader.verify(path):
                series = {"hologram": True} if getattr(reader, "holds_exports", False) else {}
                return reader(path, **kwargs, retrieval=retrieval, **series)
        return HologramReader(path, **kwargs, retrieval=retrieval)
    return _open_with(path, READERS, **kwargs, retrieval=retrieval)


def format_table() -> str:
    """The README's table of readable formats, generated from :data:`READERS` (Markdown, one row per
    reader in the order :func:`open_export` tries them, then the readers used only with ``--hologram``).

    Returns
    -------
    str
        The Markdown table (the first paragraph of each reader class's docstring says what it reads).
    """
    rows = ["| reader | suffixes | what it reads | qpformat format |", "|---|---|---|---|"]
    for reader in [*READERS, *HOLOGRAM_ONLY_READERS]:
        what = " ".join((reader.__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "`")
        fmt = f"`{reader.fmt}`" if getattr(reader, "fmt", "") else ""
        rows.append(f"| `{reader.name}` | {', '.join(f'`{s}`' for s in reader.suffixes)} | {what} | {fmt} |")
    return "\n".join(rows) + "\n"


# The qpformat-backed readers and the zip series reader subclass Reader, so their modules are imported
# last; they register themselves in READERS (qpformat's before QPImageReader: its HDF5 layouts are
# recognised by content; the zip series last), EXPORT_SUFFIXES and HOLOGRAM_ONLY_READERS.
from . import readers_archive, readers_qpformat  # noqa: E402, F401, I001
