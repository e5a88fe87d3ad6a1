"""The one path from export files to processed OPD maps, shared by ``load_data.py`` and ``predict``.

``discover`` / ``read_manifest`` find export files with their class and acquisition group;
``file_key`` identifies an export cheaply (SHA-256 of its bytes plus the reading options) so a
re-run can skip it before decoding; ``iter_processed`` / ``ProcessedExport`` turn one export into
``(source_index, ProcessedMap, Meta)`` items: readers -> metadata merge and check -> (segment fields of
view into cells) -> preprocess. Every failure surfaces as an ExportError naming the file.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import ExportError, MetadataError, OPDCellsError, safe_text
from .metadata import UNITS, Meta
from .preprocess import (
    DEFAULT_RANGES,
    FieldPosition,
    PlausibleRanges,
    PreprocessConfig,
    ProcessedMap,
    opd_of,
    preprocess_map,
    preprocess_stack,
    stack_chunk,
    window_too_small,
)
from .readers import EXPORT_SUFFIXES, SampleScale, open_export
from .retrieval import FILTER_NAMES, SIDEBANDS, Retrieval
from .segment import (
    TOUCHING,
    mask_path,
    read_label_image,
    relabel_components,
    segment_field,
    segment_labelled,
)

log = logging.getLogger(__name__)

_META_KEYS = ("units", "wavelength_nm", "pixel_size_um", "medium_index")


@dataclass(frozen=True)
class IngestOptions:
    """How to read and preprocess exports. Metadata given here wins over what a file says.

    Attributes
    ----------
    var : str, optional
        Variable/key/dataset name inside the export (None: the reader picks).
    stack_axis : int, optional
        Axis of a 3-D array that indexes maps (None: format default).
    units : {"nm", "um", "rad", "pg/um2"}, optional
        Units of the stored values (see :class:`Meta`).
    wavelength_nm : float, optional
        Vacuum imaging wavelength (nm); needed for phase in rad.
    pixel_size_um : float, optional
        Object-plane pixel size of the exports (um).
    medium_index : float, optional
        Refractive index of the medium.
    fields : bool
        Each map is a field of view, segmented into single cells first.
    hologram : bool
        Exports are raw off-axis holograms to reconstruct.
    channel : int, optional
        Channel holding the maps in multi-channel files (ImageJ hyperstacks, OME-TIFF, RGB pages).
    scale, offset : float, optional
        Calibration of the stored samples, ``value = offset + scale * sample`` (required for integer
        samples unless the file carries its own, e.g. ImageJ's; wins over the file's).
    invert_phase : bool
        Multiply every map by -1 (exports whose phase sign convention is reversed).
    sideband : str
        Hologram sideband: "+1", "-1" or "auto" (the one giving a cell above its background).
    filter_name : str, optional
        qpretrieve Fourier filter (see :class:`Retrieval`).
    filter_size : float, optional
        Its size, a fraction of the central band to sideband distance.
    config : PreprocessConfig
        Preprocessing settings (output pixel size um and size px, background order, alpha mL/g).
    ranges : PlausibleRanges
        Plausible physical ranges of each cell (:class:`~opdcells.preprocess.PlausibleRanges`).
    touching : {"split", "drop"}
        With ``fields``, "split" touching cells (watershed) or "drop" them (isolated cells only; for
        smears where cells overlap).
    masks : str, optional
        With ``fields`` (implied), the cells come from a label image beside each field instead: a
        pattern with ``{stem}`` relative to the field's folder (``"{stem}_cp_masks.png"``); each
        connected piece of a label value is one cell (see :func:`opdcells.segment.read_label_image`).
    cell_diameter_um : tuple of float, optional
        With automatic ``fields``, (min, max) equivalent diameter of a cell in um (smaller objects are
        debris or fragments, larger ones clumps); None: ``segment_field``'s defaults (2, 30).
    min_dry_mass_pg : float, optional
        With automatic ``fields``, objects of less dry mass (pg) are debris or fragments of over-split
        cells (None: no limit).

    Raises
    ------
    ValueError
        For invalid metadata or numbers, ``offset`` without ``scale``, a zero or non-finite ``scale``, an
        unknown sideband, filter or ``touching``, diameter limits not ``0 < MIN < MAX``, a non-positive
        ``min_dry_mass_pg``, or a ``masks`` pattern without ``{stem}``.
    """

    var: str | None = None
    stack_axis: int | None = None
    units: str | None = None
    wavelength_nm: float | None = None
    pixel_size_um: float | None = None
    medium_index: float | None = None
    fields: bool = False
    hologram: bool = False
    channel: int | None = None
    scale: float | None = None
    offset: float | None = None
    invert_phase: bool = False
    sideband: str = "auto"
    filter_name: str | None = None
    filter_size: float | None = None
    config: PreprocessConfig = field(default_factory=PreprocessConfig)
    ranges: PlausibleRanges = field(default_factory=PlausibleRanges)
    touching: str = "split"
    masks: str | None = None
    cell_diameter_um: tuple[float, float] | None = None
    min_dry_mass_pg: float | None = None

    def __post_init__(self):
        self.user_meta  # noqa: B018 - validates units and numbers (ValueError)
        if self.offset is not None and self.scale is None:
            raise ValueError("--offset needs --scale (value = offset + scale * sample)")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale != 0):
            raise ValueError(f"scale must be a finite non-zero number, not {self.scale!r}")
        self.retrieval  # noqa: B018 - validates sideband and filter (ValueError)
        if self.touching not in TOUCHING:
            raise ValueError(f"touching must be one of {TOUCHING}, not {self.touching!r}")
        if self.cell_diameter_um is not None:
            low, high = self.cell_diameter_um
            if not (0 < low < high and math.isfinite(high)):
                raise ValueError(f"cell diameter limits must be 0 < MIN < MAX, not {self.cell_diameter_um!r}")
            object.__setattr__(self, "cell_diameter_um", (float(low), float(high)))
        if self.min_dry_mass_pg is not None and not (0 < self.min_dry_mass_pg < math.inf):
            raise ValueError(f"the minimum dry mass must be a positive number, not {self.min_dry_mass_pg!r}")
        if self.masks is not None:
            mask_path("field", self.masks)  # ValueError without {stem}
            object.__setattr__(self, "fields", True)

    @property
    def user_meta(self) -> Meta:
        return Meta(**{k: getattr(self, k) for k in _META_KEYS})

    @property
    def retrieval(self) -> Retrieval:
        return Retrieval(self.sideband, self.filter_name, self.filter_size)

    @property
    def identity(self) -> str:
        """The options that change which maps a file yields (part of the file key). Options added
        later count only when set (not at their defaults), so the keys of existing datasets stay valid:
        a re-run skips the files already there, whatever the version that read them."""
        ident = {"var": self.var, "stack_axis": self.stack_axis, "fields": self.fields,
                 "hologram": self.hologram}
        later = {"channel": self.channel, "scale": self.scale, "offset": self.offset,
                 "invert_phase": self.invert_phase or None,
                 "retrieval": None if self.retrieval.is_default else self.retrieval.as_dict()}
        if self.fields:
            later.update(touching=None if self.touching == "split" else self.touching, masks=self.masks,
                         cell_diameter_um=self.cell_diameter_um, min_dry_mass_pg=self.min_dry_mass_pg)
        ident.update({k: v for k, v in later.items() if v is not None})
        return json.dumps(ident, sort_keys=True, separators=(",", ":"))

    @property
    def open_kwargs(self) -> dict:
        """Keyword arguments of :func:`opdcells.readers.open_export` for these options."""
        return {"var": self.var, "stack_axis": self.stack_axis, "hologram": self.hologram,
                "channel": self.channel, "retrieval": self.retrieval}

    @property
    def sample_scale(self) -> SampleScale | None:
        """The user's calibration of the stored samples, None if not given."""
        if self.scale is None:
            return None
        return SampleScale(self.scale, self.offset or 0.0, source="--scale")

    def replace(self, **changes) -> IngestOptions:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------- command line

