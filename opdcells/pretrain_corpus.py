"""Simulated corpora for pretraining and probing: OPD maps of the five classes made in memory from
sessions no evaluation dataset can contain, cached as ``.npz``. No TensorFlow.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .pretrain_options import SIM_MAPS_PER_SESSION

log = logging.getLogger(__name__)

__all__ = ["SIM_FIRST_SESSION", "PROBE_FIRST_SESSION", "SimCorpus", "simulate_corpus", "check_disjoint",
           "simulated_probe_set", "dataset_record"]

#: Simulated pretraining sessions are numbered from here (``simulate_dataset`` numbers from 1), so
#: no (seed, class, session) random stream of an evaluation dataset is ever reused.
SIM_FIRST_SESSION = 1001
#: Probe sessions (held out from pretraining AND evaluation) are numbered from here.
PROBE_FIRST_SESSION = 5001


@dataclass
class SimCorpus:
    """Simulated, preprocessed OPD maps in memory and the record of how they were made.

    Attributes
    ----------
    maps : numpy.ndarray, shape (N, S, S), float32, nm
        The OPD maps.
    labels : numpy.ndarray, shape (N,), int
        Index into ``class_names``.
    class_names : tuple of str
        The simulated classes.
    sessions : numpy.ndarray, shape (N,), str
        ``"<class>/session_<k>"`` of every map.
    record : dict
        How the corpus was made (generator, seed, sessions, counts; ``cache`` when read from one).
    """

    maps: np.ndarray          # (N, S, S) float32 nm
    labels: np.ndarray        # (N,) int, index into class_names
    class_names: tuple[str, ...]
    sessions: np.ndarray      # (N,) str "<class>/session_<k>"
    record: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def simulate_corpus(n_maps: int, seed: int = 0, *, first_session: int = SIM_FIRST_SESSION,
                    maps_per_session: int = SIM_MAPS_PER_SESSION, config=None, cache_dir=None,
                    workers: int = 1) -> SimCorpus:
    """Simulate ``n_maps`` preprocessed maps, balanced over the five classes, in memory.

    Session ``k`` of a class (k = first_session, first_session + 1, ...) holds ``maps_per_session``
    cells drawn with ``simulate.cell_rng(seed, class, k, i)``; ``simulate_dataset`` numbers its sessions
    from 1, so with ``first_session`` above any real session count the corpus shares no random stream
    (and no session) with an evaluation dataset, whatever its seed. Maps the preprocessing rejects are
    skipped (counted in the record).

    Parameters
    ----------
    n_maps : int
        Maps requested.
    seed : int
        Seed of every cell's random stream.
    first_session : int
        Number of the first session (:data:`SIM_FIRST_SESSION`; probes use :data:`PROBE_FIRST_SESSION`).
    maps_per_session : int
        Cells per simulated session.
    config : PreprocessConfig, optional
        Preprocessing (default ``PreprocessConfig()``: 0.25 um/px, 128 px).
    cache_dir : str or os.PathLike, optional
        Reuse / save the corpus as an ``.npz`` there.
    workers : int
        Processes that simulate sessions; the corpus is the same.

    Returns
    -------
    SimCorpus
        The maps and their record.

    Raises
    ------
    ValueError
        The sessions would reach the probe sessions, or a cached corpus was made with other settings.
    """
    from .preprocess import PreprocessConfig
    from .simulate import CLASS_NAMES, cell_rng, sample_session

    config = config or PreprocessConfig()
    per_class = math.ceil(n_maps / len(CLASS_NAMES))
    n_sessions = math.ceil(per_class / maps_per_session)
    record = {"generator": "opdcells.simulate.simulate_cell + preprocess.preprocess_map",
              "seed": int(seed), "rng": "simulate.cell_rng(seed, class, session, index)",
              "classes": list(CLASS_NAMES), "sessions_per_class": n_sessions,
              "session_numbers": [first_session, first_session + n_sessions - 1],
              "maps_per_session": maps_per_session, "n_requested": int(n_maps),
              "pixel_size_um": config.out_pixel_size_um, "out_size": config.out_size,
              "opdcells_version": __version__}
    if first_session < PROBE_FIRST_SESSION < first_session + n_sessions:
        raise ValueError(f"{n_sessions} sessions from {first_session} reach the probe sessions "
                         f"({PROBE_FIRST_SESSION}...): simulate fewer maps or more maps per session")
    cache = _corpus_cache(cache_dir, record)
    if cache is not None and cache.is_file():
        log.info("simulated corpus from cache %s", cache)
        return _load_corpus(cache, record)
    jobs = [(label, class_name, first_session + j, min(maps_per_session, per_class - j * maps_per_session))
            for label, class_name in enumerate(CLASS_NAMES) for j in range(n_sessions)]
    maps, labels, sessions, rejected = [], [], [], 0
    start = time.perf_counter()
    for (label, class_name, k, _), (made, n_rejected) in zip(
            jobs, _map_sessions(jobs, seed, config, workers), strict=True):
        session_id = sample_session(cell_rng(seed, class_name, k), class_name, k).session_id
        maps += made
        labels += [label] * len(made)
        sessions += [f"{class_name}/{session_id}"] * len(made)
        rejected += n_rejected
    record.update(n_maps=len(labels), n_rejected=rejected,
                  class_counts={c: int(np.sum(np.asarray(labels) == i)) for i, c in enumerate(CLASS_NAMES)},
                  time_s=round(time.perf_counter() - start, 1))
    log.info("simulated %d maps in %.0f s (%d rejected)", len(labels), record["time_s"], rejected)
    corpus = SimCorpus(np.stack(maps).astype(np.float32), np.asarray(labels, np.int64), tuple(CLASS_NAMES),
                       np.asarray(sessions), record)
    if cache is not None:
        _save_corpus(cache, corpus)
    return corpus


def _map_sessions(jobs, seed: int, config, workers: int):
    """``simulate.simulate_preprocessed`` of each (label, class, session, n) job, in order, with a
    progress bar; in ``workers`` spawned processes when > 1 (TensorFlow is not forked)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    from .simulate import simulate_preprocessed

    args = [(seed, class_name, k, n, config) for _, class_name, k, n in jobs]
    total = sum(job[3] for job in jobs)
    with tqdm(total=total, desc="simulating corpus", unit="map", disable=total < 200) as bar:
        if workers <= 1:
            for a in args:
                result = simulate_preprocessed(*a)
                bar.update(a[3])
                yield result
            return
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            columns = [list(column) for column in zip(*args, strict=True)]
            for a, result in zip(args, pool.map(simulate_preprocessed, *columns), strict=True):
                bar.update(a[3])
                yield result


