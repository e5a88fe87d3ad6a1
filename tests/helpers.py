"""Tiny labelled datasets and exports for the learning-side tests (simulated cells, seconds to make).

Cells come from ``opdcells.simulate.simulate_cell`` on a small, coarse camera (64 x 64 px at 0.5 um)
and go through ``opdcells.preprocess.preprocess_map`` into an ``opdcells.dataset.DatasetWriter``:
one group (session) per file, several sessions per class, so group splits work.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from opdcells.dataset import DatasetWriter
from opdcells.metadata import Meta
from opdcells.preprocess import PreprocessConfig, preprocess_map
from opdcells.simulate import CLASS_NAMES, cell_rng, sample_session, simulate_cell, write_mat5

CAMERA_PIXEL_UM = 0.5
CAMERA_SHAPE = (64, 64)
OUT_PIXEL_UM = 1.0
OUT_SIZE = 32


def tiny_session(class_name: str, k: int, seed: int = 0):
    """Session ``k`` of ``class_name`` with a small, coarse camera (fast to simulate)."""
    session = sample_session(cell_rng(seed, class_name, k), class_name, k)
    return dataclasses.replace(session, pixel_size_um=CAMERA_PIXEL_UM, shape=CAMERA_SHAPE)


def simulated_opd(class_name: str, k: int, i: int, seed: int = 0) -> tuple[np.ndarray, object]:
    """Raw OPD map (nm, camera pixels) of cell ``i`` of session ``k``, and its session."""
    session = tiny_session(class_name, k, seed)
    opd, _ = simulate_cell(class_name, cell_rng(seed, class_name, k, i), session)
    return opd, session


def _session_maps(class_name: str, k: int, n: int, seed: int, config: PreprocessConfig, scale: float):
    """(index, ProcessedMap, Meta) of ``n`` simulated cells of one session, OPD times ``scale``."""
    for i in range(n):
        opd, session = simulated_opd(class_name, k, i, seed)
        meta = Meta(units="nm", pixel_size_um=session.pixel_size_um, wavelength_nm=session.wavelength_nm,
                    medium_index=session.medium_index)
        processed = preprocess_map(opd, meta, config, path=f"{class_name}/session_{k}[{i}]")
        processed.opd = (processed.opd * scale).astype(np.float32)
        yield i, processed, meta


def write_tiny_dataset(path, *, classes: Sequence[str] = CLASS_NAMES, sessions_per_class: int = 3,
                       maps_per_session: int = 4, out_size: int = OUT_SIZE,
                       pixel_size_um: float = OUT_PIXEL_UM, seed: int = 0,
                       group_scale: Mapping[str, float] | None = None,
                       rename: Mapping[str, str] | None = None) -> Path:
    """Write a dataset of ``classes`` x ``sessions_per_class`` groups x ``maps_per_session`` maps.

    Groups are named ``<class>/session_<k>``; ``group_scale`` multiplies the OPD of whole groups
    (e.g. to make test groups recognisable); ``rename`` labels a simulated class with another name (a
    lab's own class names). Returns ``path``.
    """
    path = Path(path)
    config = PreprocessConfig(out_pixel_size_um=pixel_size_um, out_size=out_size)
    group_scale = dict(group_scale or {})
    with DatasetWriter(path, config) as writer:
        for class_name in classes:
            label = (rename or {}).get(class_name, class_name)
            for k in range(1, sessions_per_class + 1):
                group = f"{label}/session_{k}"
                scale = group_scale.get(group, 1.0)
                sha = hashlib.sha256(f"{seed}:{group}:{scale}".encode()).hexdigest()  # stands for the content
                maps = _session_maps(class_name, k, maps_per_session, seed, config, scale)
                writer.add_file(f"{sha}:tiny", path=f"{group}/stack.mat", sha256=sha, label=label,
                                group=group, maps=maps)
    return path


def write_exports(folder, *, classes: Sequence[str] = ("SW480", "granulocytes"), per_class: int = 2,
                  seed: int = 1) -> list[Path]:
    """MATLAB v5 exports (``phase`` in rad plus metadata, scipy.io.savemat) of simulated cells."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for class_name in classes:
        for i in range(per_class):
            opd, session = simulated_opd(class_name, 1, i, seed)
            path = folder / f"{class_name}_{i}.mat"
            write_mat5(path, opd * 2.0 * math.pi / session.wavelength_nm, session)
            paths.append(path)
    return paths


def disc_field(shape, centres_um, *, px: float = 0.5, radius_um: float = 4.0, peak_nm: float = 300.0,
               seed: int = 0) -> np.ndarray:
    """OPD (nm, float32) of spherical cells of ``radius_um`` at ``centres_um`` [(row, col) um] on a noisy
    offset background: a field of view, a single-cell map, or a cell cut by the edge (a centre near it)."""
    rng = np.random.default_rng(seed)
    field = 20.0 + rng.normal(0, 2, shape)
    y, x = np.mgrid[:shape[0], :shape[1]] * px
    for cy, cx in centres_um:
        field += peak_nm * np.sqrt(np.clip(1 - ((x - cx) ** 2 + (y - cy) ** 2) / radius_um ** 2, 0, None))
    return field.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# shared across test modules: made once per test session (pytest's tmp_path_factory is session-wide)

_MADE: dict = {}

#: Settings that make a deep model train in seconds: up to three epochs of two batches.
TINY_TRAINING = {"epochs": 3, "patience": 1, "input_size": 32, "batch_size": 16, "n_boot": 20, "verbose": 0}


def once(key, make):
    """``make()`` the first time ``key`` is asked for in this test session, the same object after."""
    if key not in _MADE:
        _MADE[key] = make()
    return _MADE[key]


def tiny_dataset(tmp_path_factory) -> Path:
    """The tiny five-class dataset (3 sessions x 4 maps per class)."""
    return once("dataset", lambda: write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny.h5"))


def scaled_test_dataset(tmp_path_factory, task: str = "five_class", factor: float = 3.0) -> Path:
    """The tiny dataset with the OPD of its test groups (group split, seed 0) multiplied by ``factor``:
    a normalisation estimated on the test maps would show."""
    from opdcells.dataset import open_dataset
    from opdcells.tasks import get_task
    from opdcells.train import make_split

    def make():
        with open_dataset(tiny_dataset(tmp_path_factory)) as ds:
            test_groups = make_split(ds, get_task(task), seed=0).groups["test"]
        path = tmp_path_factory.mktemp("data") / "scaled.h5"
        return write_tiny_dataset(path, group_scale=dict.fromkeys(test_groups, factor))

    return once(("scaled", task, factor), make)


def tiny_run(tmp_path_factory, model: str = "mobilenetv2", task: str = "five_class", **kwargs):
    """TrainResult of a tiny model trained on :func:`scaled_test_dataset` (made once per session)."""
    from opdcells.train import train

    def make():
        settings = {**(TINY_TRAINING if model != "features" else {"n_boot": 20}), **kwargs}
        out = tmp_path_factory.mktemp("runs") / f"{model}_{task}"
        return train(scaled_test_dataset(tmp_path_factory, task), model, task, out, **settings)

    return once(("run", model, task, tuple(sorted(kwargs.items()))), make)

REPO_ROOT = Path(__file__).resolve().parents[1]


def register_test_encoder(monkeypatch, folder, backbone: str, name: str = "test_encoder",
                          default: bool = True):
    """Register the encoder folder ``folder`` (``models.save_encoder``'s) as registry entry ``name`` for
    the test (``weights="opd"`` of ``backbone`` when ``default``); returns the entry."""
    from opdcells import registry

    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    monkeypatch.setattr(registry, "DEFAULTS", dict(registry.DEFAULTS))
    entry = registry.RegisteredEncoder(
        name=name, backbone=backbone, folder=str(Path(folder).resolve()),
        sha256=registry.file_sha256(Path(folder) / registry.ENCODER_WEIGHTS), input_size=32,
        pixel_size_um=1.0, out_size=32, trained_on="a test", command="save_encoder", commit="none")
    return registry.register_encoder(entry, default=default)
