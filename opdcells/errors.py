"""Exceptions raised by opdcells; every message names the file and the reason, on one line."""
from __future__ import annotations

import os
import re
import unicodedata

#: Unicode categories escaped by :func:`safe_text`: control and format characters (newline, escape,
#: right-to-left override), lone surrogates (undecodable bytes of file names) and line/paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


def safe_text(text) -> str:
    """``text`` (a str, path or bytes) with every character that could forge or hide output escaped.

    Control and format characters become Python escapes (``"a\\nb"`` -> ``a\\nb``), so a file name
    holding a newline cannot start a fake line of output; undecodable bytes of a file name (lone
    surrogates from ``os.fsdecode``) become ``\\xNN``. Printable text, including non-ASCII letters and
    backslashes, is unchanged, so applying it twice changes nothing.

    Parameters
    ----------
    text : str, os.PathLike or bytes
        What to print.

    Returns
    -------
    str
        The text, safe to print on one line.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    text = os.fspath(text) if isinstance(text, os.PathLike) else str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if unicodedata.category(ch) not in _UNSAFE_CATEGORIES:
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:      # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ascii(ch)[1:-1])
    return "".join(out)


def one_line(reason) -> str:
    """A reason (e.g. a library's multi-line exception message) on one line, made safe to print.

    Parameters
    ----------
    reason : object
        The message (its ``str``).

    Returns
    -------
    str
        One line, with :func:`safe_text`'s escapes.
    """
    return safe_text(_LINE_BREAKS.sub(" ", str(reason).strip()))


def storable_text(text: str) -> str:
    """``text`` as valid UTF-8 for storing (HDF5 strings): undecodable bytes of a file name become
    ``\\xNN``; text that is valid UTF-8 is returned unchanged.

    Parameters
    ----------
    text : str
        A name, possibly holding surrogate-escaped bytes.

    Returns
    -------
    str
        Valid UTF-8 text.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return os.fsencode(text).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")


class OPDCellsError(Exception):
    """Base class of all opdcells errors."""


class ExportError(OPDCellsError, ValueError):
    """A microscope export cannot be read or is not a usable OPD/phase map.

    ``path`` and ``reason`` are kept as given; the message escapes control characters and undecodable
    bytes (see :func:`safe_text`) and puts the reason on one line.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{safe_text(self.path)}: {one_line(reason)}")


class MetadataError(ExportError):
    """Required acquisition metadata (units, wavelength, pixel size) is missing or invalid."""


class DatasetError(OPDCellsError, OSError):
    """An opdcells HDF5 dataset is missing, corrupt or incompatible."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        OPDCellsError.__init__(self, f"{safe_text(self.path)}: {one_line(reason)}")

    def __str__(self) -> str:  # OSError would otherwise format its own way
        return f"{safe_text(self.path)}: {one_line(self.reason)}"


class SplitError(OPDCellsError, ValueError):
    """The maps cannot be split as asked (e.g. one acquisition group per class: no group split exists).

    ``reason`` is kept as given; ``path`` (the dataset, when known) leads the one-line message.
    """

    def __init__(self, reason: str, path: str | os.PathLike | None = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        prefix = "" if path is None else f"{safe_text(self.path)}: "
        super().__init__(prefix + one_line(reason))


class ModelError(OPDCellsError, OSError):
    """A saved model folder (``opdcells.modelfolder``) is missing, incomplete or unusable.

    Parameters
    ----------
    path : str or os.PathLike
        The model folder or file.
    reason : str
        What is wrong with it.
    """

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        OPDCellsError.__init__(self, str(self))

    def __str__(self) -> str:
        return f"{safe_text(self.path)}: {one_line(self.reason)}"


class TaskError(OPDCellsError, ValueError):
    """A task cannot be run on a dataset (classes missing or ambiguous, unknown task)."""


class NotebookError(OPDCellsError, RuntimeError):
    """A notebook cell failed while executing headless."""


class OODError(OPDCellsError, OSError):
    """A model folder's ``ood.npz`` (``opdcells.ood``) is unreadable, pickled or inconsistent."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        OPDCellsError.__init__(self, str(self))

    def __str__(self) -> str:  # OSError would otherwise format its own way
        return f"{safe_text(self.path)}: {one_line(self.reason)}"


#: Python's own control-flow exceptions: never turned into an error about a file.
CONTROL_FLOW = (KeyboardInterrupt, SystemExit, GeneratorExit)


def is_odd_library_error(exc: BaseException) -> bool:
    """True for an error a library derived from ``BaseException`` instead of ``Exception``.

    qpimage (``MetaDataMissingError``, ``IntegrityCheckError``) and qpformat (``BadFileFormatError``,
    ``LoadTifPhasicsError``, ...) do this; such an error is about the file and must not escape every
    handler. Python's control-flow exceptions (:data:`CONTROL_FLOW`) are not.

    Parameters
    ----------
    exc : BaseException
        The exception caught.

    Returns
    -------
    bool
        Whether it is such a library error.
    """
    return not isinstance(exc, (Exception, *CONTROL_FLOW))


class _PathError(OPDCellsError):
    """An error about one file or name: ``path`` and ``reason`` kept as given, the message on one line."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        OPDCellsError.__init__(self, f"{safe_text(self.path)}: {one_line(reason)}")

    def __str__(self) -> str:
        return f"{safe_text(self.path)}: {one_line(self.reason)}"


class ConfigError(_PathError, ValueError):
    """A training configuration (``config.json``, or arguments to ``TrainConfig``) is invalid: an
    unknown key, a value of the wrong type or out of range. ``path`` names the file (or ``<arguments>``)."""


class RegistryError(_PathError, ValueError):
    """A pretrained encoder of the registry is not registered, missing, corrupt (SHA-256 mismatch) or
    cannot be downloaded. ``path`` names the registry entry, file or URL."""


class ScreenError(_PathError, ValueError):
    """A model or setting that cannot screen (no calibration, unknown target), naming the model folder.

    Parameters
    ----------
    path : str or os.PathLike
        The model folder.
    reason : str
        Why it cannot screen.
    """
