"""qpformat as a reader backend: the formats of the quantitative phase imaging community's reader library.

qpformat (https://qpformat.readthedocs.io) knows the file layouts of the field's instruments and
simulations and decodes them to phase (rad) with metadata in SI units, retrieving the phase of raw
interferograms itself (qpimage + qpretrieve). Each qpformat format that opdcells does not read with a
reader of its own becomes one :class:`QPFormatReader` subclass here, registered in
:data:`opdcells.readers.READERS` (or, for formats qpformat recognises only by a loose sniff, used only
with ``--hologram``).

One path per format. Where opdcells and qpformat both read a format, opdcells keeps its own reader:

* qpimage HDF5 images and series: :class:`opdcells.readers.QPImageReader` (qpimage itself, the library
  qpformat calls for these files; it opens the file lazily instead of copying each image);
* Phasics SID4Bio TIFF: :class:`opdcells.readers.PhasicsTiffReader` (recognised by qpformat's own sniff;
  reads the page holding OPD in nm, so it needs no wavelength);
* NumPy ``.npy``: :class:`opdcells.readers.NpyReader` (memory-mapped stacks; qpformat reads one 2-D map);
* single raw off-axis hologram TIFF: :class:`opdcells.readers.HologramReader` with ``--hologram`` (stacks,
  background holograms; qpformat's sniff accepts any one-page TIFF, so it cannot tell holograms from maps);
* folder series: ``load_data.py`` walks folders itself and reads every file with its reader.

Every failure is an :class:`~opdcells.errors.ExportError` naming the file, including the exceptions
qpformat and qpimage raise as ``BaseException`` subclasses (``BadFileFormatError``,
``MetaDataMissingError``, ...).
"""
from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import ExportError
from .readers import RawMap, Reader, _import_quietly, _reading, meta_from_qpimage
from .retrieval import Retrieval, orient_phase

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=64)
def _guess(path: str, mtime_ns: int, size: int) -> str | None:
    """qpformat's format name for ``path`` (its own priority order), None when it knows none."""
    qpformat = _import_quietly("qpformat")
    try:
        return qpformat.core.guess_format(path)
    except qpformat.file_formats.BadFileFormatError:
        return None


