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
import hashlib
import json
import logging
import math
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .errors import ExportError, MetadataError, OPDCellsError, safe_text
from .metadata import UNITS, Meta
from .preprocess import (
    DEFAULT_RANGES,
    PlausibleRanges,
    PreprocessConfig,
    ProcessedMap,
    opd_of,
    preprocess_map,
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

    var: variable/key/dataset name inside the export (None: the reader picks).
    stack_axis: axis of a 3-D array that indexes maps (None: format default).
    units, wavelength_nm, pixel_size_um, medium_index: user metadata (see :class:`Meta`).
    fields: each map is a field of view, segmented into single cells first.
    touching: with ``fields``, "split" touching cells (watershed) or "drop" them (isolated cells only; for
        smears where cells overlap).
    masks: with ``fields`` (implied), the cells come from a label image beside each field instead:
        a pattern with ``{stem}`` relative to the field's folder (``"{stem}_cp_masks.png"``); each
        connected piece of a label value is one cell (see :func:`opdcells.segment.read_label_image`).
    cell_diameter_um: with automatic ``fields``, (min, max) equivalent diameter of a cell in um (smaller
        objects are debris or fragments, larger ones clumps); None: ``segment_field``'s defaults (2, 30).
    hologram: exports are raw off-axis holograms to reconstruct.
    channel: channel holding the maps in multi-channel files (ImageJ hyperstacks, OME-TIFF, RGB pages).
    scale, offset: calibration of the stored samples, ``value = offset + scale * sample`` (required for
        integer samples unless the file carries its own, e.g. ImageJ's; wins over the file's).
    invert_phase: multiply every map by -1 (exports whose phase sign convention is reversed).
    sideband, filter_name, filter_size: phase retrieval of interferograms (see :class:`Retrieval`).
    config: preprocessing settings (output pixel size and size, background order, alpha).
    ranges: plausible physical ranges of each cell (:class:`~opdcells.preprocess.PlausibleRanges`).
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
                         cell_diameter_um=self.cell_diameter_um)
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
                   "filter_size", "touching", "masks", "cell_diameter_um")


def positive_number(text: str) -> float:
    """argparse type: a positive finite number."""
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
    """Add the options that say how to read exports (shared by ``load_data.py`` and ``predict``)."""
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
    add("--masks", metavar="PATTERN", type=_mask_pattern,
        help="cells from a label image beside each field, e.g. '{stem}_cp_masks.png', '{stem}_seg.npy' "
             "(cellpose) or '{stem}_labels.tif' (Fiji); implies --fields")


