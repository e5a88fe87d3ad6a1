"""``python -m opdcells load`` (also ``python load_data.py``): microscope OPD/phase exports into an opdcells
HDF5 dataset (appending, atomically).

Usage:
  python -m opdcells load SOURCE... --out DATASET.h5            # SOURCE/<class>/**/<exports>
  python -m opdcells load FOLDER_OR_FILES... --label NAME --out DATASET.h5
  python -m opdcells load --manifest FILES.csv --out DATASET.h5  # columns path,label[,units,...]
  python -m opdcells load --inspect FILE_OR_FOLDER... [reading options]   # what each file is; writes nothing
  python -m opdcells load --formats                               # the readable formats (README table)

Files already in the dataset (same SHA-256 and reading options) are skipped before decoding; a run
writes a temporary copy beside the dataset and replaces the original only when complete, so an
interrupted run leaves the old dataset intact.

Exit status (:mod:`opdcells.console`): 0 everything loaded (or nothing new), 1 some files or maps were
skipped, 2 nothing could be loaded, a usage / metadata / dataset error, or a bad file under --strict
(the dataset is then left untouched). 130 when interrupted.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .console import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_SKIPPED, setup_logging
from .dataset import DatasetWriter, open_dataset, real_path, shard_folder
from .describe import describe_export, format_description
from .errors import ExportError, OPDCellsError, storable_text
from .ingest import (
    Found,
    IngestOptions,
    ProcessedExport,
    add_reading_options,
    discover,
    file_key,
    labelled_twice,
    output_geometry,
    positive_number,
    read_manifest,
    reading_options,
    stack_group,
)
from .preprocess import PreprocessConfig
from .readers import format_table

log = logging.getLogger(__name__)


EPILOG = """\
layouts:
  SOURCE/<class>/**/<export>     one sub-folder per class, exports at any depth below it
  --label NAME FOLDER|FILE...    everything given is of class NAME
  --manifest CSV                 path,label[,units,wavelength_nm,pixel_size_um,medium_index,var,group]

Metadata: a manifest row wins over the options, the options win over what the file says;
missing units or pixel size (or wavelength for rad) is an error naming the file.
Acquisition group of each map: the stack / field-of-view file, else the folder of the file.

exit status:
  0  everything loaded, or nothing new      1  some files or maps were skipped
  2  nothing could be loaded, usage / metadata / dataset error, or --strict stop (dataset unchanged)
"""


DESCRIPTION = "Load microscope OPD/phase exports into an opdcells HDF5 dataset (appending, atomically)."
PARSER = dict(description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser(prog: str = "load_data.py") -> argparse.ArgumentParser:
    """The stand-alone parser of ``load_data.py`` (the same options as ``python -m opdcells load``).

    Parameters
    ----------
    prog : str
        The program name usage lines show.

    Returns
    -------
    argparse.ArgumentParser
    """
    return add_arguments(argparse.ArgumentParser(prog=prog, **PARSER))


def register(subparsers) -> None:
    """Add the ``load`` subcommand (see :mod:`opdcells.cli`).

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The subcommands of ``python -m opdcells``.
    """
    p = add_arguments(subparsers.add_parser("load", help="load exports into a dataset", **PARSER))
    p.set_defaults(run=lambda args: execute(p, args), summary_logger=__name__)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``load`` to ``p``; return it.

    Parameters
    ----------
    p : argparse.ArgumentParser
        A parser (``load_data.py``'s or the ``load`` subcommand's).

    Returns
    -------
    argparse.ArgumentParser
        ``p``, with SOURCE, ``--out``, the reading options (:func:`opdcells.ingest.add_reading_options`),
        ``--out-pixel-size-um`` (um), ``--out-size`` (px) and the rest.
    """
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="folder with one sub-folder per class (or, with --label, folders/files of one class)")
    p.add_argument("--out", type=Path, metavar="DATASET.h5",
                   help="dataset to create or extend (required unless --inspect or --formats)")
    p.add_argument("--inspect", action="store_true",
                   help="print what each SOURCE file is (format, images, shape, metadata found and missing, "
                        "hologram sideband) with the reading options given, and write nothing")
    p.add_argument("--formats", action="store_true", help="print the table of readable formats and exit")
    p.add_argument("--label", metavar="NAME", help="class of every SOURCE (no class sub-folders)")
    p.add_argument("--manifest", type=Path, metavar="CSV",
                   help="CSV with columns path,label and optional units,wavelength_nm,pixel_size_um,"
                        "medium_index,var per row (row values win over the options below)")
    add_reading_options(p)
    p.add_argument("--out-pixel-size-um", type=positive_number, metavar="UM",
                   help="pixel size of the dataset maps (default: the existing dataset's, else fitted to "
                        "the cells: 0.25 unless they need more than 64 um)")
    p.add_argument("--out-size", type=int, metavar="PX",
                   help="side of the dataset maps (default: the existing dataset's, else fitted to the "
                        "cells: 128 unless they need more)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad file, changing nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary, only problems")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    return p


