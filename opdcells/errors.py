"""Exceptions raised by opdcells; every message names the file and the reason."""
from __future__ import annotations

import os


class OPDCellsError(Exception):
    """Base class of all opdcells errors."""


class ExportError(OPDCellsError, ValueError):
    """A microscope export cannot be read or is not a usable OPD/phase map."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class MetadataError(ExportError):
    """Required acquisition metadata (units, wavelength, pixel size) is missing or invalid."""


class DatasetError(OPDCellsError, OSError):
    """An opdcells HDF5 dataset is missing, corrupt or incompatible."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        OPDCellsError.__init__(self, f"{self.path}: {reason}")

    def __str__(self) -> str:  # OSError would otherwise format its own way
        return f"{self.path}: {self.reason}"


#: Python's own control-flow exceptions: never turned into an error about a file.
CONTROL_FLOW = (KeyboardInterrupt, SystemExit, GeneratorExit)


def is_odd_library_error(exc: BaseException) -> bool:
    """True for an error a library derived from ``BaseException`` instead of ``Exception``.

    qpimage (``MetaDataMissingError``, ``IntegrityCheckError``) and qpformat (``BadFileFormatError``,
    ``LoadTifPhasicsError``, ...) do this; such an error is about the file and must not escape every
    handler. Python's control-flow exceptions (:data:`CONTROL_FLOW`) are not.
    """
    return not isinstance(exc, (Exception, *CONTROL_FLOW))
