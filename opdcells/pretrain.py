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
from .files import json_default, staging, versions, write_history
from .pipeline import iter_batches, make_tf_dataset
from .pretrain_corpus import SimCorpus, check_disjoint, dataset_record, simulate_corpus, simulated_probe_set
from .pretrain_methods import ViewConfig, build_pretrainer
from .pretrain_options import BACKBONES, DEFAULT_N_SIM, METHOD_DEFAULTS, METHODS, SIM_MAPS_PER_SESSION
from .pretrain_probes import PROBE_TASKS, calibration_maps, probe_encoder, recalibrate_batchnorm

log = logging.getLogger(__name__)

__all__ = ["dataset_stream", "corpus_stream", "PretrainResult", "pretrain", "probe_labels"]


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


def corpus_stream(corpus: SimCorpus, *, batch_size: int, seed: int = 0, labelled: bool) -> tf.data.Dataset:
    """Shuffled batches of the in-memory corpus (remainder dropped).

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

    Returns
    -------
    tf.data.Dataset
        Maps (B, S, S, 1) float32 nm, with int32 labels (B,) if ``labelled``.
    """
    rng = np.random.default_rng(seed)
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

    return [open_dataset(p) for p in ([data] if isinstance(data, (str, Path)) else list(data or []))]


def pretrain(data=None, *, backbone: str = "mobilenetv2", method: str = "simclr",
             out="saved_models/opd_pretrained", epochs: int | None = None, input_size: int = 64,
             n_sim: int = DEFAULT_N_SIM, seed: int = 0, batch_size: int = 64,
             learning_rate: float | None = None, weight_decay: float | None = None,
             alpha: float | None = None, norm_scale_nm: float = models.DEFAULT_NORM_SCALE_NM,
             dinov2_config: dict | None = None,
             views: ViewConfig = ViewConfig(),  # noqa: B008 - a frozen dataclass
             exclude_test=(), n_probe: int = 0,
             max_minutes: float | None = None, sim_cache=None,
             sim_maps_per_session: int = SIM_MAPS_PER_SESSION,
             workers: int = 1, init=None, method_kw: dict | None = None, command: str | None = None,
             verbose=0) -> PretrainResult:
    """Pretrain a ``backbone`` encoder with ``method`` and write it to ``out`` (see the module docstring).

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
        Epochs (default per method, :data:`~opdcells.pretrain_options.METHOD_DEFAULTS`).
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
        Stop early after this much training time, minutes (recorded).
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
        An unknown method or backbone, or datasets of different geometry.
    RegistryError
        ``init`` names a registry entry that is missing or corrupt.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    defaults = METHOD_DEFAULTS[method]
    epochs = int(epochs or defaults["epochs"])
    learning_rate = float(learning_rate or defaults["learning_rate"])
    weight_decay = float(defaults["weight_decay"] if weight_decay is None else weight_decay)
    datasets = _open_all(data)
    started = time.perf_counter()
    git = _git_commit()    # the code that runs, recorded before a long run (the tree may change meanwhile)
    init_from = _init_record(init, BACKBONES[backbone])   # likewise the starting folder, before it can change
    try:
        stream, n_maps, data_record, n_classes = _training_data(
            method, datasets, n_sim=n_sim, seed=seed, batch_size=batch_size, exclude_test=exclude_test,
            sim_cache=sim_cache, maps_per_session=sim_maps_per_session, workers=workers)
        size = int(data_record["out_size"])
        steps_per_epoch = n_maps // batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"{n_maps} maps are fewer than one batch of {batch_size}")
        encoder, info = models.build_encoder(
            BACKBONES[backbone], input_shape=(size, size, 1), input_size=input_size,
            weights="none" if init is None else init, norm_scale_nm=norm_scale_nm, alpha=alpha, seed=seed,
            dinov2_config=dinov2_config)
        probe = simulated_probe_set(n_probe, seed, cache_dir=sim_cache) if n_probe else None
        calibration = calibration_maps(stream)
        recalibrate_batchnorm(encoder, calibration, info["bn_momentum"] or 0.9)
        probe_before = probe_encoder(encoder, probe) if probe is not None else None
        trainer = build_pretrainer(method, encoder, n_classes=n_classes, seed=seed, views=views,
                                   **(method_kw or {}))
        trainer.compile(optimizer=_optimizer(learning_rate, weight_decay, epochs * steps_per_epoch),
                        jit_compile=False)
        limit, counter = _TimeLimit(None if max_minutes is None else 60.0 * max_minutes), _StepCounter()
        fit_start = time.perf_counter()
        history = trainer.fit(stream, epochs=epochs, callbacks=[limit, counter], shuffle=False,
                              verbose=verbose).history
        fit_time = time.perf_counter() - fit_start
        recalibrate_batchnorm(encoder, calibration, info["bn_momentum"] or 0.9)
        probe_after = probe_encoder(encoder, probe) if probe is not None else None
    finally:
        for ds in datasets:
            ds.close()
    history = {k: [float(v) for v in values] for k, values in history.items()}
    config = _pretrain_config(
        info=info, method=method, backbone=backbone, trainer=trainer, data_record=data_record,
        history=history, epochs=epochs, steps=counter.steps, steps_per_epoch=steps_per_epoch,
        batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay, seed=seed,
        fit_time=fit_time, total_time=time.perf_counter() - started, stopped_early=limit.hit,
        max_minutes=max_minutes, git=git, init_from=init_from,
        probe={"before": probe_before, "after": probe_after, "record": probe.record} if probe else None,
        command=command or _python_command(data, backbone, method, out, epochs, input_size, n_sim, seed,
                                           batch_size))
    folder = _write_folder(Path(out), encoder, info, config, history)
    log.info("pretrained %s (%s) in %.0f s: final loss %.4f -> %s", backbone, method, config["time_s"],
             config["final_loss"], folder)
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
    """(stream, number of maps, data record, number of classes or None) for ``method``."""
    if datasets and method != "supervised-sim":
        pixel_size, size = _common_geometry(datasets)
        stream, n_maps, records = dataset_stream(datasets, batch_size=batch_size, seed=seed,
                                                 exclude_test=exclude_test)
        return stream, n_maps, {"kind": "datasets", "labels_used": False, "pixel_size_um": pixel_size,
                                "out_size": size, "datasets": records}, None
    corpus = simulate_corpus(n_sim, seed, cache_dir=sim_cache, maps_per_session=maps_per_session,
                             workers=workers)
    labelled = method == "supervised-sim"
    record = {"kind": "simulated", "labels_used": labelled, "pixel_size_um": corpus.record["pixel_size_um"],
              "out_size": corpus.record["out_size"], "simulated": corpus.record,
              "disjoint_from": check_disjoint(corpus, datasets)}
    stream = corpus_stream(corpus, batch_size=batch_size, seed=seed, labelled=labelled)
    return stream, len(corpus), record, len(corpus.class_names) if labelled else None


def _python_command(data, backbone, method, out, epochs, input_size, n_sim, seed, batch_size) -> str:
    """The Python call that reproduces a run made through the API (the CLI records its own argv)."""
    return (f"opdcells.pretrain.pretrain({data!r}, backbone={backbone!r}, method={method!r}, "
            f"out={str(out)!r}, epochs={epochs}, input_size={input_size}, n_sim={n_sim}, seed={seed}, "
            f"batch_size={batch_size})")


def _pretrain_config(*, info, method, backbone, trainer, data_record, history, epochs, steps, steps_per_epoch,
                     batch_size, learning_rate, weight_decay, seed, fit_time, total_time, stopped_early,
                     max_minutes, probe, command, git, init_from=None) -> dict:
    losses = history.get("loss") or [float("nan")]
    return {
        "method": method,
        "backbone": backbone,
        "data": data_record,
        "epochs": epochs,
        "epochs_run": len(history.get("loss", [])),
        "steps": int(steps),
        "final_loss": losses[-1],
        "time_s": round(total_time, 1),
        "pretraining": {
            "steps_per_epoch": steps_per_epoch, "batch_size": batch_size, "optimizer": "AdamW",
            "learning_rate": learning_rate, "schedule": "linear warmup (10% of steps, <= 500) + cosine decay",
            "weight_decay": weight_decay, "clipnorm": 3.0, "seed": seed, "views": trainer.views.as_dict(),
            "hyperparameters": trainer.hyperparameters, "fit_time_s": round(fit_time, 1),
            "stopped_early": bool(stopped_early), "max_minutes": max_minutes,
            "batchnorm": "moving statistics recalibrated on up to 256 clean training maps after training",
        },
        "probe": probe,
        "command": command,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "init_from": init_from,
        "git": git,
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


def _write_folder(out: Path, encoder, info: dict, config: dict, history: dict) -> Path:
    """Encoder weights + config (``models.save_encoder``) with the pretraining record, history, README."""
    with staging(out) as tmp:
        models.save_encoder(encoder, {**info, "init": "opd-pretrained", "weights_source": None}, tmp)
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
        f"* {config['epochs_run']} epochs, {config['steps']} steps of {batch} maps, "
        f"final loss {config['final_loss']:.4f}, {config['time_s']:.0f} s",
        *([f"* continued from `{config['init_from']['folder']}` (its command: "
           f"`{config['init_from'].get('command', '?')}`)"] if config.get("init_from") else []),
        f"* opdcells {__version__}, keras {keras.__version__}, tensorflow {tf.__version__}", "",
        *(_probe_table(config["probe"], probe_labels(config)) if config.get("probe") else []),
        "Reproduce:", "", "```", config["command"], "```", "",
        use,
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- CLI


