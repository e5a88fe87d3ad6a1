"""Series inside ``.zip`` archives: every member read by its own reader, member by member.

A zip of exports (``.npy``, ``.npz``, ``.mat``, TIFF, HDF5, ...) is one series: its members, sorted by
name, are extracted one at a time into a private temporary folder and opened with
:func:`opdcells.readers.open_export`; their maps follow each other (``source_index`` counts across the
archive). A member that cannot be read does not stop the others: it yields a :class:`MemberError` map that
ingest reports with the member's name and reason, like a bad map of a stack. Zip formats qpformat knows
(Phasics ``SID PHA*.tif`` series; hologram TIFF series with ``--hologram``) go to
:mod:`opdcells.readers_qpformat` first.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import ExportError
from .metadata import Meta
from .readers import ZIP_MAGIC, RawMap, Reader, _head, _reading, open_export
from .retrieval import Retrieval

log = logging.getLogger(__name__)

#: Archive suffixes read as series (``.npz`` is a zip too, but NumPy's own format).
ARCHIVE_SUFFIXES = (".zip",)


@dataclass
class MemberError(RawMap):
    """Stands for the maps of an archive member that cannot be read: ``error`` says why (ingest reports
    it as a bad map and goes on with the next member).

    Attributes
    ----------
    data : ndarray
        Empty (0, 0): there is no map.
    index : int
        The member's position among the archive's exports.
    meta : Meta
        Empty.
    error : ExportError or None
        Why the member cannot be read.
    """

    error: ExportError | None = None


def _is_member_export(name: str, suffixes: set[str]) -> bool:
    """A file member with an export suffix, not hidden, not macOS resource-fork litter, not an archive."""
    path = PurePosixPath(name)
    if name.endswith("/") or any(p.startswith(".") or p == "__MACOSX" for p in path.parts):
        return False
    suffix = path.suffix.lower()
    return suffix in suffixes and suffix not in ARCHIVE_SUFFIXES


def archive_members(path, suffixes: set[str]) -> list[str]:
    """Names of the export members of a zip archive, sorted (ExportError for a damaged archive).

    Hidden members, macOS resource-fork litter, folders and nested archives are left out.

    Parameters
    ----------
    path : str or os.PathLike
        The zip archive.
    suffixes : set of str
        Export suffixes (lower case, with the dot).

    Returns
    -------
    list of str
        Member names.

    Raises
    ------
    ExportError
        When the archive cannot be read.
    """
    with _reading(path, "cannot read the zip archive"), zipfile.ZipFile(path) as zf:
        return sorted(n for n in zf.namelist() if _is_member_export(n, suffixes))


class ZipSeriesReader(Reader):
    """Zip archive of exports (any format above), read member by member with per-member reasons."""

    name = "zip-series"
    suffixes = ARCHIVE_SUFFIXES
    reconstructs = True
    #: its members are exports: ``open_export(hologram=True)`` passes ``hologram=True`` on to them
    holds_exports = True

    @classmethod
    def _sniff(cls, path):
        from .readers import EXPORT_SUFFIXES

        return _head(path, len(ZIP_MAGIC)) == ZIP_MAGIC and bool(archive_members(path, EXPORT_SUFFIXES))

    def __init__(self, path, *, var=None, stack_axis=None, retrieval: Retrieval | None = None,
                 hologram: bool = False):
        """List the archive's export members and survey each (maps, shape, error) without keeping their maps.

        Parameters
        ----------
        path : str or os.PathLike
            The zip archive.
        var : str, optional
            Variable to read from each container member (``.mat``, ``.npz``).
        stack_axis : int, optional
            Axis of a 3-D stack in each member.
        retrieval : Retrieval, optional
            Sideband and Fourier filter for members holding holograms.
        hologram : bool
            Read every member as raw off-axis holograms.

        Raises
        ------
        ExportError
            When the archive cannot be read or holds no export files (a member that cannot be read is
            reported as a :class:`MemberError` map instead).
        """
        from .readers import EXPORT_SUFFIXES

        super().__init__(path, var=var, stack_axis=stack_axis)
        self._kw = {"var": var, "stack_axis": stack_axis, "retrieval": retrieval, "hologram": hologram}
        self._folder = Path(tempfile.mkdtemp(prefix="opdcells-zip-"))
        self._resources.callback(shutil.rmtree, self._folder, ignore_errors=True)
        try:
            self._members = archive_members(self.path, EXPORT_SUFFIXES)
            if not self._members:
                raise ExportError(self.path, "the zip archive holds no export files")
            #: per member: number of maps (1 for a member that cannot be read) and its error, if any
            self._counts: list[int] = []
            self._errors: list[ExportError | None] = []
            self._shape: tuple[int, int] | None = None
            for member in self._members:
                self._survey(member)
        except BaseException:
            self.close()
            raise
        self._names = [f"{m}" if n == 1 else f"{m} [map {j}]"
                       for m, n in zip(self._members, self._counts, strict=True) for j in range(n)]
        log.debug("%s: zip series of %d member(s), %d map(s)", self.path, len(self._members), len(self))

    def _extract(self, member: str) -> Path:
        """Extract one member into the private folder (flat, numbered: member names never make paths)."""
        index = self._members.index(member)
        target = self._folder / f"{index:06d}{PurePosixPath(member).suffix.lower()}"
        with _reading(self.path, f"cannot extract {member!r}"), zipfile.ZipFile(self.path) as zf, \
                zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return target

    def _survey(self, member: str) -> None:
        """Count the maps of one member (opening it, reading no map), or record why it cannot be read."""
        try:
            with open_export(self._extract(member), **self._kw) as reader:
                self._counts.append(len(reader))
                self._errors.append(None)
                self._shape = self._shape or tuple(reader.map_shape)
        except ExportError as exc:
            self._counts.append(1)
            self._errors.append(exc)
        finally:
            for leftover in self._folder.iterdir():
                leftover.unlink()

    def member_name(self, index: int) -> str | None:
        """Archive member holding map ``index`` (with the map number inside it for multi-map members)."""
        return self._names[index] if 0 <= index < len(self._names) else None

    @property
    def map_shape(self) -> tuple[int, int]:
        return self._shape or (0, 0)

    def __len__(self) -> int:
        return sum(self._counts)

    def __iter__(self) -> Iterator[RawMap]:
        index = 0
        for member, count, error in zip(self._members, self._counts, self._errors, strict=True):
            if error is not None:
                yield self._member_error(index, member, error.reason)
                index += count
                continue
            target = self._extract(member)
            try:
                with open_export(target, **self._kw) as reader:
                    for raw in reader:
                        yield RawMap(raw.data, index + raw.index, raw.meta.over(reader.file_meta))
            except ExportError as exc:
                yield self._member_error(index, member, exc.reason)
            finally:
                target.unlink(missing_ok=True)
            index += count

    def _member_error(self, index: int, member: str, reason: str) -> MemberError:
        where = f"{self.path} [map {index} ({member})]"
        return MemberError(np.empty((0, 0)), index, Meta(), ExportError(where, reason))


def _register() -> None:
    """Add the zip series reader last to :mod:`opdcells.readers`' registry (its sniff is the loosest)."""
    from . import readers

    if ZipSeriesReader not in readers.READERS:
        readers.READERS.append(ZipSeriesReader)
        readers.EXPORT_SUFFIXES.update(ARCHIVE_SUFFIXES)


_register()
