"""Simulated screening samples: many blood cells with a few spiked cancer cells, as one new acquisition.

A spike-in experiment is how a rare-cell assay is validated: a known number of tumour cells is added to
a blood sample and the assay must find them. :func:`simulate_sample` writes such a sample the way a
microscope run would: one session (optics, noise and biological batch drawn once, different from every
training session), maps in MATLAB v7.3 stacks of ``maps_per_file`` each, with ``truth.csv`` saying which
map is which cell. Per-cell random streams make a sample identical whatever ``workers`` is.

A negative control (:func:`simulate_sample` with ``session_seed``, ``simulate --sample N --control-of
SAMPLE``): blood cells only, imaged in the SAME session as a sample (its optics, noise and biological batch)
but drawn from the control's own seed, so it shares no cell with the sample -- what a lab images beside a
sample to set the screen's threshold on (:func:`opdcells.calibration.control_point`).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import DatasetError
from .simulate import CLASS_NAMES, TRUTH_COLUMNS, Mat73Stack, Session, sample_session, simulate_cell

log = logging.getLogger(__name__)

#: White-cell classes of a blood sample after red-cell lysis, as fractions of the leukocytes: the normal
#: differential (neutrophils 40-70% and eosinophils 1-4% -> granulocytes; lymphocytes 20-40%; monocytes
#: 2-8%; e.g. Dacie and Lewis Practical Haematology, 12th ed., table 2.1); the simulator's PBMC class
#: (lymphocytes with some monocytes) stands for the lymphocytes.
BLOOD_MIX = {"granulocytes": 0.62, "monocytes": 0.06, "PBMCs": 0.32}
#: Spawn-key prefix of sample streams: never equal to a training session's (class index 0-4, session k).
_SAMPLE_KEY = 1000
SAMPLE_COLUMNS = (*TRUTH_COLUMNS, "spiked")
#: gzip level of the sample's stacks (with the byte-shuffle filter): level 1 compresses these noisy float32
#: maps as well as 3 (74% of their size) in less CPU time (:class:`opdcells.simulate.Mat73Stack`).
STACK_GZIP_LEVEL = 1
#: The sample's own description (seeds, counts), read back by :func:`session_seed_of`.
SAMPLE_FILE = "sample.json"
README = """Simulated screening sample (opdcells.spikein, seed {seed}) -- NOT real measurements.

{n_blood} blood cells ({mix}) with spiked cells {spikes}, imaged in ONE session
(session seed {session_seed}: {microscope}, {wavelength_nm} nm, {pixel_size_um} um/px) that is not one of
the training sessions.
Maps: stack_NNNN.mat, MATLAB v7.3, variable phase (H x W x N, radians), {maps_per_file} maps per file, in
random order. truth.csv: one row per map (path, index, class, ... as a simulated dataset's truth.csv) plus
'spiked' (1 for the spiked cells).
"""


def parse_spikes(text: str) -> dict[str, int]:
    """``"SW480:10,SW620:10"`` -> ``{"SW480": 10, "SW620": 10}``.

    Parameters
    ----------
    text : str
        Comma-separated ``CLASS:COUNT`` items (the ``--spike`` option).

    Returns
    -------
    dict of str to int
        Class -> number of cells spiked in.

    Raises
    ------
    ValueError
        Unknown class name, or a count that is not a non-negative integer.
    """
    spikes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, count = item.partition(":")
        if not sep or not count.strip().isdigit():
            raise ValueError(f"spike {item!r} is not CLASS:COUNT (e.g. SW480:10)")
        if name.strip() not in CLASS_NAMES:
            raise ValueError(f"spike class {name.strip()!r} is not one of {', '.join(CLASS_NAMES)}")
        spikes[name.strip()] = spikes.get(name.strip(), 0) + int(count)
    return spikes


def sample_rng(seed: int, *key: int) -> np.random.Generator:
    """Independent random stream of the sample (``key=()``) or of one of its cells.

    Parameters
    ----------
    seed : int
        The sample's seed.
    *key : int
        The cell's position in the spawn tree (none: the sample's own stream).

    Returns
    -------
    numpy.random.Generator
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SAMPLE_KEY, *key)))


def session_seed_of(sample_dir: str | os.PathLike) -> int:
    """The session seed of a simulated sample (to simulate a control of the same session).

    Parameters
    ----------
    sample_dir : path
        A folder :func:`simulate_sample` wrote (its ``sample.json``; samples written before it existed: the
        seed in the first line of its ``README.txt``).

    Returns
    -------
    int

    Raises
    ------
    DatasetError
        The folder holds no simulated sample.
    """
    folder = Path(sample_dir)
    try:
        return int(json.loads((folder / SAMPLE_FILE).read_text(encoding="utf-8"))["session_seed"])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(folder / SAMPLE_FILE, f"unreadable sample description ({err})") from err
    try:
        first = (folder / "README.txt").read_text(encoding="utf-8").splitlines()[0]
    except (OSError, IndexError) as err:
        raise DatasetError(folder, "not a simulated sample (no sample.json or README.txt)") from err
    found = re.search(r"\(opdcells\.spikein, seed (-?\d+)\)", first)
    if not found:
        raise DatasetError(folder, "not a simulated sample (its README.txt names no seed)")
    return int(found.group(1))


def sample_session_of(seed: int) -> Session:
    """The sample's one acquisition session (drawn like a training session, from its own stream).

    Parameters
    ----------
    seed : int
        The sample's seed.

    Returns
    -------
    Session
        ``class_name="sample"``, ``session_id="sample_<seed>"``.
    """
    session = sample_session(sample_rng(seed), "granulocytes", 1)
    return dataclasses.replace(session, class_name="sample", session_id=f"sample_{seed}")