def _corpus_cache(cache_dir, record: dict) -> Path | None:
    if cache_dir is None:
        return None
    lo, hi = record["session_numbers"]
    name = (f"simcorpus_n{record['n_requested']}_seed{record['seed']}_sessions{lo}-{hi}x"
            f"{record['maps_per_session']}_{record['out_size']}px_{record['pixel_size_um']}um"
            f"_v{__version__}.npz")
    return Path(cache_dir) / name


def _save_corpus(path: Path, corpus: SimCorpus) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, maps=corpus.maps, labels=corpus.labels, class_names=np.asarray(corpus.class_names),
             sessions=corpus.sessions, record=json.dumps(corpus.record))
    tmp.replace(path)
    log.info("cached the simulated corpus in %s", path)


def _load_corpus(path: Path, expected: dict) -> SimCorpus:
    with np.load(path) as data:
        record = json.loads(str(data["record"]))
        if any(record.get(k) != v for k, v in expected.items()):
            raise ValueError(f"{path}: cached corpus was made with other settings")
        return SimCorpus(data["maps"], data["labels"], tuple(data["class_names"].tolist()), data["sessions"],
                         {**record, "cache": str(path)})


def check_disjoint(corpus: SimCorpus, datasets) -> list[dict]:
    """Check that no evaluation dataset holds one of the corpus' sessions.

    Parameters
    ----------
    corpus : SimCorpus
        The pretraining corpus.
    datasets : list of OPDDataset
        Open evaluation datasets.

    Returns
    -------
    list of dict
        :func:`dataset_record` of every dataset.

    Raises
    ------
    ValueError
        A dataset holds a group named like one of the corpus' sessions.
    """
    ours = {s.rsplit("/", 1)[-1] for s in corpus.sessions}
    out = []
    for ds in datasets:
        groups = {str(g).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] for g in np.unique(ds.groups)}
        shared = sorted(ours & groups)
        if shared:
            raise ValueError(f"{ds.path}: holds simulated sessions {shared[:5]} of the pretraining corpus")
        out.append(dataset_record(ds))
    return out


def dataset_record(ds, used=None, excluded=None) -> dict:
    """What a pretraining record says about a dataset it used or checked.

    Parameters
    ----------
    ds : OPDDataset
        The open dataset.
    used : array of int, optional
        Indices of the maps used (default all).
    excluded : array of int, optional
        Indices of test maps left out.

    Returns
    -------
    dict
        Path, fingerprint, number of maps, of maps used and of test maps left out.
    """
    return {"path": str(Path(ds.path).resolve()), "fingerprint": ds.fingerprint, "n_maps": len(ds),
            "n_used": len(ds) if used is None else int(len(used)),
            "excluded_test_maps": 0 if excluded is None else int(len(excluded))}


def simulated_probe_set(n_maps: int, seed: int = 0, *, n_sessions: int = 4, cache_dir=None) -> SimCorpus:
    """Simulated maps for probes, from sessions unseen by pretraining corpora and evaluation datasets.

    Parameters
    ----------
    n_maps : int
        Maps requested.
    seed : int
        Seed of the simulation.
    n_sessions : int
        Sessions per class, numbered from :data:`PROBE_FIRST_SESSION`.
    cache_dir : str or os.PathLike, optional
        Reuse / save the maps as an ``.npz`` there.

    Returns
    -------
    SimCorpus
        The probe maps.
    """
    from .simulate import CLASS_NAMES

    per_session = max(1, math.ceil(n_maps / len(CLASS_NAMES) / n_sessions))
    return simulate_corpus(n_maps, seed, first_session=PROBE_FIRST_SESSION, maps_per_session=per_session,
                           cache_dir=cache_dir)
