"""Pretrain OPD encoders where labels are scarce: self-supervised on unlabelled maps, or on simulated cells.

Labs hold far more unlabelled OPD maps than labelled ones, and pretraining on them is what let
TOP-GAN (Rubin et al. 2019, Med. Image Anal. 57:176) reach 90-99% on cancer cells from few labelled
maps. ImageNet / DINOv2 weights cannot be downloaded here, so the encoders start from OPD itself:

``simclr``  (Chen et al. 2020) two views of each map, projection MLP, NT-Xent loss: a view must pick
            its partner out of the batch.
``byol``    (Grill et al. 2020) online encoder + projector + predictor regresses the projection of the
            other view made by an EMA target network; no negatives.
``dino``    (Caron et al. 2021) self-distillation: a student matches the centred, sharpened output of
            its EMA teacher over K prototypes (cross-view); the method of DINO / DINOv2 for ViTs.
``supervised-sim``  cross-entropy over the five classes on a large corpus simulated in memory
            (``simulate.simulate_cell`` + ``preprocess.preprocess_map``) from sessions no evaluation
            dataset can contain (session numbers from :data:`SIM_FIRST_SESSION`; seeds recorded).

Views are physically valid OPD maps of the same cell (:class:`ViewConfig`): a zoom/crop that keeps the
whole cell support inside the field (:func:`zoom_crop`), then ``pipeline.augment_batch`` (dihedral
orientation, small shifts, noise, defocus, background tilt/offset, OPD scale). Self-supervised methods
use no labels at all; maps in the test split of a trained model (``exclude_test``) can be held out too.

The output folder is ``models.save_encoder``'s (``config.json`` + ``encoder.weights.h5``, loadable with
``build_encoder(..., weights=folder)``) plus the pretraining record in ``config.json``, ``history.csv``
and ``README.md``.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

# imported at start-up, not lazily at the end of a run: a long run must finish with the code it began with
from . import __version__, models, registry
from .config import AugmentConfig
from .files import json_default, staging, versions, write_history
from .pipeline import iter_batches, make_tf_dataset
from .pretrain_corpus import SimCorpus, check_disjoint, dataset_record, simulate_corpus, simulated_probe_set
from .pretrain_methods import ViewConfig, build_pretrainer
from .pretrain_options import (
    BACKBONES,
    DEFAULT_N_SIM,
    FLOAT16_BACKBONES,
    METHOD_DEFAULTS,
    METHODS,
    SIM_MAPS_PER_SESSION,
)
from .pretrain_probes import PROBE_TASKS, calibration_maps, probe_encoder, recalibrate_batchnorm
from .pretrain_store import (
    WEIGHTS_DTYPES,
    cast_weights_file,
    checkpoint_folder,
    read_checkpoint_state,
    restore_checkpoint,
    write_checkpoint,
)

log = logging.getLogger(__name__)

__all__ = ["dataset_stream", "corpus_stream", "PretrainResult", "pretrain", "resume_pretraining",
           "default_weights_dtype", "probe_labels"]


# ---------------------------------------------------------------------- losses and heads


# ---------------------------------------------------------------------- trainers


# ---------------------------------------------------------------------- simulated corpus


# ---------------------------------------------------------------------- data streams


def _test_indices_of(model_dirs, ds) -> np.ndarray:
    """Test-split indices in ``ds`` of the trained model folders that were trained on it."""
    from .errors import DatasetError
    from .evaluate import stored_test_indices
    from .modelfolder import load_model

    found = [np.empty(0, np.int64)]
    for folder in model_dirs:
        try:
            found.append(stored_test_indices(load_model(folder), ds))
            log.info("%s: leaving out the %d test maps of model %s", ds.path, len(found[-1]), folder)
        except DatasetError:
            log.info("%s: model %s was trained on another dataset; nothing left out", ds.path, folder)
    return np.unique(np.concatenate(found))


def dataset_stream(datasets, *, batch_size: int, seed: int = 0, exclude_test=()) -> tuple[tf.data.Dataset,
                                                                                           int, list[dict]]:
    """Unlabelled batches (B, S, S, 1) from opened datasets (shuffled, remainder dropped).

    Parameters
    ----------
    datasets : list of OPDDataset
        Open datasets; several are sampled in proportion to their sizes.
    batch_size : int
        Maps per batch (B).
    seed : int
        Seed of the shuffling.
    exclude_test : sequence of str or os.PathLike
        Trained model folders whose test-split maps are left out.

    Returns
    -------
    stream : tf.data.Dataset
        Batches of OPD maps in nm, shape (B, S, S, 1).
    n_maps : int
        Maps used.
    records : list of dict
        Per dataset: path, fingerprint, maps used and left out.
    """
    streams, sizes, records = [], [], []
    for i, ds in enumerate(datasets):
        excluded = _test_indices_of(exclude_test, ds)
        used = np.setdiff1d(np.arange(len(ds)), excluded)
        streams.append(make_tf_dataset(ds, used, None, batch_size=batch_size, training=True, augment=None,
                                       seed=seed + i))
        sizes.append(len(used))
        records.append(dataset_record(ds, used, excluded))
    stream = streams[0] if len(streams) == 1 else tf.data.Dataset.sample_from_datasets(
        streams, weights=[s / sum(sizes) for s in sizes], seed=seed, stop_on_empty_dataset=False)
    stream = stream.rebatch(batch_size, drop_remainder=True)
    n_maps = int(sum(sizes))
    return stream.apply(tf.data.experimental.assert_cardinality(n_maps // batch_size)), n_maps, records


def corpus_stream(corpus: SimCorpus, *, batch_size: int, seed: int = 0, labelled: bool,
                  skip_epochs: int = 0) -> tf.data.Dataset:
    """Shuffled batches of the in-memory corpus (remainder dropped); each pass over the stream is one
    epoch, in the order a numpy generator seeded with ``seed`` draws them.

    Parameters
    ----------
    corpus : SimCorpus
        The simulated maps.
    batch_size : int
        Maps per batch (B).
    seed : int
        Seed of the shuffling.
    labelled : bool
        Yield the class labels too (supervised-sim).
    skip_epochs : int
        Epochs whose orders are drawn and dropped first: the stream of a run resumed after that many
        epochs continues with the order the uninterrupted run had.

    Returns
    -------
    tf.data.Dataset
        Maps (B, S, S, 1) float32 nm, with int32 labels (B,) if ``labelled``.
    """
    rng = np.random.default_rng(seed)
    for _ in range(skip_epochs):   # iter_batches draws one permutation per epoch
        rng.permutation(len(corpus))
    size = corpus.maps.shape[1]

    def generate():
        for pos in iter_batches(len(corpus), batch_size, rng):
            if len(pos) == batch_size:
                pos = np.sort(pos)
                maps = corpus.maps[pos][..., None]
                yield (maps, corpus.labels[pos].astype(np.int32)) if labelled else maps

    map_spec = tf.TensorSpec((batch_size, size, size, 1), tf.float32)
    spec = (map_spec, tf.TensorSpec((batch_size,), tf.int32)) if labelled else map_spec
    stream = tf.data.Dataset.from_generator(generate, output_signature=spec)
    return stream.apply(tf.data.experimental.assert_cardinality(len(corpus) // batch_size)).prefetch(2)


# ---------------------------------------------------------------------- probing


# ---------------------------------------------------------------------- pretrain


@dataclass
class PretrainResult:
    """What :func:`pretrain` made: the encoder folder, the per-epoch history and the config written.

    Attributes
    ----------
    folder : pathlib.Path
        The encoder folder.
    history : dict of str to list of float
        Loss (and the method's metrics) per epoch.
    config : dict
        Its config.json.
    """

    folder: Path
    history: dict[str, list[float]]
    config: dict


def _git_commit() -> dict | None:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha, "dirty": bool(dirty)}


def _optimizer(learning_rate: float, weight_decay: float, total_steps: int) -> keras.optimizers.Optimizer:
    warmup = min(max(1, total_steps // 10), 500)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total_steps - warmup), warmup_target=learning_rate, warmup_steps=warmup)
    return keras.optimizers.AdamW(schedule, weight_decay=weight_decay, clipnorm=3.0)


class _TimeLimit(keras.callbacks.Callback):
    """Stop training after ``seconds`` (checked after every batch)."""

    def __init__(self, seconds: float | None):
        super().__init__()
        self.seconds, self.start, self.hit = seconds, time.perf_counter(), False

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self.seconds is not None and time.perf_counter() - self.start > self.seconds:
            self.model.stop_training = self.hit = True


class _StepCounter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1


def _open_all(data) -> list:
    from .dataset import open_dataset

    return [open_dataset(p) for p in _paths(data)]


def _paths(data) -> list[str]:
    return [str(p) for p in ([data] if isinstance(data, (str, Path)) else list(data or []))]


def pretrain(data=None, *, backbone: str = "mobilenetv2", method: str = "simclr",
             out="saved_models/opd_pretrained", epochs: int | None = None, input_size: int = 64,
             n_sim: int = DEFAULT_N_SIM, seed: int = 0, batch_size: int = 64,
             learning_rate: float | None = None, weight_decay: float | None = None,
             alpha: float | None = None, norm_scale_nm: float = models.DEFAULT_NORM_SCALE_NM,
             dinov2_config: dict | None = None,
             views: ViewConfig = ViewConfig(),  # noqa: B008 - a frozen dataclass
             exclude_test=(), n_probe: int = 0,
             max_minutes: float | None = None, chunk_epochs: int | None = None, sim_cache=None,
             sim_maps_per_session: int = SIM_MAPS_PER_SESSION,
             workers: int = 1, init=None, method_kw: dict | None = None, weights_dtype: str | None = None,
             checkpoint: bool = True, command: str | None = None, verbose=0) -> PretrainResult:
    """Pretrain a ``backbone`` encoder with ``method`` and write it to ``out`` (see the module docstring).

    With ``checkpoint``, the state of the run is written atomically to ``<out>.checkpoint`` at the end
    of every epoch (``pretrain_store``); :func:`resume_pretraining` continues it.

    Parameters
    ----------
    data : str, os.PathLike or list of them, optional
        opdcells dataset path(s). Self-supervised methods train on their maps (no labels; test maps
        of the model folders in ``exclude_test`` are left out); without data they train on ``n_sim``
        simulated maps, labels unused. ``supervised-sim`` always trains on ``n_sim`` simulated maps with
        their labels; datasets given are evaluation data its sessions are checked to be disjoint from.
    backbone : {"mobilenetv2", "resnet50", "vgg16", "dinov2"}
        Encoder architecture (:data:`~opdcells.pretrain_options.BACKBONES`).
    method : {"simclr", "byol", "dino", "supervised-sim"}
        Pretraining method (:data:`~opdcells.pretrain_options.METHODS`).
    out : str or os.PathLike
        The encoder folder, replaced atomically.
    epochs : int, optional
        Epochs of the whole run, which set its learning-rate schedule (default per method,
        :data:`~opdcells.pretrain_options.METHOD_DEFAULTS`).
    input_size : int
        Side (px) the encoder resizes the maps to.
    n_sim : int
        Simulated maps (supervised-sim, or self-supervised without ``data``).
    seed : int
        Seed of the simulation, the views and the weights.
    batch_size : int
        Maps per step.
    learning_rate, weight_decay : float, optional
        AdamW's peak learning rate and weight decay (default per method).
    alpha : float, optional
        MobileNetV2 width multiplier (default 0.35).
    norm_scale_nm : float
        Scale (nm) the encoder divides OPD by.
    dinov2_config : dict, optional
        DINOv2 backbone settings (patch size, layers, ...).
    views : ViewConfig
        How the two views of a map are drawn.
    exclude_test : sequence of str or os.PathLike
        Trained model folders whose test maps are left out of ``data``.
    n_probe : int
        If > 0, simulate that many maps from further unseen sessions and record linear / k-NN
        probe accuracy of the starting and of the pretrained encoder in the config.
    max_minutes : float, optional
        Stop this chunk after this much training time, minutes (recorded; the encoder folder is
        written; a resumed run restarts from the last complete epoch).
    chunk_epochs : int, optional
        Train at most this many epochs now (the schedule still spans ``epochs``; continue with
        :func:`resume_pretraining`).
    sim_cache : str or os.PathLike, optional
        Folder where simulated corpora are cached as ``.npz``.
    sim_maps_per_session : int
        Maps per simulated session (fewer -> more sessions, more acquisition variety).
    workers : int
        Processes that simulate the corpus.
    init : str or os.PathLike, optional
        An encoder folder (``models.save_encoder``'s, e.g. an earlier run) or ``opd`` / ``opd:NAME`` to
        start from instead of random weights, at this run's ``input_size`` (its width is kept).
    method_kw : dict, optional
        Keyword arguments of the method's :class:`~opdcells.pretrain_methods.Pretrainer`.
    weights_dtype : {"float32", "float16"}, optional
        Storage dtype of ``encoder.weights.h5`` (default float16 for
        :data:`~opdcells.pretrain_options.FLOAT16_BACKBONES`, else float32); loaded back as float32.
    checkpoint : bool
        Write ``<out>.checkpoint`` at the end of every epoch.
    command : str, optional
        The command line recorded in config.json (default: the equivalent Python call).
    verbose : int
        Passed to Keras (0 silent, 2 one line per epoch).

    Returns
    -------
    PretrainResult
        The folder, the history and the config written.

    Raises
    ------
    ValueError
        An unknown method, backbone or weights dtype, or datasets of different geometry.
    RegistryError
        ``init`` names a registry entry that is missing or corrupt.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    weights_dtype = weights_dtype or default_weights_dtype(backbone)
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights dtype {weights_dtype!r}: choose one of {', '.join(WEIGHTS_DTYPES)}")
    defaults = METHOD_DEFAULTS[method]
    epochs = int(epochs or defaults["epochs"])
    spec = {
        "data": _paths(data), "backbone": backbone, "method": method, "out": str(out), "epochs": epochs,
        "input_size": int(input_size), "n_sim": int(n_sim), "seed": int(seed), "batch_size": int(batch_size),
        "learning_rate": float(learning_rate or defaults["learning_rate"]),
        "weight_decay": float(defaults["weight_decay"] if weight_decay is None else weight_decay),
        "alpha": alpha, "norm_scale_nm": float(norm_scale_nm), "dinov2_config": dinov2_config,
        "views": views.as_dict(), "exclude_test": _paths(exclude_test), "n_probe": int(n_probe),
        "sim_cache": None if sim_cache is None else str(sim_cache),
        "sim_maps_per_session": int(sim_maps_per_session), "init": None if init is None else str(init),
        "method_kw": dict(method_kw or {}), "weights_dtype": weights_dtype, "checkpoint": bool(checkpoint),
        "command": command or _python_command(data, backbone, method, out, epochs, input_size, n_sim, seed,
                                              batch_size)}
    return _run(spec, None, checkpoint_folder(out), max_minutes=max_minutes, chunk_epochs=chunk_epochs,
                workers=workers, command=spec["command"], verbose=verbose)


def resume_pretraining(checkpoint, *, max_minutes: float | None = None, chunk_epochs: int | None = None,
                       workers: int = 1, out=None, export_only: bool = False, command: str | None = None,
                       verbose=0) -> PretrainResult:
    """Continue the pretraining run of a checkpoint folder (``<out>.checkpoint``) to its own schedule.

    The model, its heads and EMA teachers, AdamW's moments and step counter (hence the learning-rate
    schedule and the seeds of the views) come back from the checkpoint, and the simulated corpus is
    drawn in the order the uninterrupted run had (self-supervised runs on datasets reshuffle with
    ``seed + epochs done``); every setting is the checkpoint's. The encoder folder's config and README
    list every chunk's command and git commit.

    Parameters
    ----------
    checkpoint : str or os.PathLike
        The checkpoint folder.
    max_minutes : float, optional
        Stop this chunk after this much training time, minutes.
    chunk_epochs : int, optional
        Train at most this many more epochs now.
    workers : int
        Processes that simulate the corpus if its cache is gone.
    out : str or os.PathLike, optional
        Write the encoder folder here instead of the run's own ``out``.
    export_only : bool
        Train nothing: write the encoder folder of the checkpoint (BatchNorm recalibrated, probed).
    command : str, optional
        This chunk's command line (recorded).
    verbose : int
        Passed to Keras.

    Returns
    -------
    PretrainResult
        The folder, the whole run's history and the config written.

    Raises
    ------
    ModelError
        Not a checkpoint folder, or its variables do not fit the model its arguments build.
    """
    state = read_checkpoint_state(checkpoint)
    spec = dict(state["spec"])
    if out is not None:
        spec["out"] = str(out)
    command = command or (f"opdcells.pretrain.resume_pretraining({str(checkpoint)!r}, max_minutes="
                          f"{max_minutes}, chunk_epochs={chunk_epochs}, export_only={export_only})")
    return _run(spec, state, Path(checkpoint), max_minutes=max_minutes, chunk_epochs=chunk_epochs,
                workers=workers, command=command, verbose=verbose, export_only=export_only)


def default_weights_dtype(backbone: str) -> str:
    """Storage dtype of a ``backbone`` encoder's weights file unless asked otherwise.

    Parameters
    ----------
    backbone : str
        A key of :data:`~opdcells.pretrain_options.BACKBONES`.

    Returns
    -------
    str
        ``"float16"`` for :data:`~opdcells.pretrain_options.FLOAT16_BACKBONES`, else ``"float32"``.
    """
    return "float16" if backbone in FLOAT16_BACKBONES else "float32"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _view_config(record: dict) -> ViewConfig:
    return ViewConfig(zoom=record["zoom"], crop_shift=record["crop_shift"],
                      augment=AugmentConfig(**record["augment"]))


def _build_encoder(spec: dict, size: int, state: dict | None):
    """The run's encoder: from ``init`` (or random) for a new run; a resumed run rebuilds the recorded
    architecture (random weights: the checkpoint's are assigned later)."""
    saved = (state or {}).get("info") or {}
    weights = spec["init"] if state is None and spec["init"] is not None else "none"
    encoder, info = models.build_encoder(
        BACKBONES[spec["backbone"]], input_shape=(size, size, 1), input_size=spec["input_size"],
        weights=weights, norm_scale_nm=spec["norm_scale_nm"], alpha=saved.get("alpha", spec["alpha"]),
        seed=spec["seed"], dinov2_config=saved.get("dinov2_config") or spec["dinov2_config"])
    if state is not None:
        info = {**info, **{k: saved[k] for k in ("init", "weights_source") if k in saved}}
    return encoder, info


def _variables(trainer) -> dict[str, list]:
    """What a checkpoint holds: the pretraining model's variables and its optimiser's."""
    return {"model": list(trainer.weights), "optimizer": list(trainer.optimizer.variables)}


def _restore(trainer, folder: Path, batch) -> None:
    """Create every variable of ``trainer`` (one inference pass of its loss, the optimiser's slots) and
    assign the checkpoint's values."""
    x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
    trainer.pretext_loss(x, x, y, training=False)   # builds the heads (no state changes in inference)
    trainer.optimizer.build(trainer.trainable_variables)
    restore_checkpoint(folder, _variables(trainer))
    trainer.reset_metrics()


class _Checkpointer(keras.callbacks.Callback):
    """At the end of every complete epoch, write the run's checkpoint (``pretrain_store``)."""

    def __init__(self, folder: Path, state: dict, chunk: dict, steps_per_epoch: int,
                 started: tuple[float, float]):
        super().__init__()
        self.folder, self.state, self.chunk, self.steps_per_epoch = folder, state, chunk, steps_per_epoch
        self.history: dict[str, list[float]] = {}
        self.started, self.cpu_started = started   # the chunk's perf_counter() and process_time()
        self.fit_start, self.first_step = self.started, 0

    def on_train_begin(self, logs=None):
        self.fit_start, self.first_step = time.perf_counter(), int(self.model.optimizer.iterations.numpy())

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        steps = int(self.model.optimizer.iterations.numpy())
        if steps != (epoch + 1) * self.steps_per_epoch:   # an epoch cut short by max_minutes
            log.info("epoch %d ended after %d of %d steps: no checkpoint", epoch + 1,
                     steps - epoch * self.steps_per_epoch, self.steps_per_epoch)
            return
        now = time.perf_counter()
        chunk = {**self.chunk, "epochs": [self.chunk["epochs"][0], epoch + 1],
                 "steps": steps - self.first_step,
                 "fit_time_s": round(now - self.fit_start, 1), "time_s": round(now - self.started, 1),
                 "cpu_time_s": round(time.process_time() - self.cpu_started, 1), "stopped_early": False,
                 "ended": _now()}
        state = {**self.state, "epochs_done": epoch + 1, "steps_done": steps,
                 "history": _joined(self.state["history"], self.history),
                 "chunks": [*self.state["chunks"], chunk]}
        write_checkpoint(self.folder, state, _variables(self.model))


def _joined(before: dict, after: dict) -> dict[str, list[float]]:
    return {k: [float(v) for v in before.get(k, [])] + [float(v) for v in after.get(k, [])]
            for k in {**before, **after}}


def _run(spec: dict, state: dict | None, ckpt: Path, *, max_minutes, chunk_epochs, workers, command,
         verbose, export_only: bool = False) -> PretrainResult:
    """One chunk of a pretraining run (all of it unless stopped): train, probe, write the folder."""
    started, cpu_started = time.perf_counter(), time.process_time()
    # recorded before a long run (the tree may change meanwhile), as is the starting folder
    chunk = {"command": command, "git": _git_commit(), "started": _now()}
    init_from = state["init_from"] if state else _init_record(spec["init"], BACKBONES[spec["backbone"]])
    done = int(state["epochs_done"]) if state else 0
    epochs = int(spec["epochs"])
    datasets = _open_all(spec["data"])
    try:
        make_stream, n_maps, data_record, n_classes = _training_data(
            spec["method"], datasets, n_sim=spec["n_sim"], seed=spec["seed"], batch_size=spec["batch_size"],
            exclude_test=spec["exclude_test"], sim_cache=spec["sim_cache"],
            maps_per_session=spec["sim_maps_per_session"], workers=workers)
        size = int(data_record["out_size"])
        steps_per_epoch = n_maps // spec["batch_size"]
        if steps_per_epoch < 1:
            raise ValueError(f"{n_maps} maps are fewer than one batch of {spec['batch_size']}")
        encoder, info = _build_encoder(spec, size, state)
        probe = simulated_probe_set(spec["n_probe"], spec["seed"], cache_dir=spec["sim_cache"]) \
            if spec["n_probe"] else None
        calibration = calibration_maps(make_stream(0))
        momentum = info["bn_momentum"] or 0.9
        if state is None:
            recalibrate_batchnorm(encoder, calibration, momentum)
            probe_before = probe_encoder(encoder, probe) if probe is not None else None
        else:
            probe_before = state["probe_before"]
        trainer = build_pretrainer(spec["method"], encoder, n_classes=n_classes, seed=spec["seed"],
                                   views=_view_config(spec["views"]), **spec["method_kw"])
        trainer.compile(optimizer=_optimizer(spec["learning_rate"], spec["weight_decay"],
                                             epochs * steps_per_epoch), jit_compile=False)
        if state is not None:   # a batch of its own stream: the training stream's order stays untouched
            _restore(trainer, ckpt, next(iter(make_stream(0))))
            log.info("resumed %s after epoch %d of %d (step %d)", ckpt, done, epochs,
                     int(trainer.optimizer.iterations.numpy()))
        stop = epochs if chunk_epochs is None else min(epochs, done + int(chunk_epochs))
        limit, counter = _TimeLimit(None if max_minutes is None else 60.0 * max_minutes), _StepCounter()
        chunk["epochs"] = [done, done]
        callbacks = [limit, counter]
        if spec["checkpoint"]:
            base = {"spec": spec, "steps_per_epoch": steps_per_epoch, "info": info, "init_from": init_from,
                    "probe_before": probe_before, "history": (state or {}).get("history", {}),
                    "chunks": (state or {}).get("chunks", [])}
            callbacks.append(_Checkpointer(ckpt, base, chunk, steps_per_epoch, (started, cpu_started)))
        fit_start = time.perf_counter()
        new = {}
        if not export_only and done < stop:
            new = trainer.fit(make_stream(done), epochs=stop, initial_epoch=done, callbacks=callbacks,
                              shuffle=False, verbose=verbose).history
        fit_time = time.perf_counter() - fit_start
        recalibrate_batchnorm(encoder, calibration, momentum)
        probe_after = probe_encoder(encoder, probe) if probe is not None else None
    finally:
        for ds in datasets:
            ds.close()
    history = _joined((state or {}).get("history", {}), new)
    chunk.update(epochs=[done, done + len(new.get("loss", []))], steps=counter.steps,
                 fit_time_s=round(fit_time, 1), time_s=round(time.perf_counter() - started, 1),
                 cpu_time_s=round(time.process_time() - cpu_started, 1), stopped_early=limit.hit,
                 ended=_now())
    chunks = [*(state or {}).get("chunks", []), *([] if export_only else [chunk])]
    config = _pretrain_config(
        info=info, spec=spec, trainer=trainer, data_record=data_record, history=history,
        steps=int(trainer.optimizer.iterations.numpy()), steps_per_epoch=steps_per_epoch, chunks=chunks,
        stopped_early=limit.hit or len(history.get("loss", [])) < epochs, max_minutes=max_minutes,
        init_from=init_from, checkpoint=str(ckpt) if spec["checkpoint"] else None,
        probe={"before": probe_before, "after": probe_after, "record": probe.record} if probe else None)
    folder = _write_folder(Path(spec["out"]), encoder, info, config, history, spec["weights_dtype"])
    log.info("pretrained %s (%s), epoch %d of %d: final loss %.4f -> %s", spec["backbone"], spec["method"],
             config["epochs_run"], epochs, config["final_loss"], folder)
    return PretrainResult(folder, history, config)


def _common_geometry(datasets) -> tuple[float, int]:
    """(pixel size, map size) shared by all datasets; ValueError if they differ."""
    geometry = {(round(ds.pixel_size_um, 6), ds.out_size) for ds in datasets}
    if len(geometry) > 1:
        raise ValueError(f"datasets differ in pixel size / map size {sorted(geometry)}: ingest them with one "
                         "preprocessing configuration")
    return next(iter(geometry))


def _training_data(method, datasets, *, n_sim, seed, batch_size, exclude_test, sim_cache,
                   maps_per_session=SIM_MAPS_PER_SESSION, workers=1):
    """(stream factory, number of maps, data record, number of classes or None) for ``method``; the
    factory takes the number of epochs already done (:func:`corpus_stream`'s ``skip_epochs``)."""
    if datasets and method != "supervised-sim":
        pixel_size, size = _common_geometry(datasets)

        def make_stream(done: int) -> tf.data.Dataset:
            return dataset_stream(datasets, batch_size=batch_size, seed=seed + done,
                                  exclude_test=exclude_test)[0]

        _, n_maps, records = dataset_stream(datasets, batch_size=batch_size, seed=seed,
                                            exclude_test=exclude_test)
        return make_stream, n_maps, {"kind": "datasets", "labels_used": False, "pixel_size_um": pixel_size,
                                     "out_size": size, "datasets": records}, None
    corpus = simulate_corpus(n_sim, seed, cache_dir=sim_cache, maps_per_session=maps_per_session,
                             workers=workers)
    labelled = method == "supervised-sim"
    record = {"kind": "simulated", "labels_used": labelled, "pixel_size_um": corpus.record["pixel_size_um"],
              "out_size": corpus.record["out_size"], "simulated": corpus.record,
              "disjoint_from": check_disjoint(corpus, datasets)}

    def make_stream(done: int) -> tf.data.Dataset:
        return corpus_stream(corpus, batch_size=batch_size, seed=seed, labelled=labelled, skip_epochs=done)

    return make_stream, len(corpus), record, len(corpus.class_names) if labelled else None


def _python_command(data, backbone, method, out, epochs, input_size, n_sim, seed, batch_size) -> str:
    """The Python call that reproduces a run made through the API (the CLI records its own argv)."""
    return (f"opdcells.pretrain.pretrain({data!r}, backbone={backbone!r}, method={method!r}, "
            f"out={str(out)!r}, epochs={epochs}, input_size={input_size}, n_sim={n_sim}, seed={seed}, "
            f"batch_size={batch_size})")


def _pretrain_config(*, info, spec, trainer, data_record, history, steps, steps_per_epoch, chunks,
                     stopped_early, max_minutes, probe, init_from, checkpoint) -> dict:
    losses = history.get("loss") or [float("nan")]
    return {
        "method": spec["method"],
        "backbone": spec["backbone"],
        "data": data_record,
        "epochs": spec["epochs"],
        "epochs_run": len(history.get("loss", [])),
        "steps": int(steps),
        "final_loss": losses[-1],
        "time_s": round(sum(c["time_s"] for c in chunks), 1),
        "pretraining": {
            "steps_per_epoch": steps_per_epoch, "batch_size": spec["batch_size"], "optimizer": "AdamW",
            "learning_rate": spec["learning_rate"],
            "schedule": "linear warmup (10% of steps, <= 500) + cosine decay",
            "weight_decay": spec["weight_decay"], "clipnorm": 3.0, "seed": spec["seed"],
            "views": trainer.views.as_dict(), "hyperparameters": trainer.hyperparameters,
            "fit_time_s": round(sum(c["fit_time_s"] for c in chunks), 1),
            "cpu_time_s": round(sum(c["cpu_time_s"] for c in chunks), 1),
            "stopped_early": bool(stopped_early), "max_minutes": max_minutes,
            "batchnorm": "moving statistics recalibrated on up to 256 clean training maps after training",
        },
        "probe": probe,
        "command": spec["command"],
        "chunks": chunks,
        "checkpoint": checkpoint,
        "weights_dtype": spec["weights_dtype"],
        "created": _now(),
        "versions": versions(),
        "init_from": init_from,
        "git": chunks[0]["git"] if chunks else None,
        "build_info": {k: v for k, v in info.items() if k not in ("weights_note",)},
    }


def _init_record(init, architecture: str) -> dict | None:
    """Where a continued pretraining starts: the folder and what its own config says it was."""
    if init is None:
        return None
    resolved = registry.resolve_weights(architecture, init)   # "opd", "opd:NAME" or a folder/file
    if resolved.kind != "file":
        raise ValueError(f"--init {init}: not an encoder folder, weights file or registry entry")
    record = {"folder": str(init), "init": resolved.init}
    config = resolved.config or {}
    for key in ("method", "input_size", "epochs_run", "command"):
        if key in config:
            record[key] = config[key]
    return record


def _write_folder(out: Path, encoder, info: dict, config: dict, history: dict, weights_dtype: str) -> Path:
    """Encoder weights (stored as ``weights_dtype``) + config (``models.save_encoder``) with the pretraining
    record, history, README."""
    with staging(out) as tmp:
        models.save_encoder(encoder, {**info, "init": "opd-pretrained", "weights_source": None}, tmp)
        if weights_dtype != "float32":
            cast_weights_file(tmp / models.ENCODER_WEIGHTS, tmp / models.ENCODER_WEIGHTS, weights_dtype)
        saved = json.loads((tmp / models.ENCODER_CONFIG).read_text())
        merged = {**saved, **config}
        (tmp / models.ENCODER_CONFIG).write_text(json.dumps(merged, indent=1, default=json_default) + "\n")
        write_history(tmp / "history.csv", history)
        (tmp / "README.md").write_text(_readme(out.name, merged))
    config.clear()
    config.update(merged)
    return out


def _data_summary(data: dict) -> str:
    if data["kind"] == "simulated":
        sim = data["simulated"]
        first, last = sim["session_numbers"]
        labels = "used" if data["labels_used"] else "NOT used"
        return (f"{sim['n_maps']} simulated maps (seed {sim['seed']}, sessions {first}-{last} of each class, "
                f"{sim['maps_per_session']} maps each); labels {labels}")
    return "; ".join(f"{d['path']} ({d['n_used']} maps, fingerprint {d['fingerprint'][:12]})"
                     for d in data["datasets"]) + "; labels NOT used"


def probe_labels(config: dict) -> tuple[tuple[str, str], ...]:
    """How the README and the command name the two probes: of the starting encoder and of the pretrained one.

    Parameters
    ----------
    config : dict
        The encoder folder's config.json.

    Returns
    -------
    tuple of (str, str)
        (label, config ``probe`` key) for before and after pretraining.
    """
    start = f"start ({config['init_from']['folder']})" if config.get("init_from") else "random init"
    return (start, "before"), ("pretrained", "after")


def _probe_table(probe: dict, labels) -> list[str]:
    rows = [f"Frozen-embedding probes on {probe['record']['n_maps']} simulated maps from unseen sessions "
            "(classifier trained on half of each class' sessions, tested on the others); accuracy:", "",
            "| encoder | 5-class linear | 5-class 5-NN | cancer vs blood linear | cancer vs blood 5-NN |",
            "|---|---|---|---|---|"]
    for label, key in labels:
        cells = [f"{probe[key][task][kind]['accuracy']:.3f}"
                 for task in PROBE_TASKS for kind in ("linear", "knn")]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows + [""]


def _readme(name: str, config: dict) -> str:
    """Human summary of an encoder folder, generated from its config."""
    batch = config["pretraining"]["batch_size"]
    width = f", alpha {config['alpha']}" if config.get("alpha") else ""
    use = (f"Use: `python -m opdcells train --model {config['architecture']} --weights <this folder>`; to "
           "ship it, move the folder to `opdcells/pretrained/NAME/` and add its `opdcells.registry` entry "
           "(then `--weights opd:NAME`; docs/pretraining.md).")
    lines = [
        f"# {name}", "",
        f"OPD encoder ({config['architecture']}{width}, "
        f"input {config['input_size']} px, OPD / {config['norm_scale_nm']:g} nm) "
        f"pretrained with **{config['method']}** by `opdcells.pretrain`.", "",
        f"* data: {_data_summary(config['data'])}",
        f"* {config['epochs_run']} of {config['epochs']} epochs, {config['steps']} steps of {batch} maps, "
        f"final loss {config['final_loss']:.4f}, {config['time_s']:.0f} s "
        f"({config['pretraining']['cpu_time_s']:.0f} s CPU)",
        f"* weights stored as {config.get('weights_dtype', 'float32')} (loaded as float32)",
        *([f"* continued from `{config['init_from']['folder']}` (its command: "
           f"`{config['init_from'].get('command', '?')}`)"] if config.get("init_from") else []),
        f"* opdcells {__version__}, keras {keras.__version__}, tensorflow {tf.__version__}", "",
        *(_probe_table(config["probe"], probe_labels(config)) if config.get("probe") else []),
        "Reproduce:", "", "```", config["command"], "```", "",
        *_chunk_lines(config),
        use,
    ]
    return "\n".join(lines) + "\n"


def _chunk_lines(config: dict) -> list[str]:
    """The README's record of the chunks the run ran in, and how to continue an unfinished one."""
    chunks = config.get("chunks") or []
    lines = []
    if len(chunks) > 1 or config["epochs_run"] < config["epochs"]:
        lines += ["Run in chunks (each continues the last checkpoint; commit of its code):", "",
                  "| epochs | time | CPU | commit | command |", "|---|---|---|---|---|"]
        for c in chunks:
            git = c.get("git") or {}
            commit = git.get("commit", "?")[:12] + ("+" if git.get("dirty") else "")
            lines.append(f"| {c['epochs'][0]}-{c['epochs'][1]} | {c['time_s']:.0f} s | "
                         f"{c['cpu_time_s']:.0f} s | {commit} | `{c['command']}` |")
        lines.append("")
    if config["epochs_run"] < config["epochs"] and config.get("checkpoint"):
        lines += ["Unfinished: continue with", "", "```",
                  f"python -m opdcells pretrain --resume {config['checkpoint']}", "```", ""]
    return lines


# ---------------------------------------------------------------------- CLI


