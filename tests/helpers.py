"""Tiny labelled datasets and exports for the learning-side tests (simulated cells, seconds to make).

Cells come from ``opdcells.simulate.simulate_cell`` on a small, coarse camera (64 x 64 px at 0.5 um)
and go through ``opdcells.preprocess.preprocess_map`` into an ``opdcells.dataset.DatasetWriter``:
one group (session) per file, several sessions per class, so group splits work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import shutil
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


@contextlib.contextmanager
def eager_functions(eager: bool = True):
    """Run every ``tf.function`` (Keras' train, test and predict steps) eagerly inside the block (or, with
    ``eager=False``, traced as in normal use, whatever the caller's setting).

    For small trainings of a few steps that a test needs as a means: tracing MobileNetV2's training graph
    costs far more than the steps (measured on 2 shared cores: a 3-epoch tiny run took 38 s of CPU traced,
    14 s eager). tf.data functions (the augmentations) are traced either way. Traced training stays covered
    where users meet it: the executed notebooks (VGG16, OPD-pretrained MobileNetV2, DINOv2), the
    two-worker ``train`` subprocesses and ``pretrain``; traced prediction by every test that loads a model.
    """
    import warnings

    import tensorflow as tf

    before = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(eager)
    try:
        with warnings.catch_warnings():   # TensorFlow's note that tf.data functions stay traced
            warnings.filterwarnings("ignore", message="Even though the `tf.config.experimental_run_functions")
            yield
    finally:
        tf.config.run_functions_eagerly(before)


# --------------------------------------------------------------------------------------------------
# shared across test modules and pytest-xdist workers: made once per test session

_MADE: dict = {}

#: Settings that make a deep model train in seconds: up to three epochs of two batches.
#: a tiny deep training; without late fusion (a features fit per run), which tests/test_fusion.py tests
TINY_TRAINING = {"epochs": 3, "patience": 1, "input_size": 32, "batch_size": 16, "n_boot": 20, "verbose": 0,
                 "fusion": "none"}


def once(key, make):
    """``make()`` the first time ``key`` is asked for in this process, the same object after."""
    if key not in _MADE:
        _MADE[key] = make()
    return _MADE[key]


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an exclusive lock on the file ``path`` (filelock where installed, else fcntl.flock)."""
    try:
        from filelock import FileLock
    except ImportError:
        import fcntl

        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    else:
        with FileLock(path):
            yield


def shared_folder(tmp_path_factory, name: str, make) -> Path:
    """Folder ``name`` that ``make(folder)`` fills once per test session, for every pytest-xdist worker.

    The pytest-xdist pattern for session data: the workers' base temp folders share a parent; the first
    worker to ask makes the folder there under a file lock, the others wait on the lock and find it done
    (a ``.done`` mark; a maker that failed half-way leaves none, and the next asker starts over). Without
    xdist the folder is made in the session's own base temp folder.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / "shared" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    done = folder.with_name(f"{name}.done")
    with _exclusive(folder.with_name(f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def tiny_dataset(tmp_path_factory) -> Path:
    """The tiny five-class dataset (3 sessions x 4 maps per class), read-only: copy it to change it."""
    def make():
        return shared_folder(tmp_path_factory, "tiny_dataset",
                             lambda folder: write_tiny_dataset(folder / "tiny.h5")) / "tiny.h5"

    return once("dataset", make)


def scaled_test_dataset(tmp_path_factory, task: str = "five_class", factor: float = 3.0) -> Path:
    """The tiny dataset with the OPD of its test groups (group split, seed 0) multiplied by ``factor``:
    a normalisation estimated on the test maps would show."""
    from opdcells.dataset import open_dataset
    from opdcells.tasks import get_task
    from opdcells.train import make_split

    def write(folder):
        with open_dataset(tiny_dataset(tmp_path_factory)) as ds:
            test_groups = make_split(ds, get_task(task), seed=0).groups["test"]
        write_tiny_dataset(folder / "scaled.h5", group_scale=dict.fromkeys(test_groups, factor))

    return once(("scaled", task, factor),
                lambda: shared_folder(tmp_path_factory, f"scaled_{task}_{factor}", write) / "scaled.h5")


def round_trip_maps(ds) -> np.ndarray:
    """Every third map of the opened dataset ``ds``: the maps a model's save/load round trip is checked on."""
    return ds.read(np.arange(0, len(ds), 3))


#: beside a tiny run's folder: its in-memory model's probabilities on :func:`round_trip_maps`, saved by the
#: worker that trained it (the others load the folder)
TRAINED_PROBA = "trained_proba.npy"


def tiny_run(tmp_path_factory, model: str = "mobilenetv2", task: str = "five_class", **kwargs):
    """TrainResult of a tiny model trained on :func:`scaled_test_dataset`, trained once per test session.

    The worker that trains it gets the in-memory result; another pytest-xdist worker gets one read back
    from the model folder (:func:`load_model`, config.json, history.csv, metrics.json; no ``evaluation``).
    :func:`trained_proba` gives the trained model's own probabilities either way, traced as a loaded
    model's are (the training steps of a deep model run eagerly: :func:`eager_functions`).
    """
    from opdcells.dataset import open_dataset
    from opdcells.train import train

    name = f"{model}_{task}"
    made = []
    deep = model != "features"

    def steps(eager: bool):   # the features baseline runs no TensorFlow
        return eager_functions(eager) if deep else contextlib.nullcontext()

    def make(folder):
        settings = {**(TINY_TRAINING if deep else {"n_boot": 20}), **kwargs}
        data = scaled_test_dataset(tmp_path_factory, task)
        with steps(eager=True):
            result = train(data, model, task, folder / name, **settings)
        with open_dataset(result.config["dataset"]["path"]) as ds, steps(eager=False):
            np.save(folder / TRAINED_PROBA, result.model.predict_proba(round_trip_maps(ds)))
        made.append(result)

    def get():
        key = "_".join([name, *(f"{k}-{v}" for k, v in sorted(kwargs.items()))])
        folder = shared_folder(tmp_path_factory, f"run_{key}", make)
        return made[0] if made else _read_back(folder / name)

    return once(("run", model, task, tuple(sorted(kwargs.items()))), get)


def _read_back(folder: Path):
    """The TrainResult of a model folder another worker trained (without its ``evaluation``)."""
    import json

    import pandas as pd

    from opdcells.modelfolder import load_model
    from opdcells.train import TrainResult

    history = pd.read_csv(folder / "history.csv").drop(columns="epoch")
    return TrainResult(folder, {k: history[k].dropna().tolist() for k in history.columns},
                       json.loads((folder / "metrics.json").read_text()),
                       json.loads((folder / "config.json").read_text()), load_model(folder))


def trained_proba(result) -> np.ndarray:
    """The probabilities the trained (in-memory) model of a :func:`tiny_run` gave on its dataset's
    :func:`round_trip_maps`, before any save and load."""
    return np.load(result.model_dir.parent / TRAINED_PROBA)


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