def qpformat_format(path: str | os.PathLike) -> str | None:
    """Name of the qpformat format class that recognises ``path`` (e.g. ``"SeriesRawOAHQpformatHDF5"``),
    None when qpformat knows none; never raises (cached per path, modification time and size).

    Parameters
    ----------
    path : str or os.PathLike
        A file.

    Returns
    -------
    str or None
    """
    try:
        stat = os.stat(path)
        return _guess(os.fspath(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
    except Exception as exc:  # noqa: BLE001 - a sniff must never raise
        log.debug("%s: qpformat sniff failed: %s", path, exc)
        return None


class QPFormatReader(Reader):
    """Base class of the readers that delegate to one qpformat format (``fmt``): phase in rad, metadata
    from the file (SI units in qpformat, converted by :func:`~opdcells.readers.meta_from_qpimage`)."""

    #: qpformat format class name (``qpformat.file_formats.formats_dict`` key).
    fmt: str = ""
    #: qpformat's storage type: "raw-oah" formats are off-axis holograms (``--sideband`` applies).
    storage: str = ""
    reconstructs = True

    @classmethod
    def _sniff(cls, path):
        return qpformat_format(path) == cls.fmt

    def __init__(self, path, *, var=None, stack_axis=None, retrieval: Retrieval | None = None):
        """Open the file with qpformat (format ``fmt``) and read the first image's metadata.

        Parameters
        ----------
        path : str or os.PathLike
            The file.
        var : str, optional
            Ignored (logged): these files hold one image series.
        stack_axis : int, optional
            Ignored.
        retrieval : Retrieval, optional
            Sideband and Fourier filter for raw off-axis holograms (``storage == "raw-oah"``).

        Raises
        ------
        ExportError
            When qpformat cannot read the file or it holds no images.
        MetadataError
            For invalid metadata (SI units in the file, converted to nm and um).
        """
        super().__init__(path, var=var, stack_axis=stack_axis)
        self._ignore_var()
        self.retrieval = retrieval or Retrieval()
        qpformat = _import_quietly("qpformat")
        with _reading(self.path, f"qpformat cannot read it as {self.fmt}"):
            kw = self.retrieval.qpretrieve_kw() if self.is_hologram else {}
            self._data = qpformat.load_data(self.path, fmt=self.fmt, qpretrieve_kw=kw, as_type="float64")
            self._n = len(self._data)
            if self._n == 0:
                raise ExportError(self.path, f"the {self.fmt} file holds no images")
            self.file_meta = meta_from_qpimage(self._data.get_metadata(0), self.path)
        self.units_fixed = True
        self._shape: tuple[int, int] | None = None
        #: sideband (+1/-1) used for each hologram read so far, by index
        self.sidebands: dict[int, int] = {}

    @property
    def is_hologram(self) -> bool:
        return self.storage == "raw-oah"

    def member_name(self, index: int) -> str | None:
        """Name of the archive member holding map ``index`` (zip series), None otherwise."""
        files = getattr(self._data, "files", None)
        return str(files[index]) if files is not None and index < len(files) else None

    @property
    def map_shape(self) -> tuple[int, int]:
        if self._shape is None:
            self._shape = self._phase(0).shape
        return self._shape

    def __len__(self) -> int:
        return self._n

    def _phase(self, index: int) -> np.ndarray:
        """The decoded (unwrapped, background-corrected where the file has a reference) phase, 2-D."""
        where = f"cannot decode image {index} with qpformat {self.fmt}"
        with _reading(self.path, where), warnings.catch_warnings():
            # qpimage unwraps the (1, H, W) phase qpretrieve 0.7 returns; skimage then suggests 2-D input
            warnings.filterwarnings("ignore", message="Image has a length 1 dimension", category=UserWarning)
            phase = np.asarray(self._data.get_qpimage(index).pha, dtype=np.float64)
        phase = np.squeeze(phase)     # qpimage 0.9 with qpretrieve 0.7 gives (1, H, W) for interferograms
        if phase.ndim != 2:
            raise ExportError(self.path, f"image {index} decodes to shape {phase.shape}, not a 2-D map")
        return phase

    def __iter__(self) -> Iterator[RawMap]:
        for index in range(self._n):
            phase = self._phase(index)
            if self.is_hologram:
                where = f"{self.path} [map {index}]"
                phase, self.sidebands[index] = orient_phase(phase, self.retrieval, where)
            with _reading(self.path, f"cannot read the metadata of image {index}"):
                meta = meta_from_qpimage(self._data.get_metadata(index), self.path)
            yield RawMap(phase, index, meta)


def _reader_class(fmt: str, name: str, suffixes: tuple[str, ...], storage: str,
                  doc: str) -> type[QPFormatReader]:
    """A :class:`QPFormatReader` subclass for qpformat format ``fmt`` of storage type ``storage``
    (qpformat's ``storage_type``, given here so that importing opdcells does not import qpformat)."""
    return type(f"QPFormat{fmt}Reader", (QPFormatReader,),
                {"fmt": fmt, "name": name, "suffixes": suffixes, "storage": storage, "__doc__": doc,
                 "__module__": __name__})


_H5 = (".h5", ".hdf5")
#: qpformat formats read through qpformat, recognised by their own content (registered in READERS).
QPFORMAT_READERS: list[type[QPFormatReader]] = [
    _reader_class("SingleRawOAHQpformatHDF5", "raw-oah-hdf5", _H5, "raw-oah",
                  "Raw off-axis hologram, qpformat HDF5 (metadata in the file; qpretrieve)"),
    _reader_class("SeriesRawOAHQpformatHDF5", "raw-oah-hdf5-series", _H5, "raw-oah",
                  "Raw off-axis hologram series, qpformat HDF5 (metadata in the file; qpretrieve)"),
    _reader_class("SingleRawQLSIQpformatHDF5", "raw-qlsi-hdf5", _H5, "raw-qlsi",
                  "Raw QLSI interferogram (and reference), qpformat HDF5 (metadata in the file; qpretrieve)"),
    _reader_class("SeriesRawQLSIQpformatHDF5", "raw-qlsi-hdf5-series", _H5, "raw-qlsi",
                  "Raw QLSI interferogram series, qpformat HDF5 (metadata in the file; qpretrieve)"),
    _reader_class("SeriesRawOAHHyperSpyHDF5", "hyperspy-hdf5", _H5, "raw-oah",
                  "HyperSpy off-axis hologram series, HDF5 (qpformat; qpretrieve)"),
    _reader_class("SeriesFieldSinogramMeepHDF5", "meep-hdf5", _H5, "field",
                  "Meep/FDTD simulated field sinogram, HDF5 (qpformat; metadata in the file)"),
    _reader_class("SeriesPhaseQpimageSubjoinedHDF5", "qpimage-subjoined", _H5, "phase,amplitude",
                  "qpimage series subjoined in another HDF5 file (qpformat)"),
    _reader_class("SeriesPhasePhasicsZipTif", "phasics-zip", (".zip",), "phase,intensity",
                  "Phasics SID4Bio series: zipped 'SID PHA*.tif' files (qpformat; wavelength from the file)"),
]
#: qpformat formats whose sniff cannot tell holograms from maps: read only with ``--hologram``.
QPFORMAT_HOLOGRAM_READERS: list[type[QPFormatReader]] = [
    _reader_class("SeriesRawOAHZipTif", "raw-oah-tif-zip", (".zip",), "raw-oah",
                  "Off-axis hologram series: zipped TIFF files (qpformat; qpretrieve; with --hologram)"),
]


def _register() -> None:
    """Add the qpformat-backed readers to :mod:`opdcells.readers`' registry (once)."""
    from . import readers

    if QPFORMAT_READERS[0] in readers.READERS:
        return
    at = readers.READERS.index(readers.QPImageReader)
    readers.READERS[at:at] = QPFORMAT_READERS
    readers.HOLOGRAM_ONLY_READERS.extend(QPFORMAT_HOLOGRAM_READERS)
    readers.EXPORT_SUFFIXES.update(s for r in QPFORMAT_READERS for s in r.suffixes)


_register()
