"""What an export is, before a long run: format, images, shape, metadata found and missing (``--inspect``).

``describe_export`` opens a file with the same reader and options as ``load_data.py`` / ``predict`` would,
reads at most one image (to report the hologram sideband chosen, or that an image looks like a raw
hologram given without ``--hologram``) and writes nothing. ``format_description`` renders it for the CLI.
"""
from __future__ import annotations

import os

from .errors import ExportError, MetadataError
from .ingest import IngestOptions
from .readers import ArrayReader, open_export
from .readers_qpformat import qpformat_format
from .retrieval import looks_like_hologram

_UNITS = {"wavelength_nm": "nm", "pixel_size_um": "um", "medium_index": ""}


def describe_export(path: str | os.PathLike, options: IngestOptions | None = None) -> dict:
    """Describe one export as ``load_data.py`` would read it with ``options``; never raises for the file.

    Parameters
    ----------
    path : str or os.PathLike
        The export.
    options : IngestOptions, optional
        Reading options and user metadata (default: none).

    Returns
    -------
    dict
        ``path``; ``qpformat``: the qpformat format name recognising the file (None if none);
        ``error``: the one-line reason the file cannot be read (None if it can); and when it can:
        ``format`` (opdcells reader name), ``n_maps``, ``shape`` (rows, columns), ``variable``,
        ``meta`` (what the file says, :meth:`Meta.as_dict`), ``missing`` (required metadata still unknown
        after the options), ``sideband`` (+1/-1 chosen for the first hologram, None if not a hologram),
        ``notes`` (warnings such as a hologram-like image read without ``--hologram``).
    """
    options = options or IngestOptions()
    info = {"path": str(path), "qpformat": qpformat_format(path), "error": None, "notes": []}
    try:
        with open_export(path, **options.open_kwargs) as reader:
            meta = reader.file_meta if reader.units_fixed else options.user_meta.over(reader.file_meta)
            info.update(format=reader.name, n_maps=len(reader), shape=tuple(int(n) for n in reader.map_shape),
                        variable=reader.variable, meta=reader.file_meta.as_dict(),
                        missing=options.user_meta.over(meta).missing(), sideband=_first_sideband(reader))
            if reader.integer_samples and reader.sample_scale is None and options.scale is None:
                info["notes"].append(f"integer samples ({reader.dtype}) without a calibration in the file: "
                                     "give --scale (and --offset)")
            info["notes"] += [f"the file's {key!r} variable is {what}"
                              for key, what in reader.meta_problems.items()]
            if not options.hologram and isinstance(reader, ArrayReader) and reader.dtype.kind != "c":
                first = next(reader.raw_maps(), None)
                if first is not None and looks_like_hologram(first):
                    info["notes"].append("the image looks like a raw off-axis hologram (a carrier peak in "
                                         "its spectrum): give --hologram to reconstruct its phase")
    except (ExportError, MetadataError) as exc:
        info["error"] = exc.reason
    return info


def _first_sideband(reader) -> int | None:
    """Sideband chosen for the first image of a hologram reader (reconstructs it), else None."""
    if not hasattr(reader, "sidebands") or not getattr(reader, "is_hologram", True) or len(reader) == 0:
        return None
    next(iter(reader))
    return reader.sidebands.get(0)


def format_description(info: dict) -> str:
    """Multi-line text of :func:`describe_export`'s result, for the command line.

    Parameters
    ----------
    info : dict
        What :func:`describe_export` returned.

    Returns
    -------
    str
    """
    lines = [info["path"]]
    known = f" (qpformat: {info['qpformat']})" if info["qpformat"] else ""
    if info["error"] is not None:
        lines.append(f"  cannot be read{known}: {info['error']}")
        return "\n".join(lines)
    rows, cols = info["shape"]
    n = info["n_maps"]
    lines.append(f"  format: {info['format']}{known}")
    lines.append(f"  images: {n} map{'s' if n != 1 else ''} of {rows} x {cols} px"
                 + (f" (variable {info['variable']!r})" if info["variable"] else ""))
    found = [f"{key}={value:g}{_UNITS[key]}" if key in _UNITS else f"{key}={value}"
             for key, value in info["meta"].items() if value is not None]
    lines.append("  metadata in the file: " + (", ".join(found) or "none"))
    lines.append("  missing: " + (", ".join(f"{key} (give --{key.replace('_', '-')})"
                                           for key in info["missing"]) or "nothing"))
    if info["sideband"] is not None:
        lines.append(f"  hologram sideband: {info['sideband']:+d}")
    lines.extend(f"  note: {note}" for note in info["notes"])
    return "\n".join(lines)