# --------------------------------------------------------------------------------------- set-up


def resolve_config(args: argparse.Namespace, jobs: list[Job]) -> PreprocessConfig:
    """Output geometry: the existing dataset's, else fitted to the cells (``ingest.output_geometry``).

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options of ``load``.
    jobs : list of Job
        The files to load (their cells are measured when the geometry is fitted).

    Returns
    -------
    PreprocessConfig

    Raises
    ------
    DatasetError
        When ``--out`` exists but is not a dataset.
    ExportError
        When the window given cannot hold most of the cells (naming the file of the widest cell).
    """
    existing = None
    if args.out.exists():
        with open_dataset(args.out) as ds:
            existing = ds.settings
    config, why = output_geometry([(job.found.path, job.options) for job in jobs if not job.conflict],
                                  pixel_size_um=args.out_pixel_size_um, out_size=args.out_size,
                                  existing=existing)
    if why:
        log.info("%s", why)
    return config


@dataclass
class Job:
    """One export file to load: where it is, its class and group, and how to read it.

    Attributes
    ----------
    found : Found
        The file, its class and acquisition group.
    options : IngestOptions
        How to read it (a manifest row's overrides included).
    conflict : str or None
        Why the file cannot be loaded at all (e.g. given two labels).
    """

    found: Found
    options: IngestOptions
    conflict: str | None = None   # why the file cannot be loaded at all (e.g. given two labels)


def collect_jobs(args: argparse.Namespace, options: IngestOptions) -> list[Job]:
    """Jobs from SOURCE folders/files and the manifest, in a deterministic order; an export reached
    under two labels becomes a job that fails naming both (it is never loaded under either).

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options of ``load``.
    options : IngestOptions
        The reading options of the command line.

    Returns
    -------
    list of Job

    Raises
    ------
    ExportError
        For a missing source, a file without label or a bad manifest.
    """
    store = shard_folder(real_path(args.out))  # the output's own shards are not exports
    jobs = [Job(f, options) for f in discover(args.sources, args.label, exclude=[args.out])
            if store not in Path(os.path.realpath(f.path)).parents]
    if args.manifest is not None:
        jobs += [Job(f, options.replace(**overrides)) for f, overrides in read_manifest(args.manifest)]
    conflicts = labelled_twice(job.found for job in jobs)
    for job in jobs:
        job.conflict = conflicts.get(os.path.realpath(job.found.path))
    return jobs


# --------------------------------------------------------------------------------------- loading


@dataclass
class Summary:
    """What a ``load`` run did, for its summary line and exit status.

    Attributes
    ----------
    maps_added : int
        Maps (cells) added to the dataset.
    files_added : int
        Files that added maps.
    files_present : int
        Files already in the dataset.
    skipped : list of str
        "path: reason" of each skipped file.
    bad_maps : int
        Bad maps or cells inside files that were loaded.
    content : dict
        SHA-256 -> the first (label, path) met with those bytes in this run.
    """
    maps_added: int = 0
    files_added: int = 0
    files_present: int = 0
    skipped: list[str] = field(default_factory=list)   # "path: reason" of each skipped file
    bad_maps: int = 0                                  # bad maps/cells inside files that were loaded
    content: dict[str, tuple[str, Path]] = field(default_factory=dict)   # SHA-256 -> first (label, path)

    def status(self) -> int:
        if not self.skipped and not self.bad_maps:
            return EXIT_OK
        return EXIT_SKIPPED if self.files_added or self.files_present else EXIT_FAILED


class StrictStop(ExportError):
    """A bad file or map under --strict."""