#: IngestOptions fields set from the command line by :func:`add_reading_options` (argparse dest names).
READING_OPTIONS = ("var", "stack_axis", "units", "wavelength_nm", "pixel_size_um", "medium_index", "fields",
                   "hologram", "channel", "scale", "offset", "invert_phase", "sideband", "filter_name",
                   "filter_size", "touching", "masks", "cell_diameter_um", "min_dry_mass_pg")


def positive_number(text: str) -> float:
    """argparse type: a positive finite number.

    Parameters
    ----------
    text : str
        The option's value.

    Returns
    -------
    float

    Raises
    ------
    argparse.ArgumentTypeError
        When it is not a number, or not positive and finite.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = positive_number(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1, not {text}")
    return value


def add_reading_options(parser: argparse.ArgumentParser) -> None:
    """Add the options that say how to read exports (shared by ``load_data.py`` and ``predict``).

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The command's parser; ``--var``, ``--units``, ``--wavelength-nm`` (nm), ``--pixel-size-um`` (um),
        ``--fields``, ``--hologram``, ``--plausible``, ... are added to it (:data:`READING_OPTIONS`).
    """
    add = parser.add_argument
    add("--var", metavar="NAME", help="variable / key / dataset holding the maps in each export")
    add("--stack-axis", type=int, metavar="N", help="axis of a 3-D array that indexes the maps")
    add("--units", choices=UNITS, help="units of the stored values (rad needs a wavelength)")
    add("--wavelength-nm", type=positive_number, metavar="NM", help="vacuum imaging wavelength")
    add("--pixel-size-um", type=positive_number, metavar="UM", help="object-plane pixel size of the exports")
    add("--medium-index", type=positive_number, metavar="N", help="refractive index of the medium")
    add("--fields", action="store_true", help="exports are fields of view: segment single cells")
    add("--hologram", action="store_true", help="exports are off-axis holograms to reconstruct")
    add("--sideband", choices=SIDEBANDS, default="auto",
        help="hologram sideband: +1 the one qpretrieve finds, -1 its conjugate, auto (default) the one "
             "giving a cell above its background")
    add("--filter-name", choices=FILTER_NAMES, help="qpretrieve Fourier filter (default disk)")
    add("--filter-size", type=_fraction, metavar="F",
        help="qpretrieve filter size, fraction of the central band to sideband distance (default 1/3)")
    add("--channel", type=int, metavar="K",
        help="channel holding the OPD/phase maps in multi-channel files (ImageJ hyperstacks, OME-TIFF)")
    add("--scale", type=float, metavar="X", help="value per stored sample: value = offset + X * sample "
                                                 "(needed for integer samples without a calibration)")
    add("--offset", type=float, metavar="Y", help="value of sample 0 (with --scale)")
    add("--invert-phase", action="store_true", help="multiply every map by -1 (reversed phase sign)")
    add("--plausible", type=plausible_range, action="append", default=[], metavar="NAME=LOW:HIGH",
        help="widen a plausibility range: " + ", ".join(f"{f.name} ({getattr(DEFAULT_RANGES, f.name)[0]:g}"
                                                         f"-{getattr(DEFAULT_RANGES, f.name)[1]:g})"
                                                         for f in dataclasses.fields(PlausibleRanges)))
    add("--touching", choices=TOUCHING, default="split",
        help="with --fields: split touching cells (watershed) or drop them (isolated cells only)")
    add("--cell-diameter-um", nargs=2, type=positive_number, metavar=("MIN", "MAX"),
        help="with --fields: cells are MIN-MAX um across (equivalent diameter; default 2 30)")
    add("--min-dry-mass-pg", type=positive_number, metavar="PG",
        help="with --fields: lighter objects are debris or fragments of cells (default: no limit)")
    add("--masks", metavar="PATTERN", type=_mask_pattern,
        help="cells from a label image beside each field, e.g. '{stem}_cp_masks.png', '{stem}_seg.npy' "
             "(cellpose) or '{stem}_labels.tif' (Fiji); implies --fields")


def plausible_range(text: str) -> tuple[str, tuple[float, float]]:
    """argparse type: ``NAME=LOW:HIGH`` -> ``(NAME, (LOW, HIGH))``.

    Parameters
    ----------
    text : str
        The option's value; LOW and HIGH in the unit of NAME (a :class:`PlausibleRanges` field).

    Returns
    -------
    tuple of (str, tuple of float)

    Raises
    ------
    argparse.ArgumentTypeError
        When the text is not of that form.
    """
    try:
        name, bounds = text.split("=", 1)
        low, high = (float(v) for v in bounds.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=LOW:HIGH, not {text!r}") from None
    return name.strip(), (low, high)


def _mask_pattern(text: str) -> str:
    """argparse type: a mask file pattern holding ``{stem}``."""
    try:
        mask_path("field", text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def reading_options(args: argparse.Namespace) -> dict:
    """The IngestOptions fields given on a command line built with :func:`add_reading_options`.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options.

    Returns
    -------
    dict
        IngestOptions field -> value (``ranges`` widened by ``--plausible``).

    Raises
    ------
    ValueError
        For an unknown or empty plausibility range.
    """
    options = {name: getattr(args, name) for name in READING_OPTIONS}
    if args.plausible:
        options["ranges"] = DEFAULT_RANGES.widened(**dict(args.plausible))
    return options


# --------------------------------------------------------------------------------------- identity


def open_regular(path: str | os.PathLike):
    """Open an export for reading in binary mode, refusing anything that is not a regular file.

    Symbolic links to regular files are followed. The file is opened without blocking and checked with
    ``fstat`` on the opened descriptor, so a FIFO, a device (``/dev/zero``), a socket or a folder (or a
    link to one) is refused at once instead of hanging or streaming forever; it is ``stat``-ed first so
    that a device is never even opened.

    Parameters
    ----------
    path : str or os.PathLike
        The export.

    Returns
    -------
    io.BufferedReader
        The open file (close it).

    Raises
    ------
    ExportError
        When the file is missing, a folder, not a regular file, or cannot be opened.
    """
    check_regular_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise ExportError(path, "no such file (or a broken symbolic link)") from None
    except IsADirectoryError:
        raise ExportError(path, "is a folder, not an export file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise ExportError(path, f"cannot open ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ExportError(path, f"not a regular file ({_file_kind(mode)}); exports must be regular files")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular_file(path: str | os.PathLike) -> None:
    """Raise ExportError unless ``path`` is a regular file or a symbolic link to one (never opens it).

    Parameters
    ----------
    path : str or os.PathLike

    Raises
    ------
    ExportError
        When it is missing (or a broken link), cannot be ``stat``-ed, or is not a regular file.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ExportError(path, "no such file (or a broken symbolic link)") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name; OSError: a link loop
        raise ExportError(path, f"cannot open ({getattr(exc, 'strerror', None) or exc})") from None
    if not stat.S_ISREG(mode):
        raise ExportError(path, f"not a regular file ({_file_kind(mode)}); exports must be regular files")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex digest of a regular file's bytes (streamed); ExportError if it cannot be read or is
    not a regular file (see :func:`open_regular`).

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    chunk_size : int
        Bytes read at a time.

    Returns
    -------
    str
        64 hex digits.

    Raises
    ------
    ExportError
        When the file is not a regular file or cannot be read.
    """
    digest = hashlib.sha256()
    with open_regular(path) as fh:
        try:
            while chunk := fh.read(chunk_size):
                digest.update(chunk)
        except OSError as exc:
            raise ExportError(path, f"cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()


def file_key(path: str | os.PathLike, options: IngestOptions) -> tuple[str, str]:
    """``(sha256, key)``: the file's hash and its identity under ``options`` (stored in datasets).

    With ``options.masks`` the key also holds the hash of the field's label image (an edited mask is new).

    Parameters
    ----------
    path : str or os.PathLike
        The export.
    options : IngestOptions
        How it is read (their ``identity`` is part of the key).

    Returns
    -------
    tuple of (str, str)

    Raises
    ------
    ExportError
        When the export, or its label image, cannot be read.
    """
    sha = sha256_file(path)
    key = f"{sha}:{options.identity}"
    if options.masks:
        mask_file = mask_path(path, options.masks)
        try:
            key += ":" + sha256_file(mask_file)
        except ExportError as exc:
            reason = f"mask of {Path(path).name} (--masks {options.masks}): {exc.reason}"
            raise ExportError(mask_file, reason) from None
    return sha, key


# --------------------------------------------------------------------------------------- discovery


class Found(NamedTuple):
    """An export file found on disk: its class (None if unknown) and acquisition-group folder."""

    path: Path
    label: str | None
    group: str


def is_export_name(name: str) -> bool:
    """True for a visible file whose name ends in one of ``readers.EXPORT_SUFFIXES``.

    Parameters
    ----------
    name : str
        A file name.

    Returns
    -------
    bool
    """
    lower = name.lower()
    return not name.startswith(".") and any(lower.endswith(s.lower()) for s in EXPORT_SUFFIXES)


def group_of(folder: Path, root: Path) -> str:
    """Folder relative to ``root`` as a POSIX path (``root``'s own name for ``root`` itself).

    Parameters
    ----------
    folder : Path
        The folder of an export.
    root : Path
        The source folder.

    Returns
    -------
    str
        The acquisition group (``folder`` as given when it is not under ``root``).
    """
    try:
        rel = folder.relative_to(root).as_posix()
    except ValueError:
        return folder.as_posix()
    return root.name if rel == "." else rel


def stack_group(found_group: str, path: Path) -> str:
    """Group of a multi-map (stack or field-of-view) file: the file itself, under its folder group.

    Parameters
    ----------
    found_group : str
        The group of the file's folder (:func:`group_of`).
    path : Path
        The file.

    Returns
    -------
    str
    """
    return f"{found_group}/{path.name}" if found_group else path.name


def _walk(root: Path) -> list[Path]:
    """Export files below ``root`` sorted by path, skipping hidden files/folders and non-export names.

    Symbolic links to folders are followed (a class or session folder may be a link); a link back to a
    folder above it (a loop: same device and inode as an ancestor) is skipped with a warning naming it.
    Unreadable folders are reported, never silently dropped.
    """
    found = []
    ancestors = {str(root): frozenset()}   # folder -> (st_dev, st_ino) of the folders above it

    def unreadable(exc: OSError) -> None:
        log.warning("cannot read folder %s (%s); its files are left out", safe_text(exc.filename),
                    exc.strerror or exc)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable):
        above = ancestors.pop(dirpath, frozenset())
        try:
            st = os.stat(dirpath)
        except OSError as exc:   # removed or made unreadable while walking
            unreadable(exc)
            dirnames[:] = []
            continue
        here = (st.st_dev, st.st_ino)
        if here in above:
            log.warning("folder %s links back to a folder above it (a symbolic link loop); skipped",
                        safe_text(dirpath))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        ancestors.update({os.path.join(dirpath, d): above | {here} for d in dirnames})
        for name in filenames:
            if is_export_name(name):
                found.append(Path(dirpath, name))
            else:
                log.debug("ignoring %s (not an export file name)", Path(dirpath, name))
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def discover(sources: Iterable[str | os.PathLike], label: str | None = None, *,
             exclude: Iterable[str | os.PathLike] = ()) -> list[Found]:
    """Export files under ``sources`` with their class and group, in a deterministic order.

    Without ``label`` every source is a folder with one sub-folder per class (files at any depth);
    groups are folders relative to the source (``SW480/session_2``); an export directly in the
    source has ``label=None``. With ``label`` every source is a folder or file of that one class;
    groups are relative to the source's parent (``day1/session_2``).

    Parameters
    ----------
    sources : iterable of str or os.PathLike
        Folders (or, with ``label``, files).
    label : str, optional
        The one class of every source.
    exclude : iterable of str or os.PathLike
        Files to leave out (e.g. the output dataset).

    Returns
    -------
    list of Found
        Path, class (None if unknown) and acquisition group of every export.

    Raises
    ------
    ExportError
        For a missing source or a file given without label.
    """
    skip = {os.path.realpath(p) for p in exclude}   # realpath: a link loop is not an error here
    found: list[Found] = []
    for source in map(Path, sources):
        if not source.exists():
            raise ExportError(source, "no such file or folder")
        root = Path(os.path.abspath(source))  # absolute, symbolic links kept
        if root.is_file():
            if label is None:
                raise ExportError(source, "a file given as SOURCE needs --label NAME")
            items = [Found(root, label, group_of(root.parent, root.parent.parent))]
        elif label is None:
            items = [Found(p, _class_of(p, root), group_of(p.parent, root)) for p in _walk(root)]
        else:
            items = [Found(p, label, group_of(p.parent, root.parent)) for p in _walk(root)]
        found.extend(f for f in items if os.path.realpath(f.path) not in skip)
    return found


def _class_of(path: Path, root: Path) -> str | None:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def labelled_twice(items: Iterable[Found]) -> dict[str, str]:
    """Exports reached under two or more labels in one run (class folders, ``--label``, manifest rows,
    symbolic links): their real path mapped to a reason naming every label and where it came from.

    Parameters
    ----------
    items : iterable of Found
        The exports of the run.

    Returns
    -------
    dict of str to str
        Real path -> reason (one line).
    """
    labels: dict[str, dict[str, Path]] = {}
    for found in items:
        if found.label is not None:
            labels.setdefault(os.path.realpath(found.path), {}).setdefault(found.label, found.path)
    return {real: "given two labels: " + " and ".join(f"{label!r} (as {path})" for label, path in by.items())
                  + "; give each export one class"
            for real, by in labels.items() if len(by) > 1}


# --------------------------------------------------------------------------------------- manifest

MANIFEST_COLUMNS = ("path", "label", *_META_KEYS, "var")


def read_manifest(csv_path: str | os.PathLike) -> list[tuple[Found, dict]]:
    """Rows of a manifest CSV as ``(Found, overrides)``; overrides are IngestOptions fields per row.

    Columns: ``path``, ``label`` (required), ``units``, ``wavelength_nm`` (nm), ``pixel_size_um`` (um),
    ``medium_index``, ``var``, ``group`` (optional, empty = not given). Relative paths are relative to
    the CSV; the acquisition group is the ``group`` column, else the folder relative to the CSV's
    folder.

    Parameters
    ----------
    csv_path : str or os.PathLike
        The manifest (UTF-8, a BOM allowed).

    Returns
    -------
    list of tuple of (Found, dict)

    Raises
    ------
    ExportError
        Naming the CSV and the line: a missing or unreadable manifest, no rows, a missing column or
        value, or an invalid value.
    """
    csv_path = Path(csv_path)
    if not os.path.lexists(csv_path):
        raise ExportError(csv_path, "no such manifest file")
    check_regular_file(csv_path)   # a FIFO or device would block or never end
    rows = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
            reader = csv.DictReader(fh)
            try:
                rows.extend((reader.line_num, row) for row in reader)   # line where each row ends
            except csv.Error as exc:
                raise ExportError(csv_path, f"line {reader.line_num}: cannot read manifest ({exc})") from None
    except OSError as exc:
        raise ExportError(csv_path, f"cannot read manifest ({exc.strerror or exc})") from None
    if not rows:
        raise ExportError(csv_path, "manifest has no rows")
    root = csv_path.resolve().parent
    return [_manifest_row(row, line, root, csv_path) for line, row in rows]


def _manifest_row(row: dict, line: int, root: Path, csv_path: Path) -> tuple[Found, dict]:
    clean = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
    for key, value in clean.items():
        if "\0" in value:
            raise ExportError(csv_path, f"line {line}: column {key!r} holds a NUL byte")
        if key != "path" and not value.isprintable():   # paths may hold any byte a file name can
            raise ExportError(csv_path, f"line {line}: column {key!r} holds control characters or bytes "
                                        f"that are not UTF-8 ({safe_text(value)})")
    for required in ("path", "label"):
        if not clean.get(required):
            raise ExportError(csv_path, f"line {line}: empty or missing column {required!r}")
    values: dict = {k: clean.get(k) or None for k in MANIFEST_COLUMNS[2:]}
    try:
        for key in ("wavelength_nm", "pixel_size_um", "medium_index"):
            if values[key] is not None:
                values[key] = float(values[key])
        if values["units"] is not None and values["units"] not in UNITS:
            raise ValueError(f"units must be one of {UNITS}, not {values['units']!r}")
        Meta(**{k: values[k] for k in _META_KEYS})
    except ValueError as exc:
        raise ExportError(csv_path, f"line {line}: {exc}") from None
    path = Path(clean["path"])
    path = path if path.is_absolute() else root / path
    found = Found(path, clean["label"], clean.get("group") or group_of(path.parent, root))
    return found, {k: v for k, v in values.items() if v is not None}


# --------------------------------------------------------------------------------------- processing


#: Exceptions that stop the program rather than describe a bad file: never turned into a skip.
_NOT_FILE_ERRORS = (KeyboardInterrupt, SystemExit, GeneratorExit)


@contextlib.contextmanager
def _export_errors(path: Path) -> Iterator[None]:
    """Let opdcells errors through; turn any other error of a reader library into an ExportError naming
    ``path`` -- whatever its base class: qpformat raises ``BaseException`` subclasses, so everything but
    ``KeyboardInterrupt``, ``SystemExit`` and ``GeneratorExit`` counts as a bad file."""
    try:
        yield
    except (OPDCellsError, *_NOT_FILE_ERRORS):
        raise
    except BaseException as exc:  # noqa: BLE001 - reader/decoder failures of arbitrary libraries
        log.debug("error reading %s", path, exc_info=True)
        raise ExportError(path, f"{type(exc).__name__}: {exc}") from exc


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _single_threaded_blas():
    """Context: BLAS on one thread. Preprocessing multiplies small matrices, where BLAS threads cost more
    than they give: with the two cores busy, 2 threads made it 5 times slower (221 vs 44 ms a map)."""
    return _blas_controller().limit(limits=1, user_api="blas")


class ProcessedExport:
    """One opened export: ``len()`` is the number of maps in the file, iterating yields
    ``(source_index, ProcessedMap, Meta)`` (several per map with ``options.fields``).

    ``on_error``: called with the ExportError of a bad map of a stack (or a bad cell of a field), which
    is then skipped; without it, the error is raised. File-level failures (cannot open, missing
    metadata, truncated stream, the only map of the file is bad) always raise ExportError.
    ``on_drop``: called with a :class:`Dropped` for every map, cell or segmented object that yields no
    map (bad maps and cells as ``on_error`` sees them, and the objects segmentation drops).
    Maps cut from fields carry their :class:`~opdcells.preprocess.FieldPosition` (``.position``).
    """

    def __init__(self, path: str | os.PathLike, options: IngestOptions, *,
                 on_error: Callable[[ExportError], None] | None = None,
                 on_drop: Callable[[Dropped], None] | None = None):
        """Open the export with its reader; maps are read and preprocessed while iterating.

        Parameters
        ----------
        path : str or os.PathLike
            The export.
        options : IngestOptions
            How to read and preprocess it.
        on_error : callable, optional
            Called with the ExportError of a bad map of a stack (or a bad cell of a field), which is then
            skipped; without it, the error is raised.
        on_drop : callable, optional
            Called with a :class:`Dropped` for every map, cell or object that yields no map.

        Raises
        ------
        ExportError
            When the file cannot be opened (naming it).
        MetadataError
            When its metadata are invalid.
        """
        self.path = Path(path)
        self.options = options
        self.on_error = on_error
        self.on_drop = on_drop
        with _export_errors(self.path):
            self._reader = open_export(self.path, **options.open_kwargs)
            try:
                self._n = len(self._reader)
            except BaseException:
                self._reader.close()
                raise

    def __len__(self) -> int:
        return self._n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._reader.close()

    def __enter__(self) -> ProcessedExport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[int, ProcessedMap, Meta]]:
        with _export_errors(self.path), _single_threaded_blas():
            file_meta = self._reader.file_meta
            self._check_units(file_meta)
            scale = self._sample_scale()
            sign = -1.0 if self.options.invert_phase else 1.0
            batch: list[tuple[int, np.ndarray, Meta]] = []
            for raw in self._reader:
                if getattr(raw, "error", None) is not None:    # an archive member that cannot be read
                    yield from self._process_batch(batch)
                    self._bad(raw.error, whole_file=self._n <= 1)
                    continue
                meta = self.options.user_meta.over(raw.meta.over(file_meta)).check(
                    self.path, self._reader.meta_problems)
                data = sign * np.asarray(raw.data if scale is None else scale.apply(raw.data))
                if self.options.fields or self._n <= 1 or stack_chunk(data.shape) == 1:
                    yield from self._process(data, raw.index, meta)
                    continue
                if batch and (len(batch) >= stack_chunk(data.shape) or meta != batch[0][2]
                              or data.shape != batch[0][1].shape or data.dtype != batch[0][1].dtype):
                    yield from self._process_batch(batch)
                batch.append((raw.index, data, meta))
            yield from self._process_batch(batch)

    def _process_batch(self, batch: list[tuple[int, np.ndarray, Meta]],
                       ) -> Iterator[tuple[int, ProcessedMap, Meta]]:
        """Preprocess maps of one shape and metadata gathered from a stack together
        (:func:`~opdcells.preprocess.preprocess_stack`: the maps of :func:`preprocess_map`), in order;
        empties ``batch``."""
        if not batch:
            return
        indices, meta = [index for index, _, _ in batch], batch[0][2]
        results = preprocess_stack(np.stack([data for _, data, _ in batch]), meta, self.options.config,
                                   [self._where(index) for index in indices], self.options.ranges)
        batch.clear()
        for index, result in zip(indices, results, strict=True):
            if isinstance(result, ExportError):
                self._bad(result, index=index)
            else:
                yield index, result, meta

    def _check_units(self, file_meta: Meta) -> None:
        """Refuse user units that conflict with the units the reader itself fixes (phase in rad from a
        complex field, a hologram or qpimage; OPD in nm from Phasics)."""
        given = self.options.units
        if self._reader.units_fixed and given is not None and given != file_meta.units:
            raise MetadataError(self.path, f"the {self._reader.name} reader gives {file_meta.units} "
                                           f"(the file holds {_fixed_units_reason(self._reader)}), so "
                                           f"--units {given} cannot apply; leave --units out for this file")

    def _sample_scale(self) -> SampleScale | None:
        """The calibration to apply: the user's, else (integer samples) the file's; integer samples
        without either are refused (counts are not OPD or phase)."""
        scale = self.options.sample_scale
        if scale is not None or not self._reader.integer_samples:
            return scale
        if self._reader.sample_scale is not None:
            log.debug("%s: integer samples calibrated by %s", self.path, self._reader.sample_scale.source)
            return self._reader.sample_scale
        raise ExportError(self.path, f"holds integer samples ({self._reader.dtype}): camera counts or "
                                     "scaled values are not OPD or phase without their scale; give --scale "
                                     "VALUE_PER_SAMPLE (and --offset), or export floating-point values")

    def _where(self, index: int, cell: int | None = None) -> str:
        """How errors name a map: the file, plus the map (in a stack) and cell (in a field)."""
        if self._n <= 1 and cell is None:
            return str(self.path)
        member = getattr(self._reader, "member_name", lambda _: None)(index)   # archive series
        return (f"{self.path} [map {index}" + (f" ({member})" if member else "")
                + ("]" if cell is None else f", cell {cell}]"))

    def _bad(self, exc: ExportError, *, whole_file: bool = False, index: int | None = None,
             position: FieldPosition | None = None) -> None:
        """Report a bad map/cell to ``on_error``; raise it when there is no handler or it is the file."""
        if self.on_error is None or whole_file:
            raise exc
        if self.on_drop is not None:
            self.on_drop(Dropped(self.path, index, position.cell if position else None,
                                 position.label if position else None, position.bbox if position else None,
                                 exc.reason))
        self.on_error(exc)

    def _segmentation_drop(self, index: int) -> Callable[[int, tuple, str], None] | None:
        """``on_drop`` of :mod:`opdcells.segment` for map ``index`` (None without an ``on_drop`` here)."""
        if self.on_drop is None:
            return None
        return lambda label, bbox, reason: self.on_drop(Dropped(self.path, index, None, label, bbox,
                                                                f"segmentation: {reason}"))

    def _process(self, data, index: int, meta: Meta) -> Iterator[tuple[int, ProcessedMap, Meta]]:
        config = self.options.config
        single = self._n <= 1
        if not self.options.fields:
            try:
                yield index, preprocess_map(data, meta, config, path=self._where(index),
                                            ranges=self.options.ranges), meta
            except ExportError as exc:
                self._bad(exc, whole_file=single, index=index)
            return
        try:
            crops, crop_meta = _segment(data, meta, config, self._where(index), self.options, self._labels(),
                                        on_drop=self._segmentation_drop(index))
        except ExportError as exc:
            self._bad(exc, whole_file=single, index=index)
            return
        for cell, crop in enumerate(crops):
            position = field_position(crop, cell, meta.pixel_size_um)
            try:
                processed = preprocess_map(crop.data, crop_meta, config, path=self._where(index, cell),
                                           ranges=self.options.ranges, single_cell_map=False)
            except ExportError as exc:
                self._bad(exc, index=index, position=position)
                continue
            processed.position = position
            yield index, processed, meta


    def _labels(self) -> tuple[Path, object] | None:
        """``(mask file, label image)`` of the field with ``options.masks`` (one field a file), else None."""
        if self.options.masks is None:
            return None
        if self._n > 1:
            raise ExportError(self.path, f"holds {self._n} maps: --masks needs one field of view per file")
        mask_file = mask_path(self.path, self.options.masks)
        return mask_file, relabel_components(read_label_image(mask_file))


def _fixed_units_reason(reader) -> str:
    return {"rad": "phase in rad", "nm": "OPD in nm"}.get(reader.file_meta.units, reader.file_meta.units)


def _segment(data, meta: Meta, config: PreprocessConfig, where: str, options: IngestOptions, labels=None,
             on_drop=None):
    """Cell crops (in nm) of one field of view and the metadata that describes them.

    ``labels``: ``(mask file, label image)`` of the field (cells from the user's masks); None: automatic.
    ``on_drop``: told of every object the segmentation drops (see :func:`opdcells.segment.segment_field`).
    """
    opd_nm = opd_of(data, meta, config, where)
    if labels is not None:
        mask_file, label_image = labels
        crops = segment_labelled(opd_nm, meta.pixel_size_um, label_image, path=where, mask_file=mask_file,
                                 on_drop=on_drop)
    else:
        limits = {}
        if options.cell_diameter_um is not None:
            limits = dict(zip(("min_diameter_um", "max_diameter_um"), options.cell_diameter_um, strict=True))
        limits["min_dry_mass_pg"] = options.min_dry_mass_pg
        crops = segment_field(opd_nm, meta.pixel_size_um, touching=options.touching, path=where,
                              on_drop=on_drop, **limits)
    return crops, dataclasses.replace(meta, units="nm")


def field_position(crop, cell: int, pixel_size_um: float) -> FieldPosition:
    """Where the cell of a crop lies in its field.

    Parameters
    ----------
    crop : opdcells.segment.CellCrop
        The crop (``bbox``: its window in the field; ``mask``: the cell's segment in the window).
    cell : int
        The cell's number among the crops of its field.
    pixel_size_um : float
        The field's pixel size (um), for ``centroid_um``.

    Returns
    -------
    FieldPosition
        Label, centroid of the segment and the segment's own bounding box, in pixels of the field.
    """
    rows, cols = np.nonzero(crop.mask)   # a crop's segment is never empty
    row0, col0 = crop.bbox[:2]
    bbox = (row0 + int(rows.min()), col0 + int(cols.min()), row0 + int(rows.max()) + 1,
            col0 + int(cols.max()) + 1)
    return FieldPosition(cell, int(crop.label), (row0 + float(rows.mean()), col0 + float(cols.mean())), bbox,
                         float(pixel_size_um))


@dataclass(frozen=True)
class Dropped:
    """A map, cell or segmented object of an export that yields no map, and why.

    Attributes
    ----------
    path : Path
        The export.
    index : int or None
        The map in the file (None: the whole file).
    cell : int or None
        The cell's number among its field's segmented cells (preprocessing refused it), else None.
    label : int or None
        Its label in the field's label image (cells and objects of fields), else None.
    bbox : tuple of int or None
        Its own (row0, col0, row1, col1) in the field (px, end exclusive), else None.
    reason : str
        One line.
    """

    path: Path
    index: int | None
    cell: int | None
    label: int | None
    bbox: tuple[int, int, int, int] | None
    reason: str


def iter_processed(path: str | os.PathLike, options: IngestOptions, *,
                   on_error: Callable[[ExportError], None] | None = None,
                   on_drop: Callable[[Dropped], None] | None = None,
                   ) -> Iterator[tuple[int, ProcessedMap, Meta]]:
    """Yield ``(source_index, ProcessedMap, Meta)`` for every map (or cell) of one export.

    Parameters
    ----------
    path : str or os.PathLike
        The export.
    options : IngestOptions
        How to read and preprocess it.
    on_error, on_drop : callable, optional
        As in :class:`ProcessedExport`.

    Yields
    ------
    tuple of (int, ProcessedMap, Meta)
        The map's index in the file, the preprocessed cell (OPD (S, S) float32, nm) and its metadata.

    Raises
    ------
    ExportError
        Naming the file: it cannot be read, metadata are missing, or a map is bad and ``on_error`` is None.
    """
    with ProcessedExport(path, options, on_error=on_error, on_drop=on_drop) as export:
        yield from export


# --------------------------------------------------------------------------------------- geometry

#: Output geometry when the exports decide it: the default window (128 px at 0.25 um/px, 32 um: the
#: geometry of the shipped pretrained encoders) when the cells fit it, else the first of these windows
#: (px) at the first of these pixel sizes (um) that holds them. 0.25 um samples a ~0.5 um optical
#: resolution at Nyquist (``PreprocessConfig``); coarser sizes only for cells over 64 um.
OUT_SIZES = (128, 192, 256)
OUT_PIXEL_SIZES_UM = (0.25, 0.5, 1.0)
#: Cells measured to choose or check the geometry, at most ``GEOMETRY_CELLS_PER_FILE`` from each of the
#: files evenly spread over the load.
GEOMETRY_SAMPLE = 16
GEOMETRY_CELLS_PER_FILE = 4
#: The window must be this many times the widest measured cell (room for larger cells than those sampled).
GEOMETRY_MARGIN = 1.25
#: A window the user gives is refused when more than 1 / MAX_TOO_WIDE of the cells measured do not fit it.
MAX_TOO_WIDE = 4
#: Output geometry used only to measure cells (a 256 um window at 4 um/px: no plausible cell is cut).
_MEASURING = PreprocessConfig(out_pixel_size_um=4.0, out_size=64)


def measure_cells(items: Iterable[tuple[Path, IngestOptions]], n: int = GEOMETRY_SAMPLE,
                  per_file: int = GEOMETRY_CELLS_PER_FILE) -> list[tuple[float, Path]]:
    """Measure the width of ``n`` cells of the exports, read like any load.

    The files are taken evenly spread over ``items`` (every class folder of a load, not only the first),
    at most ``per_file`` cells from each, then the others in order if that gave too few. Unreadable files
    and bad maps are passed over (the load itself reports them).

    Parameters
    ----------
    items : iterable of (path, IngestOptions)
        The exports of a load, in load order.
    n, per_file : int
        Cells to measure in all, and at most from one file.

    Returns
    -------
    list of (extent_um, path)
        :attr:`ProcessedMap.extent_um` (um: the side of the centred square holding the cell) and its file.
    """
    items = list(items)
    spread = np.unique(np.linspace(0, len(items) - 1, min(n, len(items))).round().astype(int)).tolist()
    taken = set(spread)
    order = spread + [i for i in range(len(items)) if i not in taken]
    found: list[tuple[float, Path]] = []
    for i in order:
        path, options = items[i]
        measuring = options.replace(config=dataclasses.replace(
            _MEASURING, background_order=options.config.background_order,
            alpha_ml_per_g=options.config.alpha_ml_per_g))
        try:
            with contextlib.closing(iter_processed(path, measuring, on_error=lambda exc: None)) as cells:
                found += [(p.extent_um, Path(path)) for _, p, _ in itertools.islice(cells, per_file)]
        except ExportError:
            continue
        if len(found) >= n:
            break
    return found[:n]


def fit_geometry(extent_um: float, *, pixel_size_um: float | None = None, out_size: int | None = None,
                 ) -> tuple[float, int]:
    """``(pixel_size_um, out_size)`` of an output window for cells up to ``extent_um`` across.

    Parameters
    ----------
    extent_um : float
        The widest cell (um); the window must hold ``GEOMETRY_MARGIN`` times it.
    pixel_size_um, out_size : optional
        What the user fixed; the other is chosen (``OUT_PIXEL_SIZES_UM`` / ``OUT_SIZES``, else the
        smallest multiple of 32 px).

    Returns
    -------
    (pixel size in um, window side in px); the window may be too small when both are given.
    """
    need_um = GEOMETRY_MARGIN * extent_um
    default = PreprocessConfig()
    if pixel_size_um is None and out_size is None:
        sizes = [(default.out_pixel_size_um, default.out_size)]
        sizes += [(px, s) for px in OUT_PIXEL_SIZES_UM for s in OUT_SIZES]
        return next(((px, s) for px, s in sizes if px * s >= need_um), sizes[-1])
    if out_size is None:
        fits = [s for s in OUT_SIZES if s * pixel_size_um >= need_um]
        return pixel_size_um, fits[0] if fits else 32 * math.ceil(need_um / pixel_size_um / 32)
    if pixel_size_um is None:
        fits = [px for px in OUT_PIXEL_SIZES_UM if out_size * px >= need_um]
        return (fits[0] if fits else OUT_PIXEL_SIZES_UM[-1]), out_size
    return pixel_size_um, out_size


def output_geometry(items: Iterable[tuple[Path, IngestOptions]], *, pixel_size_um: float | None = None,
                    out_size: int | None = None, existing: dict | None = None,
                    ) -> tuple[PreprocessConfig, str]:
    """The output geometry of a load: an existing dataset's, else fitted to the cells of the exports.

    What the user does not give (``pixel_size_um``, ``out_size``) is chosen with :func:`fit_geometry`
    from ``GEOMETRY_SAMPLE`` cells spread over the exports (:func:`measure_cells`); a window the user gives
    that cannot hold them is refused, one with less than ``GEOMETRY_MARGIN`` is warned about.

    Parameters
    ----------
    items : iterable of (path, IngestOptions)
        The exports to load, in load order (only a few cells are read).
    pixel_size_um, out_size : optional
        ``--out-pixel-size-um`` and ``--out-size``.
    existing : dict, optional
        The settings of the dataset appended to (they win: an append must match them).

    Returns
    -------
    (PreprocessConfig, str): the geometry and one line saying what was chosen and why (for the log; empty
    for an existing dataset's).

    Raises
    ------
    ExportError
        Naming the file of the widest cell when the window given cannot hold more than
        1 / ``MAX_TOO_WIDE`` of the cells measured (fewer: a warning, and those cells are refused one by one).
    """
    settings = dict(existing or {})
    given = {"pixel_size_um": pixel_size_um, "out_size": out_size}
    settings.update({k: v for k, v in given.items() if v is not None})
    config = PreprocessConfig.from_settings(settings)
    if existing:
        return config, ""
    cells = measure_cells(items)
    if not cells:
        return config, f"output geometry {_geometry_text(config)}: no cell could be measured to fit it"
    widest, where = max(cells, key=lambda c: c[0])
    px, size = fit_geometry(widest, pixel_size_um=pixel_size_um, out_size=out_size)
    config = PreprocessConfig.from_settings({**settings, "pixel_size_um": px, "out_size": size})
    measured = (f"the widest of {len(cells)} cells measured spans {widest:.1f} um and the window should "
                f"hold {GEOMETRY_MARGIN:g} times it")
    too_wide = sum(extent > px * size for extent, _ in cells)
    if too_wide * MAX_TOO_WIDE > len(cells):
        raise ExportError(where, f"{too_wide} of {len(cells)} cells measured do not fit: "
                                 + window_too_small(config, widest, what="the widest"))
    if px * size < GEOMETRY_MARGIN * widest:
        log.warning("output geometry %s leaves little room: %s; %d of them do not fit and wider cells will "
                    "be refused (give at least --out-size %d)", _geometry_text(config), measured, too_wide,
                    math.ceil(GEOMETRY_MARGIN * widest / px))
    chosen = [option for option, value in (("--out-pixel-size-um", pixel_size_um), ("--out-size", out_size))
              if value is None]
    why = ("chosen from the data" if len(chosen) == 2 else
           f"{chosen[0]} chosen from the data" if chosen else "as given")
    return config, f"output geometry {_geometry_text(config)} ({why}): {measured}"


def _geometry_text(config: PreprocessConfig) -> str:
    return (f"{config.out_size} px at {config.out_pixel_size_um:g} um/px "
            f"({config.out_size * config.out_pixel_size_um:g} um window)")