def plausible_range(text: str) -> tuple[str, tuple[float, float]]:
    """argparse type: ``NAME=LOW:HIGH`` -> ``(NAME, (LOW, HIGH))``."""
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

    Raises ValueError for an unknown or empty plausibility range.
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
    that a device is never even opened. Raises ExportError.
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
    """Raise ExportError unless ``path`` is a regular file or a symbolic link to one (never opens it)."""
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
    not a regular file (see :func:`open_regular`)."""
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
    """True for a visible file whose name ends in one of ``readers.EXPORT_SUFFIXES``."""
    lower = name.lower()
    return not name.startswith(".") and any(lower.endswith(s.lower()) for s in EXPORT_SUFFIXES)


def group_of(folder: Path, root: Path) -> str:
    """Folder relative to ``root`` as a POSIX path (``root``'s own name for ``root`` itself)."""
    try:
        rel = folder.relative_to(root).as_posix()
    except ValueError:
        return folder.as_posix()
    return root.name if rel == "." else rel


def stack_group(found_group: str, path: Path) -> str:
    """Group of a multi-map (stack or field-of-view) file: the file itself, under its folder group."""
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
    groups are relative to the source's parent (``day1/session_2``). ``exclude``: files to leave
    out (e.g. the output dataset). Raises ExportError for a missing source or a file without label.
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
    symbolic links): their real path mapped to a reason naming every label and where it came from."""
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

    Columns: ``path``, ``label`` (required), ``units``, ``wavelength_nm``, ``pixel_size_um``,
    ``medium_index``, ``var``, ``group`` (optional, empty = not given). Relative paths are relative to
    the CSV; the acquisition group is the ``group`` column, else the folder relative to the CSV's
    folder. ExportError names the CSV and the line.
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


class ProcessedExport:
    """One opened export: ``len()`` is the number of maps in the file, iterating yields
    ``(source_index, ProcessedMap, Meta)`` (several per map with ``options.fields``).

    ``on_error``: called with the ExportError of a bad map of a stack (or a bad cell of a field), which
    is then skipped; without it, the error is raised. File-level failures (cannot open, missing
    metadata, truncated stream, the only map of the file is bad) always raise ExportError.
    """

    def __init__(self, path: str | os.PathLike, options: IngestOptions, *,
                 on_error: Callable[[ExportError], None] | None = None):
        self.path = Path(path)
        self.options = options
        self.on_error = on_error
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
        with _export_errors(self.path):
            file_meta = self._reader.file_meta
            self._check_units(file_meta)
            scale = self._sample_scale()
            sign = -1.0 if self.options.invert_phase else 1.0
            for raw in self._reader:
                if getattr(raw, "error", None) is not None:    # an archive member that cannot be read
                    self._bad(raw.error, whole_file=self._n <= 1)
                    continue
                meta = self.options.user_meta.over(raw.meta.over(file_meta)).check(
                    self.path, self._reader.meta_problems)
                data = raw.data if scale is None else scale.apply(raw.data)
                yield from self._process(sign * data, raw.index, meta)

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

    def _bad(self, exc: ExportError, *, whole_file: bool = False) -> None:
        """Report a bad map/cell to ``on_error``; raise it when there is no handler or it is the file."""
        if self.on_error is None or whole_file:
            raise exc
        self.on_error(exc)

    def _process(self, data, index: int, meta: Meta) -> Iterator[tuple[int, ProcessedMap, Meta]]:
        config = self.options.config
        single = self._n <= 1
        if not self.options.fields:
            try:
                yield index, preprocess_map(data, meta, config, path=self._where(index),
                                            ranges=self.options.ranges), meta
            except ExportError as exc:
                self._bad(exc, whole_file=single)
            return
        try:
            crops, crop_meta = _segment(data, meta, config, self._where(index), self.options, self._labels())
        except ExportError as exc:
            self._bad(exc, whole_file=single)
            return
        for cell, crop in enumerate(crops):
            try:
                yield index, preprocess_map(crop.data, crop_meta, config, path=self._where(index, cell),
                                            ranges=self.options.ranges), meta
            except ExportError as exc:
                self._bad(exc)


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


def _segment(data, meta: Meta, config: PreprocessConfig, where: str, options: IngestOptions, labels=None):
    """Cell crops (in nm) of one field of view and the metadata that describes them.

    ``labels``: ``(mask file, label image)`` of the field (cells from the user's masks); None: automatic.
    """
    opd_nm = opd_of(data, meta, config, where)
    if labels is not None:
        mask_file, label_image = labels
        crops = segment_labelled(opd_nm, meta.pixel_size_um, label_image, path=where, mask_file=mask_file)
    else:
        limits = {}
        if options.cell_diameter_um is not None:
            limits = dict(zip(("min_diameter_um", "max_diameter_um"), options.cell_diameter_um, strict=True))
        crops = segment_field(opd_nm, meta.pixel_size_um, touching=options.touching, path=where, **limits)
    return crops, dataclasses.replace(meta, units="nm")


def iter_processed(path: str | os.PathLike, options: IngestOptions, *,
                   on_error: Callable[[ExportError], None] | None = None,
                   ) -> Iterator[tuple[int, ProcessedMap, Meta]]:
    """Yield ``(source_index, ProcessedMap, Meta)`` for every map (or cell) of one export.

    Raises ExportError naming the file; ``on_error`` as in :class:`ProcessedExport`.
    """
    with ProcessedExport(path, options, on_error=on_error) as export:
        yield from export