def load_job(job: Job, writer: DatasetWriter, summary: Summary, *, strict: bool) -> None:
    """Append one export to ``writer``, updating ``summary``; raises ExportError for a bad file.

    Parameters
    ----------
    job : Job
        The file.
    writer : DatasetWriter
        The open dataset run.
    summary : Summary
        Updated with what was added or found present.
    strict : bool
        A bad map stops the run (StrictStop) instead of being skipped.

    Raises
    ------
    ExportError
        When the file has a conflict or no label, is already in the dataset under another label, or
        cannot be read; ``StrictStop`` for a bad map under ``strict``.
    """
    path = job.found.path
    if job.conflict:
        raise ExportError(path, job.conflict)
    if job.found.label is None:
        raise ExportError(path, "not inside a class folder (give --label or move it into SOURCE/<class>/)")
    sha, key = file_key(path, job.options)
    check_content_label(summary, sha, job)
    if writer.has_file(key):
        stored_as = writer.labels_of(sha)
        if job.found.label not in stored_as:
            stored = ", ".join(map(repr, sorted(stored_as)))
            raise ExportError(path, f"already in the dataset as {stored}, given here as "
                                    f"{job.found.label!r}: one export cannot have two labels (to relabel it, "
                                    "build the dataset again without it)")
        log.debug("%s: already in the dataset", path)
        summary.files_present += 1
        return

    bad = BadMaps(path)

    def bad_map(exc: ExportError) -> None:
        if strict:
            raise StrictStop(exc.path, exc.reason)
        bad.add(exc)

    try:
        with ProcessedExport(path, job.options, on_error=bad_map) as export:
            is_stack = job.options.fields or len(export) > 1
            group = stack_group(job.found.group, path) if is_stack else job.found.group
            added = writer.add_file(key, path=storable_text(str(path.absolute())), sha256=sha,
                                    label=storable_text(job.found.label), group=storable_text(group),
                                    maps=export)
    finally:
        bad.report()
    summary.bad_maps += bad.count
    if not added:
        why = "no usable cells found" if job.options.fields else "none of its maps is usable"
        raise ExportError(path, why)
    summary.maps_added += added
    summary.files_added += 1


class BadMaps:
    """The bad maps (or cells) of one file, kept as counts per one-line reason (bounded memory).

    Only the reason text, a count and the first ``shown`` positions are kept, never the exceptions
    (their tracebacks hold the maps): a file with a million bad maps costs a few lines.
    """

    def __init__(self, path: Path, shown: int = 5):
        """Start with no bad map.

        Parameters
        ----------
        path : Path
            The file.
        shown : int
            Positions kept (and reported) per reason.
        """
        self.path, self.shown = path, shown
        self.count = 0
        self._by_reason: dict[str, list] = {}   # reason -> [count, first positions]

    def add(self, exc: ExportError) -> None:
        """Count ``exc`` under its reason; keep its position only among the first ``shown``."""
        entry = self._by_reason.setdefault(exc.reason, [0, []])
        entry[0] += 1
        if len(entry[1]) < self.shown:
            entry[1].append(exc.path[len(str(self.path)):].strip(" []"))
        self.count += 1

    def report(self) -> None:
        """One warning line per distinct reason."""
        for reason, (n, where) in self._by_reason.items():
            listed = "; ".join(where) + (f" and {n - len(where)} more" if n > len(where) else "")
            log.warning("skipped %s of %s (%s): %s", _count(n, "map"), self.path, listed, reason)


def check_content_label(summary: Summary, sha: str, job: Job) -> None:
    """Warn, naming both, when this file's bytes were already met in this run under another label.

    Parameters
    ----------
    summary : Summary
        Holds the first (label, path) of each SHA-256 met.
    sha : str
        The file's SHA-256.
    job : Job
        The file.
    """
    label, first = summary.content.setdefault(sha, (job.found.label, job.found.path))
    if label != job.found.label:
        log.warning("%s has the same content as %s but the label %r there and %r here",
                    job.found.path, first, label, job.found.label)