def cell_classes(n_blood: int, spikes: dict[str, int], seed: int,
                 blood_mix: dict[str, float] | None = None) -> list[str]:
    """Class of every map of the sample, in acquisition order (spiked cells at random positions).

    Parameters
    ----------
    n_blood : int
        Blood cells in the sample.
    spikes : dict of str to int
        Class -> cells spiked in (:func:`parse_spikes`).
    seed : int
        The sample's seed.
    blood_mix : dict of str to float, optional
        Blood class -> relative frequency (default ``BLOOD_MIX``).

    Returns
    -------
    list of str
        ``n_blood + sum(spikes.values())`` class names.
    """
    mix = blood_mix or BLOOD_MIX
    rng = sample_rng(seed, 0)
    names = list(mix)
    weights = np.asarray([mix[n] for n in names], dtype=float)
    blood = rng.choice(len(names), size=n_blood, p=weights / weights.sum())
    classes = [names[i] for i in blood] + [c for c, k in spikes.items() for _ in range(k)]
    return [classes[i] for i in rng.permutation(len(classes))]


def _write_stack(out_dir: Path, number: int, classes: list[str], first: int, seed: int,
                 session: Session, spiked: set[int]) -> list[dict]:
    """Simulate and write one stack file; return its truth rows."""
    path = out_dir / f"stack_{number:04d}.mat"
    to_rad = 2.0 * math.pi / session.wavelength_nm
    rows = []
    with Mat73Stack(path, len(classes), session, gzip_level=STACK_GZIP_LEVEL, shuffle=True) as stack:
        for i, class_name in enumerate(classes):
            opd_nm, truth = simulate_cell(class_name, sample_rng(seed, 1, first + i), session)
            stack.write(i, opd_nm * to_rad)
            rows.append({"path": path.name, "index": i, **truth, "spiked": int(first + i in spiked)})
    return rows


def simulate_sample(out_dir: str | os.PathLike, n_blood: int, spikes: dict[str, int], seed: int = 0, *,
                    session_seed: int | None = None, maps_per_file: int = 1000,
                    blood_mix: dict[str, float] | None = None, workers: int = 1,
                    progress: bool = True) -> Path:
    """Write a blood sample of ``n_blood`` cells with ``spikes`` cancer cells to ``out_dir``.

    Parameters
    ----------
    out_dir : path
        New or empty folder (a previous sample there, recognised by its truth.csv, is replaced).
    n_blood : int
        Blood cells, drawn from ``blood_mix`` (default :data:`BLOOD_MIX`).
    spikes : dict
        Class name -> number of spiked cells (e.g. ``{"SW480": 10, "SW620": 10}``).
    seed : int
        The sample's cells are a deterministic function of the seed (and independent of ``workers``).
    session_seed : int, optional
        Seed of the acquisition session (optics, noise, batch; default ``seed``). A negative control of a
        sample: the sample's session seed (:func:`session_seed_of`) with another ``seed``, so the two share
        the session but no cell.
    maps_per_file : int
        Maps per MATLAB v7.3 stack file.
    workers : int
        Processes simulating files in parallel.

    Returns
    -------
    Path
        ``out_dir/truth.csv``.

    Raises
    ------
    DatasetError
        ``out_dir`` is not empty and holds no earlier sample.
    ValueError
        Negative counts or ``maps_per_file < 1``.
    """
    if n_blood < 0 or maps_per_file < 1 or any(k < 0 for k in spikes.values()):
        raise ValueError("cell counts must be >= 0 and maps_per_file >= 1")
    session_seed = seed if session_seed is None else session_seed
    out_dir = Path(out_dir)
    _prepare(out_dir)
    session = sample_session_of(session_seed)
    classes = cell_classes(n_blood, spikes, seed, blood_mix)
    spiked = {i for i, c in enumerate(classes) if c in spikes}
    starts = range(0, len(classes), maps_per_file)
    jobs = [(out_dir, n, classes[s:s + maps_per_file], s, seed, session, spiked)
            for n, s in enumerate(starts)]
    with open(out_dir / "truth.csv", "w", newline="") as fh, \
            tqdm(total=len(classes), desc="simulating sample", unit="map", disable=not progress) as bar:
        writer = csv.DictWriter(fh, fieldnames=SAMPLE_COLUMNS)
        writer.writeheader()
        for rows in _run(jobs, workers):
            writer.writerows(rows)
            bar.update(len(rows))
    mix = blood_mix or BLOOD_MIX
    description = {"seed": seed, "session_seed": session_seed, "n_blood": n_blood, "spikes": spikes,
                   "blood_mix": mix, "maps_per_file": maps_per_file, "session_id": session.session_id}
    (out_dir / SAMPLE_FILE).write_text(json.dumps(description, indent=2), encoding="utf-8")
    (out_dir / "README.txt").write_text(README.format(
        seed=seed, session_seed=session_seed, n_blood=n_blood,
        mix=", ".join(f"{k} {v:.0%}" for k, v in mix.items()),
        spikes=", ".join(f"{k} x{v}" for k, v in spikes.items()) or "(none)",
        microscope=session.microscope, wavelength_nm=session.wavelength_nm,
        pixel_size_um=session.pixel_size_um, maps_per_file=maps_per_file))
    log.info("simulated a sample of %d maps (%d spiked) in %s", len(classes), len(spiked), out_dir)
    return out_dir / "truth.csv"


def _run(jobs: list[tuple], workers: int):
    if workers <= 1:
        yield from (_write_stack(*job) for job in jobs)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(_write_stack, *zip(*jobs, strict=True))


def _prepare(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "truth.csv").is_file():
            raise DatasetError(out_dir, "folder is not empty and holds no earlier sample (truth.csv); "
                                        "choose an empty or new folder")
        for old in out_dir.glob("stack_*.mat"):
            old.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
