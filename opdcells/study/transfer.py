"""Experiments behind ``OPD_Model_and_DinoV2.ipynb``: DINOv2 and the OPD-pretrained MobileNetV2 used as
frozen encoders (linear and k-NN probes), label efficiency, looking inside the models, and real cells.

* :class:`Encoders` builds each encoder once (``models.build_encoder``) and caches the embeddings of
  every dataset map. Random-init CNN encoders get their BatchNormalization statistics recalibrated on the
  task's TRAINING maps first (``pretrain.recalibrate_batchnorm``: with mean 0 / variance 1 moving
  statistics a random MobileNetV2's inference-mode embeddings vanish). ``features`` (OPD morphology
  features) takes the place of an encoder for the reference rows.
* :func:`task_split` is the group split of a task's fine-tuned run (its ``split.json``); without a run it
  is ``train.make_split`` with the same seed -- what :func:`opdcells.train.train` would have made.
* :func:`frozen_probes` -> table of frozen-linear / frozen-kNN / fine-tuned accuracy per encoder and task.
* :func:`label_efficiency` -> accuracy vs labelled fraction of the training maps
  (``splits.subsample_labelled``, several seeds): linear probes on frozen embeddings (on the morphology
  features for ``features``), and optionally fine-tuning (``finetune=``) with ``train.train``'s fitting.
* :func:`embedding_view`, :func:`explain_examples`, :func:`load_real_cells`: 2-D embeddings, Grad-CAM /
  DINOv2 attention on example cells, and real measured cells preprocessed like the dataset.

Each function returns what it made (tables, paths); the notebook displays them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import plots
from ..config import TrainConfig, resolve_alias, write_json_atomic
from ..dataset import open_dataset
from ..evaluate import classification_report, flatten_report, write_table
from ..splits import Split, subsample_labelled
from ..tasks import resolve_task, task_slug

log = logging.getLogger(__name__)

__all__ = ["ENCODER_MODELS", "Encoders", "task_split", "frozen_probes", "label_efficiency",
           "embedding_view", "explain_examples", "load_real_cells", "preprocess_config_of",
           "init_table", "ProbeResult", "FinetuneCache", "run_digest", "code_digest", "finetune_config",
           "real_cell_predictions", "real_cells_conclusion", "probes_conclusion",
           "label_efficiency_conclusion"]

#: Models that are (or contain) a Keras encoder; ``features`` is the non-deep reference.
ENCODER_MODELS = ("mobilenetv2", "opd_mobilenetv2", "dinov2", "resnet50", "vgg16")
FEATURES = "features"
N_CALIBRATION = 256          # maps used to recalibrate BatchNormalization of random-init encoders
KNN_K = 5
#: lbfgs iterations of the logistic-regression probes: 200 give the accuracy of 2000 (0.663 vs 0.665,
#: OPD encoder, five_class) in a third of the time.
PROBE_MAX_ITER = 200
METRIC_COLUMNS = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "balanced_accuracy",
                  "balanced_accuracy_ci_low", "balanced_accuracy_ci_high")


def _opened(data):
    return open_dataset(data) if isinstance(data, (str, Path)) else data


def preprocess_config_of(ds):
    """PreprocessConfig that makes maps like the dataset's (for real exports).

    Parameters
    ----------
    ds : Dataset
        An opened dataset; its stored settings (pixel size um, size px, background order, alpha) are used.

    Returns
    -------
    PreprocessConfig
    """
    from ..preprocess import PreprocessConfig

    return PreprocessConfig.from_settings(ds.settings)


# ---------------------------------------------------------------------- splits


def run_dir(saved_models, name: str, model: str, task: str) -> Path:
    """Folder ``experiments.compare_models`` writes the run of ``model`` on ``task`` to.

    Parameters
    ----------
    saved_models : str or Path
        Folder of model folders.
    name : str
        The comparison's name.
    model : str
        Model name.
    task : str
        Task (its :func:`opdcells.tasks.task_slug` names the folder).

    Returns
    -------
    Path
        ``saved_models/<name>_<model>_<task slug>``.
    """
    return Path(saved_models) / f"{name}_{model}_{task_slug(task)}"


def task_split(ds, task: str, *, saved_models="saved_models", name="opd_dinov2", models=(), seed=0
               ) -> tuple[Split, str]:
    """(split, where it came from) for ``task``: the ``split.json`` of the first fine-tuned run
    ``<name>_<model>_<task>`` (``models`` in order) made on this dataset, else ``train.make_split``
    with ``seed`` -- the split :func:`opdcells.train.train` makes with that seed.

    Parameters
    ----------
    ds : Dataset
        The opened dataset (a run's split is used only when made on the same dataset fingerprint).
    task : str
        Task, as :func:`opdcells.tasks.resolve_task` reads it.
    saved_models : str or Path
        Folder of model folders.
    name : str
        The comparison's name.
    models : sequence of str
        Models whose runs are looked at, in order.
    seed : int
        Random seed of a new split.

    Returns
    -------
    tuple of (Split, str)
        The split (train, validation and test indices of the dataset's maps) and its source.
    """
    import json

    from ..train import make_split

    for model in models:
        folder = run_dir(saved_models, name, model, task)
        if (folder / "split.json").is_file() and (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
            if config.get("dataset", {}).get("fingerprint") == ds.fingerprint:
                return Split.from_json(folder / "split.json"), str(folder / "split.json")
            log.warning("%s was trained on another dataset; not using its split", folder)
    return (make_split(ds, resolve_task(task, ds.class_names, ds.labels), seed=seed),
            f"train.make_split(seed={seed})")


# ---------------------------------------------------------------------- encoders


@dataclass
class Encoders:
    """Frozen encoders of one dataset, built once, with cached embeddings of all its maps.

    ``dinov2_preset`` (if it loads) or ``dinov2_weights`` (an OPD-pretrained DINOv2 folder, or "opd" for
    the registry's, ``opdcells.registry``) initialise DINOv2; otherwise it is random.
    ``opd_mobilenetv2`` is MobileNetV2 with the registry's OPD-pretrained weights. Random-init
    encoders with BatchNormalization are recalibrated on the training maps they are given.

    Attributes
    ----------
    ds : Dataset
        The opened dataset whose maps are embedded.
    profile : str
        Training profile whose model settings (input size, ...) the encoders take.
    input_size : int, optional
        Encoder input side (px); default: the profile's.
    dinov2_weights : str, optional
        OPD-pretrained DINOv2 folder, or "opd" for the registry's.
    dinov2_preset : str, optional
        A KerasHub DINOv2 preset.
    seed : int
        Random seed of random-init encoders.
    batch_size : int
        Maps per encoder call.
    tta : bool
        Embeddings are the mean over each map's 8 rotations and reflections (``explain.embed``).
    infos : dict
        Model name -> how its encoder was initialised (filled as encoders are built).
    """

    ds: object
    profile: str = "quick"
    input_size: int | None = None
    dinov2_weights: str | None = None
    dinov2_preset: str | None = None
    seed: int = 0
    batch_size: int = 128
    tta: bool = True
    infos: dict = field(default_factory=dict)
    _built: dict = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)
    _probes: dict = field(default_factory=dict, repr=False)

    def weights_of(self, model: str):
        """``weights`` for ``models.build_encoder`` / ``train`` (``config.resolve_alias``: "opd" for
        ``opd_mobilenetv2``; a missing or corrupt registry file is an error)."""
        return resolve_alias(model, str(self.dinov2_weights) if model == "dinov2" and self.dinov2_weights
                             else None)[1]

    def encoder(self, model: str, calibration=None):
        """(encoder, info) of ``model``; ``calibration`` = training map indices for BN recalibration
        (used only when the encoder is random-init and has BatchNormalization layers)."""
        from ..models import DEFAULT_NORM_SCALE_NM, batch_norm_layers, build_encoder, saved_encoder_config
        from ..pretrain_probes import recalibrate_batchnorm
        from ..train import geometry_warning

        if model not in self._built:
            cfg = TrainConfig.from_profile(model, self.profile, weights=self.weights_of(model))
            saved = saved_encoder_config(cfg.model, cfg.weights)
            if saved is None and self.input_size:
                cfg = cfg.replace(input_size=int(self.input_size))
            # a pretrained encoder's own scale, else fixed, not estimated: no test map may shape it
            norm = (saved or {}).get("norm_scale_nm") or DEFAULT_NORM_SCALE_NM
            kw = {**cfg.build_kw, **({"dinov2_preset": self.dinov2_preset} if cfg.model == "dinov2" else {})}
            size = cfg.input_size
            shape = (self.ds.out_size, self.ds.out_size, 1)
            encoder, info = build_encoder(cfg.model, input_shape=shape, input_size=int(size),
                                          weights=cfg.weights, norm_scale_nm=float(norm), seed=self.seed,
                                          **kw)
            info["has_batchnorm"] = bool(batch_norm_layers(encoder))
            warning = geometry_warning(saved, self.ds.pixel_size_um, self.ds.out_size, int(size),
                                       f"the {model} encoder")
            if warning:
                log.warning("%s", warning)
                info["geometry_warning"] = warning
            self._built[model] = (encoder, info)
            self.infos[model] = info
        encoder, info = self._built[model]
        if info["init"] == "random" and info["has_batchnorm"] and calibration is not None:
            idx = np.asarray(calibration, dtype=np.int64)
            if len(idx) > N_CALIBRATION:
                idx = np.sort(np.random.default_rng(self.seed).choice(idx, N_CALIBRATION, replace=False))
            recalibrate_batchnorm(encoder, self.ds.read(idx)[..., None], info.get("bn_momentum") or 0.9)
        return encoder, info

    def needs_calibration(self, model: str) -> bool:
        if model == FEATURES:
            return False
        _, info = self.encoder(model)
        return info["init"] == "random" and info["has_batchnorm"]

    def embeddings(self, model: str, calibration=None) -> np.ndarray:
        """(N, D) embeddings of every dataset map (``features``: the morphology feature matrix);
        random-init BN encoders are recalibrated on ``calibration`` first (cached per calibration set)."""
        key = (model, None, self.tta)
        if model != FEATURES and self.needs_calibration(model):
            if calibration is None:
                raise ValueError(f"{model} is random-init with BatchNormalization: give calibration maps")
            key = (model, hash(np.asarray(calibration, dtype=np.int64).tobytes()), self.tta)
        if key not in self._cache:
            self._cache[key] = self._embed_all(model, calibration)
        return self._cache[key]

    def probe(self, model: str, y_all, train, test, method: str = "linear", calibration=None) -> np.ndarray:
        """Predicted class of each ``test`` map by a probe (``"linear"`` or ``"knn"``) fitted on the frozen
        embeddings of the ``train`` maps. A probe already fitted on the same maps, labels and embeddings is
        not fitted again (label efficiency at 100% of the labels draws the same maps for every seed: the
        frozen probe of :func:`frozen_probes`).

        Parameters
        ----------
        model : str
            Model name (``features``: the morphology feature matrix).
        y_all : array_like (N,) of int
            Task class of every dataset map.
        train, test : array_like of int
            Dataset indices of the training and test maps.
        method : {"linear", "knn"}
            Logistic regression on standardised embeddings, or a cosine k-NN vote.
        calibration : array_like of int, optional
            Training maps for BatchNormalization recalibration of a random-init encoder.

        Returns
        -------
        (n_test,) int ndarray
        """
        emb = self.embeddings(model, calibration=calibration)
        train, test = np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)
        y_all = np.asarray(y_all)
        key = (model, None if calibration is None else _digest(calibration), method, _digest(train),
               _digest(test), _digest(y_all[train]))
        if key not in self._probes:
            self._probes[key] = _probe(emb[train], y_all[train], emb[test], y_all[test], method)
        return self._probes[key]

    def _embed_all(self, model: str, calibration) -> np.ndarray:
        from ..files import iter_maps

        if model == FEATURES:
            from ..features import feature_matrix

            every = np.arange(len(self.ds))
            blocks = [feature_matrix(m, self.ds.pixel_size_um)[0] for m in iter_maps(self.ds, every)]
            self.infos[FEATURES] = {"architecture": FEATURES, "init": "n/a (hand-made OPD features)"}
            return np.nan_to_num(np.concatenate(blocks).astype(np.float32))
        from ..explain import embed

        encoder, _ = self.encoder(model, calibration)
        blocks = [embed(encoder, m, self.batch_size, tta=self.tta)
                  for m in iter_maps(self.ds, np.arange(len(self.ds)), batch_size=512)]
        log.info("embedded %d maps with %s", len(self.ds), model)
        return np.concatenate(blocks)


def _digest(values) -> str:
    """SHA-256 (hex) of an integer array's values, in order."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.int64).tobytes()).hexdigest()


def init_table(encoders: Encoders, models, comparison=None) -> pd.DataFrame:
    """How each model was initialised: frozen encoder (this module) and fine-tuned run (its config).

    Parameters
    ----------
    encoders : Encoders
        The frozen encoders (built on demand).
    models : sequence of str
        Model names (``features`` included: "n/a").
    comparison : Comparison, optional
        The fine-tuned runs (``experiments.compare_models``).

    Returns
    -------
    pandas.DataFrame
        One row per model: ``model``, ``frozen_encoder_init``, ``weights_source``, ``input_size`` (px),
        ``fine_tuned_init``.
    """
    rows = []
    for model in models:
        if model == FEATURES:
            rows.append({"model": model, "frozen_encoder_init": "n/a", "weights_source": None,
                         "fine_tuned_init": "n/a"})
            continue
        _, info = encoders.encoder(model)
        tuned = sorted({str(r.config.get("init")) for (t, m), r in (comparison.runs.items() if comparison
                                                                    else []) if m == model})
        rows.append({"model": model, "frozen_encoder_init": info["init"],
                     "weights_source": info.get("weights_source"), "input_size": info.get("input_size"),
                     "fine_tuned_init": ", ".join(tuned) or None})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------- probes


def _task_labels(ds, task):
    from ..tasks import task_labels

    return task_labels(ds, resolve_task(task, ds.class_names, ds.labels))


def _metrics(y_true, pred, class_names, n_boot, seed, groups=None) -> dict:
    """Headline metric columns; CIs resample the maps' acquisition ``groups`` when given."""
    proba = np.eye(len(class_names))[pred]
    row = flatten_report(classification_report(y_true, proba, class_names, n_boot=n_boot, seed=seed,
                                               groups=groups))
    return {k: row[k] for k in METRIC_COLUMNS}


def _probe(train_emb, y_train, test_emb, y_test, method: str) -> np.ndarray:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from ..explain import knn_probe, linear_probe

    fn = linear_probe if method == "linear" else knn_probe
    kw = {"k": KNN_K} if method == "knn" else {"max_iter": PROBE_MAX_ITER}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return np.asarray(fn(train_emb, y_train, test_emb, y_test, **kw)["predictions"])


@dataclass
class ProbeResult:
    """What :func:`frozen_probes` made: the table, the splits used per task, written files.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per (task, model, method): test accuracy with 95% CIs.
    splits : dict
        Task -> (Split, where it came from).
    files : dict
        Name -> Path of the written tables.
    """

    table: pd.DataFrame
    splits: dict = field(default_factory=dict)      # task -> (Split, source)
    files: dict = field(default_factory=dict)


def frozen_probes(encoders: Encoders, tasks, models, *, comparison=None, name="opd_dinov2",
                  saved_models="saved_models", results="results", seed=0, n_boot=1000) -> ProbeResult:
    """Frozen-embedding linear probe (logistic regression) and 5-NN for each model and task, fitted on
    the training maps of the task's group split and scored on its test maps; fine-tuned rows from
    ``comparison`` (an ``experiments.Comparison``) alongside. Writes ``results/<name>/probes.{csv,md}``.

    Parameters
    ----------
    encoders : Encoders
        The frozen encoders and their cached embeddings.
    tasks : sequence of str
        Tasks, as :func:`opdcells.tasks.resolve_task` reads them.
    models : sequence of str
        Model names.
    comparison : Comparison, optional
        Fine-tuned runs shown beside the probes.
    name : str
        The study's name (folder of the results, prefix of the runs).
    saved_models, results : str or Path
        Folders of model folders and of tables.
    seed : int
        Random seed of splits and probes.
    n_boot : int
        Bootstrap resamples of the confidence intervals.

    Returns
    -------
    ProbeResult
    """
    ds = encoders.ds
    rows, splits = [], {}
    for task in tasks:
        split, source = task_split(ds, task, saved_models=saved_models, name=name, models=models, seed=seed)
        splits[task] = (split, source)
        y_all, names = _task_labels(ds, task), list(resolve_task(task, ds.class_names, ds.labels).classes)
        for model in models:
            encoders.embeddings(model, calibration=split.train)
            init = encoders.infos.get(model, {}).get("init")
            for method, label in (("linear", "frozen linear probe"), ("knn", f"frozen {KNN_K}-NN")):
                pred = encoders.probe(model, y_all, split.train, split.test, method, calibration=split.train)
                rows.append({"task": task, "model": model, "method": label, "init": init,
                             **_metrics(y_all[split.test], pred, names, n_boot, seed, ds.groups[split.test]),
                             "n_train": len(split.train), "n_test": len(split.test), "split": source})
            if comparison is not None and (task, model) in comparison.runs:
                run = comparison.runs[(task, model)]
                rows.append({"task": task, "model": model, "method": "fine-tuned", "init": run.config["init"],
                             **{k: flatten_report(run.metrics)[k] for k in METRIC_COLUMNS},
                             "n_train": len(split.train), "n_test": run.metrics["n"],
                             "split": str(run.model_dir / "split.json")})
        rows += _baseline_probe_rows(ds, task, split, source, y_all, names, n_boot, seed)
    table = pd.DataFrame(rows)
    out = Path(results) / name
    csv_path, md_path = write_table(table.drop(columns="split"), out / "probes")
    files = {"table_csv": csv_path, "table_md": md_path}
    if len(table):
        bars = table.assign(bar=table["model"] + " | " + table["method"])
        files["accuracy"] = plots.accuracy_bars(bars, out / "probes_accuracy.png", bar="bar",
                                                title="Frozen probes vs fine-tuning: test accuracy (95% CI)")
    return ProbeResult(table, splits, files)


def probes_conclusion(table: pd.DataFrame) -> str:
    """:func:`opdcells.study.experiments.conclusion` of a :func:`frozen_probes` table: each encoder-and-method
    pair competes as one model ("opd_mobilenetv2 (frozen linear probe)"), the baselines as baselines.

    Parameters
    ----------
    table : pandas.DataFrame
        :attr:`ProbeResult.table`.

    Returns
    -------
    str
        Markdown.
    """
    from .experiments import conclusion

    named = table["model"].where(table["method"] == "baseline", table["model"] + " (" + table["method"] + ")")
    return conclusion(table.assign(model=named), initialisations=False)   # said once, in section 1


def label_efficiency_conclusion(summary: pd.DataFrame, task: str, *, pretrained="opd_mobilenetv2",
                                scratch="mobilenetv2", few: float = 0.1) -> str:
    """The notebook's question in one sentence: is ``pretrained`` fine-tuned on ``few`` of the labels at
    least as accurate as ``scratch`` fine-tuned on all of them (means and 95% bands of ``summary``, the
    table of :func:`label_efficiency`)? "" when the table lacks either point.

    Parameters
    ----------
    summary : pandas.DataFrame
        The summary table of :func:`label_efficiency` (per task, curve, model and fraction).
    task : str
        The task compared.
    pretrained, scratch : str
        The pretrained and the randomly initialised model.
    few : float
        The pretrained model's fraction of the labelled training maps (0-1).

    Returns
    -------
    str
        Markdown, or "".
    """
    rows = summary[(summary["task"] == task) & (summary["curve"] == "fine-tuned")]

    def point(model, fraction):
        hit = rows[(rows["model"] == _curve_label(model, "fine-tuned"))
                   & np.isclose(rows["fraction"], fraction)]
        return None if hit.empty else hit.iloc[0]

    a, b = point(pretrained, few), point(scratch, 1.0)
    if a is None or b is None:
        return ""
    if a["accuracy_ci_low"] > b["accuracy_ci_high"]:
        verdict = "more accurate than"
    elif a["accuracy_ci_high"] < b["accuracy_ci_low"]:
        verdict = "less accurate than"
    else:
        verdict = "not distinguishable (overlapping 95% bands) from"
    return (f"*{task}*: {pretrained} fine-tuned on {few:.0%} of the labels ({int(a['n_labelled'])} maps, "
            f"accuracy {a['accuracy']:.3f} [{a['accuracy_ci_low']:.3f}, {a['accuracy_ci_high']:.3f}]) is "
            f"{verdict} "
            f"{scratch} fine-tuned on all {int(b['n_labelled'])} ({b['accuracy']:.3f} "
            f"[{b['accuracy_ci_low']:.3f}, {b['accuracy_ci_high']:.3f}]).\n")


def _baseline_probe_rows(ds, task, split, source, y_all, names, n_boot, seed) -> list[dict]:
    """Rows of the baselines (``opdcells.baselines``) on the task's split, beside the probes."""
    from ..baselines import baseline_proba

    probas = baseline_proba(ds, y_all, split.train, split.test, len(names), seed=seed)
    return [{"task": task, "model": baseline, "method": "baseline", "init": "baseline",
             **_metrics(y_all[split.test], proba.argmax(axis=1), names, n_boot, seed, ds.groups[split.test]),
             "n_train": len(split.train), "n_test": len(split.test), "split": source}
            for baseline, proba in probas.items()]


# ---------------------------------------------------------------------- label efficiency


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 (hex) of the package's Python source: a training run made by other code is another run."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run_digest(config: TrainConfig, fingerprint: str, split: Split | None = None) -> str:
    """Identity of a training run: the same digest means the same training, so its result can be re-used.

    Parameters
    ----------
    config : TrainConfig
        Every setting of the run (task, weights, epochs, seed, split fields, ...).
    fingerprint : str
        ``OPDDataset.fingerprint`` of the dataset.
    split : Split, optional
        The maps the run trains on, validates on and is tested on (dataset indices, in the order
        ``train`` sees them); None when ``train`` makes the split from the config's split fields.

    Returns
    -------
    str
        SHA-256 (hex, 64 characters) of the config, the dataset fingerprint, the index lists and the
        package's source (:func:`code_digest`).
    """
    payload = {"train_config": config.to_dict(), "dataset": fingerprint, "code": code_digest()}
    if split is not None:
        payload.update({part: np.asarray(getattr(split, part), dtype=np.int64).tolist()
                        for part in ("train", "val", "test")})
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class FinetuneCache:
    """Test predictions of fine-tuning runs, one JSON file per run named by its :func:`run_digest`.

    A run whose config, dataset, split or package source differs has another digest and is trained;
    an unreadable entry is trained again and replaced (files are written atomically). Shipped encoders are
    named in the config and checked against their SHA-256 by the registry when loaded, so a changed
    encoder file is an error, not a stale hit. Delete the folder to retrain everything.

    Parameters
    ----------
    folder : path-like
        Where the entries live (the notebook run's ``saved_models/<name>_finetune_cache``).
    """

    folder: Path
    hits: int = 0
    misses: int = 0

    def __post_init__(self):
        self.folder = Path(self.folder)

    def path(self, digest: str) -> Path:
        """The entry file of ``digest``."""
        return self.folder / f"{digest[:32]}.json"

    def get(self, digest: str) -> np.ndarray | None:
        """The predicted class of every test map (int, test order) of run ``digest``, or None."""
        path = self.path(digest)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            found = entry["digest"] == digest
            predicted = np.asarray(entry["predicted"], dtype=np.int64) if found else None
        except FileNotFoundError:
            predicted = None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("fine-tune cache entry %s unreadable (%s): training again", path, exc)
            predicted = None
        self.hits += predicted is not None
        self.misses += predicted is None
        return predicted

    def put(self, digest: str, predicted, source: str) -> Path:
        """Store the test predictions of run ``digest``; ``source`` says which run made them."""
        return write_json_atomic(self.path(digest), {"digest": digest, "source": source,
                                                     "predicted": np.asarray(predicted).astype(int).tolist()})

    def add_run(self, result) -> str:
        """Store the test predictions of a finished ``train.TrainResult`` (e.g. a comparison's full-data
        run, the 100% point of a label-efficiency curve) under its digest; returns the digest."""
        config = TrainConfig.from_model_config(result.config, result.model_dir / "config.json")
        split = Split.from_json(result.model_dir / "split.json")
        digest = run_digest(config, result.config["dataset"]["fingerprint"], split)
        self.put(digest, result.evaluation.proba.argmax(axis=1), str(result.model_dir))
        return digest


def finetune_config(model: str, task: str, *, profile="quick", epochs=None, input_size=None, seed=0,
                    batch_size=None, dinov2_preset=None, weights=None) -> TrainConfig:
    """The :class:`TrainConfig` :func:`finetune_subset` trains with (profile defaults, given overrides; the
    deep model alone, without late fusion: a label-efficiency curve measures the encoder).

    Parameters
    ----------
    model : str
        Model name.
    task : str
        Task, as :func:`opdcells.tasks.resolve_task` reads it.
    profile : str
        Training profile giving the defaults.
    epochs : int, optional
        Training epochs.
    input_size : int, optional
        Encoder input side (px).
    seed : int
        Random seed.
    batch_size : int, optional
        Maps per training step.
    dinov2_preset : str, optional
        KerasHub preset of ``dinov2``.
    weights : str, optional
        Initial weights ("opd", a folder); default "none" (random).

    Returns
    -------
    TrainConfig
    """
    kw = {"dinov2_preset": dinov2_preset} if model == "dinov2" and dinov2_preset else None
    return TrainConfig.from_profile(model, profile, epochs=epochs, input_size=input_size, seed=seed,
                                    batch_size=batch_size, weights=weights or "none", model_kw=kw, task=task,
                                    fusion="none" if model != "features" else None)


def finetune_subset(ds, model: str, task: str, split: Split, train_indices, *,
                    cache: FinetuneCache | None = None, **settings) -> np.ndarray:
    """Fine-tune ``model`` with :func:`opdcells.train.train` on ``train_indices`` (a subset of
    ``split.train``) and the split's own validation maps; return its predictions on ``split.test``.

    The model folder is temporary; with ``cache`` a run already made (same :func:`run_digest`) is not
    trained again, and a new one is stored.

    Parameters
    ----------
    ds : Dataset
        The opened dataset.
    model : str
        Model name.
    task : str
        Task, as :func:`opdcells.tasks.resolve_task` reads it.
    split : Split
        The task's group split.
    train_indices : array_like of int
        The labelled training maps (dataset indices within ``split.train``).
    cache : FinetuneCache, optional
        Predictions of runs already made.
    **settings
        Those of :func:`finetune_config`.

    Returns
    -------
    (n_test,) int ndarray
        Predicted class (task class index) of each test map.
    """
    from ..train import labelled_subset, train

    config = finetune_config(model, task, **settings)
    subset = labelled_subset(split, train_indices, ds.groups)
    digest = run_digest(config, ds.fingerprint, subset)
    cached = cache.get(digest) if cache is not None else None
    if cached is not None:
        log.info("%s on %s (%d labelled maps): re-using the identical run %s", model, task, len(subset.train),
                 digest[:12])
        return cached
    with tempfile.TemporaryDirectory(prefix="opdcells-finetune-") as tmp:
        result = train(ds, model, task, Path(tmp) / f"{model}_{task_slug(task)}", config=config, split=split,
                       train_indices=train_indices, n_boot=0, calibrate=False, ood=False)
    predicted = result.evaluation.proba.argmax(axis=1)   # rows of split.test, in order
    if cache is not None:
        cache.put(digest, predicted, f"finetune_subset({model}, {task}, {len(subset.train)} maps)")
    return predicted


def _curve_label(model: str, curve: str) -> str:
    return f"{model} ({curve})"


def label_efficiency(encoders: Encoders, tasks, models, *, fractions, seeds, splits=None, finetune=(),
                     finetune_tasks=None, finetune_fractions=None, finetune_kw=None, name="opd_dinov2",
                     saved_models="saved_models", results="results", seed=0, comparison=None,
                     finetune_seeds=None) -> tuple[pd.DataFrame, dict]:
    """Test accuracy vs fraction of labelled training maps for each model and task.

    For every fraction and seed the labelled maps are ``splits.subsample_labelled(split.train, y,
    fraction, seed)`` (nested across fractions); the test maps are the split's test groups. Curves:
    ``frozen linear probe`` (the probe of :func:`frozen_probes`) on each encoder's embeddings (computed
    once; BN of random-init CNNs recalibrated on all training maps -- no labels used) and on the
    standardised morphology features for ``features``, and ``fine-tuned`` for models in ``finetune``
    trained by :func:`finetune_subset` from each encoder's initialisation (``encoders.weights_of``).
    A fine-tuning run identical to one made before (:func:`run_digest`: same config, dataset, split and
    labelled maps) is not repeated: at 100% of the labels every seed draws the same maps, and that run is
    ``comparison``'s full-data run when its settings match. The predictions are kept in
    ``saved_models/<name>_finetune_cache/`` (:class:`FinetuneCache`), so a second demo re-uses them too.
    Writes ``results/<name>/label_efficiency.{csv,md,png}``.

    Parameters
    ----------
    encoders : Encoders
        The frozen encoders.
    tasks : sequence of str
        Tasks of the probe curves.
    models : sequence of str
        Model names.
    fractions : sequence of float
        Fractions of the labelled training maps (0-1].
    seeds : sequence of int
        Seeds of the labelled subsets.
    splits : dict, optional
        Task -> (Split, source) already chosen (:attr:`ProbeResult.splits`); others by :func:`task_split`.
    finetune : sequence of str
        Models also fine-tuned.
    finetune_tasks : sequence of str, optional
        Tasks fine-tuned on (default: all ``tasks``).
    finetune_fractions : sequence of float, optional
        Fractions fine-tuned at (default: ``fractions``).
    finetune_kw : dict, optional
        :func:`finetune_config` settings (epochs, input_size, profile, ...).
    name : str
        The study's name.
    saved_models, results : str or Path
        Folders of model folders (and the cache) and of tables and figures.
    seed : int
        Random seed of the splits.
    comparison : Comparison, optional
        Its full-data runs seed the cache.
    finetune_seeds : sequence of int, optional
        Seeds of the fine-tuned subsets (default ``seeds``).

    Returns
    -------
    tuple of (pandas.DataFrame, dict)
        One row per run (task, model, curve, fraction, seed, accuracy, balanced accuracy), and name ->
        Path of the tables and the figure.
    """
    ds = encoders.ds
    splits = dict(splits or {})
    cache = FinetuneCache(Path(saved_models) / f"{name}_finetune_cache")
    for result in (comparison.runs.values() if comparison is not None and finetune else ()):
        if result.config.get("model") != FEATURES:
            cache.add_run(result)
    finetune_tasks = list(tasks if finetune_tasks is None else finetune_tasks)
    rows = []
    for task in tasks:
        split = splits[task][0] if task in splits else task_split(ds, task, saved_models=saved_models,
                                                                  name=name, models=models, seed=seed)[0]
        y_all = _task_labels(ds, task)
        test_y = y_all[split.test]
        curves = [(m, "frozen linear probe") for m in models]
        curves += [(m, "fine-tuned") for m in finetune if task in finetune_tasks and m != FEATURES]
        for model, curve in curves:
            for s in (finetune_seeds if curve == "fine-tuned" and finetune_seeds is not None else seeds):
                tuned = curve == "fine-tuned" and finetune_fractions is not None
                for fraction in sorted(finetune_fractions if tuned else fractions):
                    sub = subsample_labelled(split.train, y_all, fraction, seed=s)
                    if curve == "fine-tuned":
                        kw = {"weights": encoders.weights_of(model), "dinov2_preset": encoders.dinov2_preset,
                              **(finetune_kw or {})}
                        pred = finetune_subset(ds, model, task, split, sub, seed=seed, cache=cache, **kw)
                    elif len(np.unique(y_all[sub])) < 2:
                        pred = np.full(len(test_y), y_all[sub][0])
                    else:   # the same maps (100% for every seed) are probed once
                        pred = encoders.probe(model, y_all, sub, split.test, calibration=split.train)
                    rows.append({"task": task, "model": _curve_label(model, curve), "encoder": model,
                                 "curve": curve, "fraction": float(fraction), "seed": int(s),
                                 "n_labelled": len(sub), "n_test": len(test_y),
                                 "accuracy": float(np.mean(pred == test_y)),
                                 "balanced_accuracy": _balanced(test_y, pred)})
            log.info("label efficiency: %s %s on %s done", model, curve, task)
    if cache.hits or cache.misses:
        log.info("label efficiency: %d fine-tuning runs trained, %d identical ones re-used (%s)",
                 cache.misses, cache.hits, cache.folder)
    table = pd.DataFrame(rows)
    out = Path(results) / name
    csv_path, md_path = write_table(_summary(table), out / "label_efficiency")
    table.to_csv(out / "label_efficiency_runs.csv", index=False)
    files = {"table_csv": csv_path, "table_md": md_path, "runs_csv": out / "label_efficiency_runs.csv",
             "figure": plots.label_efficiency(
                 table, out / "label_efficiency.png",
                 title="Label efficiency on unseen groups: linear probes on frozen embeddings / features"
                       + (" and fine-tuned models" if finetune else "")
                       + " (mean; 95% band over seeds and test maps)")}
    return table, files


def _balanced(y_true, pred) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(y_true, pred))


def _summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% band per (task, model, fraction): over seeds and the test sample, as the figure draws
    it (:func:`opdcells.plots.mean_band`), so a point where every seed draws the same maps has a width."""
    if table.empty:
        return table
    keys = ["task", "model", "curve"]
    parts = []
    for (task, model, curve), rows in table.groupby(keys, sort=False):
        mean, low, high = plots.mean_band(rows, "fraction", "accuracy")
        g = rows.groupby("fraction")
        parts.append(pd.DataFrame({
            "task": task, "model": model, "curve": curve, "fraction": mean.index,
            "n_labelled": g["n_labelled"].mean().round().astype(int).to_numpy(),
            "seeds": g["seed"].nunique().to_numpy(), "accuracy": mean.to_numpy(),
            "balanced_accuracy": g["balanced_accuracy"].mean().to_numpy(),
            "accuracy_ci_low": low.to_numpy(), "accuracy_ci_high": high.to_numpy()}))
    return pd.concat(parts, ignore_index=True)


# ---------------------------------------------------------------------- looking inside


def example_indices(ds, indices, per_class: int = 2, seed: int = 0) -> np.ndarray:
    """``per_class`` maps of every class among ``indices`` (dataset class labels).

    Parameters
    ----------
    ds : Dataset
        The opened dataset.
    indices : array_like of int
        Dataset indices to choose from.
    per_class : int
        Maps a class (fewer when a class has fewer).
    seed : int
        Random seed.

    Returns
    -------
    int64 ndarray
        The chosen indices, sorted within each class, classes in order.
    """
    rng = np.random.default_rng(seed)
    indices = np.asarray(indices)
    labels = ds.labels[indices]
    picks = [rng.choice(indices[labels == k], min(per_class, int((labels == k).sum())), replace=False)
             for k in range(len(ds.class_names))]
    return np.concatenate([np.sort(p) for p in picks if len(p)]).astype(np.int64)


def embedding_view(encoders: Encoders, model: str, indices, path, *, method="pca", calibration=None,
                   real: dict | None = None, seed=0, title=None) -> Path:
    """2-D embedding (PCA or t-SNE, fitted jointly) of the dataset maps ``indices`` by ``model``'s frozen
    encoder, coloured by class; ``real`` = {name: maps (M, S, S)} drawn on top (embedded the same way).

    Parameters
    ----------
    encoders : Encoders
        The frozen encoders.
    model : str
        Model name.
    indices : array_like of int
        Dataset maps shown.
    path : str or Path
        The figure (PNG).
    method : {"pca", "tsne"}
        The 2-D projection.
    calibration : array_like of int, optional
        Training maps for BatchNormalization recalibration of a random-init encoder.
    real : dict, optional
        Name -> (M, S, S) OPD maps (nm) of real cells, preprocessed like the dataset.
    seed : int
        Random seed of t-SNE.
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        The figure.
    """
    from ..explain import embed, embedding_2d

    ds = encoders.ds
    indices = np.asarray(indices, dtype=np.int64)
    emb = encoders.embeddings(model, calibration=calibration)[indices]
    extra_emb, extra = [], []
    if real:
        encoder, _ = encoders.encoder(model)
        extra_emb = [embed(encoder, maps, encoders.batch_size, tta=encoders.tta)
                     for maps in real.values() if len(maps)]
    joint = embedding_2d(np.concatenate([emb, *extra_emb]), method=method, seed=seed)
    start = len(emb)
    names = [n for n, maps in (real or {}).items() if len(maps)]
    for name, block, marker in zip(names, extra_emb, ("x", "+", "^", "s"), strict=False):
        extra.append((joint[start:start + len(block)], name, marker))
        start += len(block)
    init = encoders.infos[model]["init"]
    axis = {"pca": "PCA", "tsne": "t-SNE"}.get(method, method)
    return plots.embedding_scatter(joint[:len(emb)], ds.labels[indices], [str(c) for c in ds.class_names],
                                   path, extra=extra, axis=axis,
                                   title=title or f"{model} frozen embedding ({init}), {method.upper()}")


#: What each kind of heatmap shows, for the figure titles.
HEATMAP_MEANING = {
    "Grad-CAM": "Grad-CAM, bright where the predicted class score's gradient-weighted features are large",
    "CLS attention": "last-layer CLS attention, bright where the class token attends",
}


def explain_examples(ds, runs: dict, indices, out_dir, *, min_grid=4) -> dict[str, Path]:
    """Grad-CAM (CNNs) or last-layer CLS attention (DINOv2) of fine-tuned models on the maps ``indices``.

    One overlay grid per model is written to ``out_dir/<model>_explain.png``. Titles give the true class,
    the model's prediction and the share of the heat on the cell (:func:`opdcells.explain.heat_in_cell`);
    the figure title says what the heatmap shows and the median share against the cell's area (what heat
    spread evenly would give).

    Parameters
    ----------
    ds : Dataset
        The opened dataset.
    runs : dict
        Model name -> ``train.SavedModel`` (Keras; other models are skipped).
    indices : array_like of int
        Dataset maps explained.
    out_dir : str or Path
        Folder of the figures.
    min_grid : int
        Fewest maps a grid is drawn with.

    Returns
    -------
    dict of str to Path
        Model name -> figure.
    """
    from ..explain import dino_attention, grad_cam, heat_in_cell

    out_dir = Path(out_dir)
    maps = ds.read(np.asarray(indices, dtype=np.int64))
    names = [str(c) for c in ds.class_names]
    files = {}
    for model, saved in runs.items():
        deep = getattr(saved.learner, "deep", saved.learner)   # a fused model's deep part
        keras_model = getattr(deep, "model", None)
        if keras_model is None:
            continue
        proba = saved.predict_proba(maps)
        if saved.config["model"] == "dinov2":
            heat, what = dino_attention(keras_model, maps), "CLS attention"
        else:
            heat, what = grad_cam(keras_model, maps, proba.argmax(axis=1), min_grid=min_grid), "Grad-CAM"
        inside, area = heat_in_cell(heat, maps, ds.pixel_size_um)
        titles = [f"{names[ds.labels[i]]} -> {saved.class_names[p]}\n{share:.0%} of heat on cell"
                  for i, p, share in zip(indices, proba.argmax(axis=1), inside, strict=True)]
        title = (f"{model} ({saved.config['task']}, init {saved.config['init']}): {HEATMAP_MEANING[what]}\n"
                 f"median {np.nanmedian(inside):.0%} of the heat on the cell, which covers "
                 f"{np.median(area):.0%} of the map (the share heat spread evenly would have)")
        files[model] = plots.overlay_grid(list(maps), list(heat), titles, out_dir / f"{model}_explain.png",
                                          ncols=min(len(maps), 10), title=title)
        log.info("%s %s: median %.0f%% of the heat on the cell (cell area %.0f%%)", model, what,
                 100 * np.nanmedian(inside), 100 * np.median(area))
    return files


def real_cell_predictions(runs: dict, real: dict) -> pd.DataFrame:
    """How fine-tuned models classify real cells of classes they never saw, and how many maps their
    out-of-distribution detector (``opdcells.ood``, fitted at training) flags as unlike the training data.

    Parameters
    ----------
    runs : dict
        Model name -> ``train.SavedModel``.
    real : dict
        Name -> maps (M, S, S) in nm at the models' pixel size (:func:`load_real_cells`).

    Returns
    -------
    pandas.DataFrame
        One row per model and real set: ``maps``, ``predicted`` ("SW480 12, PBMC 2"), ``mean_confidence``
        (mean top probability), ``flagged_ood`` (maps flagged; NaN for a model without a detector).
    """
    from ..ood import load_detector, model_inputs

    rows = []
    for model, saved in runs.items():
        detector = load_detector(saved)
        for cells, maps in real.items():
            if not len(maps):
                continue
            proba = saved.predict_proba(maps)
            counts = pd.Series(np.asarray(saved.class_names)[proba.argmax(axis=1)]).value_counts()
            flagged = np.nan
            if detector is not None:
                scores = detector.score(model_inputs(saved.learner, maps, saved.config["pixel_size_um"]))
                flagged = int(np.sum(detector.flag(scores)))
            rows.append({"model": model, "cells": cells, "maps": len(maps),
                         "predicted": ", ".join(f"{name} {n}" for name, n in counts.items()),
                         "mean_confidence": float(proba.max(axis=1).mean()), "flagged_ood": flagged})
    return pd.DataFrame(rows)


def real_cells_conclusion(table: pd.DataFrame) -> str:
    """One Markdown sentence per row of :func:`real_cell_predictions`: what the model called the real cells
    and how many it flagged as out of distribution.

    Parameters
    ----------
    table : pandas.DataFrame
        :func:`real_cell_predictions`'s table.

    Returns
    -------
    str
        A Markdown list, or "" for an empty table.
    """
    lines = []
    for _, row in table.iterrows():
        flagged = ("it has no out-of-distribution detector" if pd.isna(row["flagged_ood"]) else
                   f"**{int(row['flagged_ood'])} of {row['maps']}** flagged out of distribution")
        lines.append(f"{row['model']} calls the {row['maps']} {row['cells']} maps {row['predicted']} "
                     f"(mean top probability {row['mean_confidence']:.2f}); {flagged}.")
    return "\n".join(f"* {line}" for line in lines) + "\n" if lines else ""


# ---------------------------------------------------------------------- real cells


#: Estimated by the segmentation work (tests/test_segment.py): RBC diameter 20.5 px for ~7.8 um.
RBC_PIXEL_SIZE_UM = 0.38
RBC_WAVELENGTH_NM = 532.0


def load_real_cells(real_qpi, config, *, hl60_every: int = 10, rbc_files=("gt_phase1.mat",),
                    rbc_pixel_size_um: float = RBC_PIXEL_SIZE_UM) -> dict[str, np.ndarray]:
    """Real measured cells preprocessed like the dataset (``ingest.iter_processed``, ``config``).

    ``HL60 (real)``: every ``hl60_every``-th map of the qpimage series (one HL60 leukaemia cell seen from
    140 angles; radians, metadata in the file). ``RBC (real)``: red blood cells segmented from the fields
    ``rbc_files`` (radians, 532 nm, ``rbc_pixel_size_um`` estimated).

    Parameters
    ----------
    real_qpi : str or Path
        The real-data folder (``shared/real_qpi``).
    config : PreprocessConfig
        Preprocessing of the dataset (:func:`preprocess_config_of`).
    hl60_every : int
        Keep every n-th map of the HL60 series.
    rbc_files : sequence of str
        Field-of-view files of red blood cells.
    rbc_pixel_size_um : float
        Their pixel size (um), ``RBC_PIXEL_SIZE_UM`` = 0.38 estimated from the segmentation (RBC diameter
        20.5 px for ~7.8 um).

    Returns
    -------
    dict of str to ndarray
        Name -> (M, S, S) OPD maps (nm); an empty dict when ``real_qpi`` is missing.
    """
    from ..ingest import IngestOptions, iter_processed

    root = Path(real_qpi)
    if not root.is_dir():
        log.warning("real QPI folder %s not found: no real cells", root)
        return {}
    out = {}
    series = root / "hl60_qlsi_series" / "series.h5"
    if series.is_file():
        maps = [p.opd for i, p, _ in iter_processed(series, IngestOptions(config=config))
                if i % hl60_every == 0]
        out["HL60 (real)"] = np.stack(maps).astype(np.float32)
    rbc_opts = IngestOptions(units="rad", wavelength_nm=RBC_WAVELENGTH_NM, pixel_size_um=rbc_pixel_size_um,
                             fields=True, config=config)
    rbc = [p.opd for f in rbc_files if (root / "rbc_phase_fields" / f).is_file()
           for _, p, _ in iter_processed(root / "rbc_phase_fields" / f, rbc_opts)]
    if rbc:
        out["RBC (real)"] = np.stack(rbc).astype(np.float32)
    log.info("real cells: %s", {k: len(v) for k, v in out.items()})
    return out