def load_all(jobs: list[Job], writer: DatasetWriter, *, strict: bool, progress: bool) -> Summary:
    """Load every job into ``writer``; bad files are logged and skipped (raised under ``strict``).

    Parameters
    ----------
    jobs : list of Job
        The files.
    writer : DatasetWriter
        The open dataset run.
    strict : bool
        Stop at the first bad file or map.
    progress : bool
        Show a progress bar (on stderr, for long runs only).

    Returns
    -------
    Summary

    Raises
    ------
    StrictStop
        At a bad file or map under ``strict``.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    summary = Summary()
    loggers = [logging.getLogger("opdcells")]   # the handler of setup_logging (``log`` is its child)
    bar = tqdm(jobs, unit="file", file=sys.stderr, mininterval=0.5, delay=1.0,  # long runs only
               disable=None if progress else True)  # None: only on a terminal
    with logging_redirect_tqdm(loggers=loggers), bar:
        for job in bar:
            try:
                load_job(job, writer, summary, strict=strict)
            except ExportError as exc:
                if strict:
                    raise StrictStop(exc.path, exc.reason) from None
                log.warning("skipped %s", exc)
                summary.skipped.append(str(exc))
    return summary


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def report(summary: Summary, writer: DatasetWriter, out: Path) -> None:
    """The summary line: what was added, what was already there, what was skipped.

    Parameters
    ----------
    summary : Summary
        What the run did.
    writer : DatasetWriter
        The dataset (its size and classes after the run).
    out : Path
        The dataset, as the line names it.
    """
    bad = f"; {_count(summary.bad_maps, 'bad map')} skipped" if summary.bad_maps else ""
    log.info("%s: added %s from %s (now %s, %s); %s already present; %s skipped%s", out,
             _count(summary.maps_added, "map"), _count(summary.files_added, "file"),
             _count(len(writer), "map"), _count(len(writer.class_names), "class"),
             _count(summary.files_present, "file"), _count(len(summary.skipped), "file"), bad)


def inspect(args: argparse.Namespace) -> int:
    """``--inspect``: describe every export given (files, or folders walked) on stdout; write nothing.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options of ``load``.

    Returns
    -------
    int
        Exit status: 0 when every file can be read, 1 when some cannot, 2 when none can.
    """
    options = IngestOptions(**reading_options(args))
    paths = [f.path for f in discover(args.sources, "-")]
    if args.manifest is not None:
        paths += [f.path for f, _ in read_manifest(args.manifest)]
    if not paths:
        log.error("no export files found in %s", ", ".join(map(str, args.sources or [args.manifest])))
        return EXIT_FAILED
    failed = 0
    for path in paths:
        info = describe_export(path, options)
        failed += info["error"] is not None
        print(format_description(info))
    return EXIT_OK if not failed else EXIT_FAILED if failed == len(paths) else EXIT_SKIPPED


def run(args: argparse.Namespace) -> int:
    """Load the exports of ``args`` into ``args.out``: collect the files, fix the output geometry, write.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options of ``load``.

    Returns
    -------
    int
        Exit status (:mod:`opdcells.console`): 0 all loaded, 1 some files or maps skipped, 2 nothing loaded.

    Raises
    ------
    OPDCellsError
        For a bad source, manifest or dataset (:func:`execute` turns it into one line).
    """
    jobs = collect_jobs(args, IngestOptions(**reading_options(args)))
    if not jobs:
        log.error("no export files found in %s", ", ".join(map(str, args.sources or [args.manifest])))
        return EXIT_FAILED
    config = resolve_config(args, jobs)
    for job in jobs:
        job.options = job.options.replace(config=config)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with DatasetWriter(args.out, config) as writer:
        summary = load_all(jobs, writer, strict=args.strict, progress=not args.quiet)
    report(summary, writer, args.out)
    return summary.status()


def main(argv: list[str] | None = None, prog: str = "load_data.py") -> int:
    """``load_data.py``: parse ``argv`` (default ``sys.argv[1:]``), load, return the exit status.

    Parameters
    ----------
    argv : list of str, optional
        The command line without the program.
    prog : str
        The program name usage lines show.

    Returns
    -------
    int
        Exit status (:mod:`opdcells.console`).
    """
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage error (2) or --help (0)
        return int(exc.code or 0)
    restore = setup_logging(args.quiet, args.verbose, summary=__name__)
    try:
        return execute(parser, args)
    finally:
        restore()


def execute(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run ``load`` with parsed ``args`` (logging set up); every error becomes one line and an exit status.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The parser, for usage errors.
    args : argparse.Namespace
        The parsed options of ``load``.

    Returns
    -------
    int
        0 all loaded (or ``--formats``), 1 some skipped, 2 failed or nothing loaded, 130 interrupted.
    """
    if args.formats:
        print(format_table(), end="")
        return EXIT_OK
    if args.out is None and not args.inspect:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: the following arguments are required: --out", file=sys.stderr)
        return EXIT_FAILED
    if not args.sources and args.manifest is None:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: give at least one SOURCE or --manifest", file=sys.stderr)
        return EXIT_FAILED
    try:
        return inspect(args) if args.inspect else run(args)
    except StrictStop as exc:
        log.error("stopped at a bad file (--strict), dataset unchanged: %s", exc)
    except (OPDCellsError, ValueError) as exc:
        log.error("%s", exc)
    except KeyboardInterrupt:
        log.error("interrupted, dataset unchanged")
        return EXIT_INTERRUPTED
    return EXIT_FAILED
