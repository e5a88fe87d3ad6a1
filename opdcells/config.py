"""One documented training configuration: :class:`TrainConfig`, saved in every model folder's config.json.

As StarDist's ``Config2D`` and CSBDeep's ``Config``: every hyperparameter of a training run is a field
of one dataclass with its unit in the docstring; :meth:`TrainConfig.from_profile` fills it from a
profile (:data:`PROFILES`) and explicit overrides, :meth:`TrainConfig.to_json` /
:meth:`TrainConfig.from_json` write and read it back (validated: an unknown key or a wrong type is a
:class:`~opdcells.errors.ConfigError` naming the file). ``train``, ``crossval``, the CLI (whose option help
is the field's docstring entry, :func:`field_help`) and the notebooks all go through it.

A model folder's ``config.json`` holds it under ``"train_config"``; the other keys are the run's facts
(versions, dataset fingerprint, split digest, history summary, the initialisation the model really had).
Model folders of format 3 and older (no ``"train_config"``) are read back by
:meth:`TrainConfig.from_model_config`.

This module imports neither TensorFlow nor Keras (``--help`` and reading a config stay fast).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

FEATURES = "features"
#: Backbone families of ``opdcells.models`` (deep models); ``features`` is the scikit-learn baseline.
FAMILIES = ("mobilenetv2", "resnet50", "vgg16", "dinov2")
#: ``weights`` values that are no file: random initialisation, keras.applications' ImageNet weights, the
#: registry's default OPD-pretrained encoder of the family (``"opd:NAME"`` names another entry).
RANDOM, IMAGENET, OPD = "random", "imagenet", "opd"
#: Model names that are a family with preset weights; resolved only by :func:`resolve_alias`:
#: ``opd_<family>`` (``opd_mobilenetv2``, the name users know) and ``imagenet_<cnn>`` (DINOv2 has no
#: keras.applications weights). They name the runs of a comparison of initialisations per backbone.
ALIASES = {**{f"opd_{f}": (f, OPD) for f in FAMILIES},
           **{f"imagenet_{f}": (f, IMAGENET) for f in FAMILIES if f != "dinov2"}}
#: Every name ``--model`` accepts.
MODEL_NAMES = (*FAMILIES, *ALIASES, FEATURES)
LR_SCHEDULES = ("constant", "cosine")
#: ``optimizer`` settings: keras.optimizers.Adam, or AdamW (decoupled weight decay; opdcells.recipe).
OPTIMIZERS = ("adam", "adamw")
#: What a saved train_config without the recipe's fields (written before them) was trained with.
PRE_RECIPE = {"optimizer": "adam", "weight_decay": 0.0, "warmup_epochs": 0, "label_smoothing": 0.0}
#: Physical quantities the deep models' head can see (``opdcells.models.PhysicalQuantities``; units in
#: the names, ``ring_*`` relative to the cell's mean OPD).
PHYSICAL_QUANTITIES = ("dry_mass_pg", "area_um2", "phase_volume_um3", "opd_mean_nm", "opd_max_nm",
                       "opd_std_nm", "gyration_radius_um", "ring_0", "ring_1", "ring_2", "ring_3")
#: The quantities of ``physical_quantities=True``: all but the phase volume (dry mass x alpha).
DEFAULT_PHYSICAL_QUANTITIES = tuple(q for q in PHYSICAL_QUANTITIES if q != "phase_volume_um3")
#: ``fusion`` settings: the deep model alone, or late fusion with the features model
#: (``learners._FusedLearner``).
FUSIONS = ("none", FEATURES)
#: Weights of the deep part tried for a fused model on the validation groups (never 0: the features model
#: alone is a model of its own, ``--model features``); ties go to the weight nearest 0.5.
FUSION_DEEP_WEIGHTS = (0.25, 0.5, 0.75)
#: ``split_by`` settings: whole acquisition groups in each part, or single maps (``splits.map_split``).
SPLIT_BY = ("group", "map")
#: ``distribute`` settings (:mod:`opdcells.distribute`).
DISTRIBUTE = ("none", "auto", "mirrored", "multiworker")
#: Fields whose default comes from the profile (and a pretrained encoder), not from the dataclass.
PROFILE_FIELDS = ("alpha", "input_size", "epochs", "patience", "batch_size", "learning_rate", "head_epochs",
                  "freeze_batchnorm", "tta", "optimizer", "weight_decay", "lr_schedule", "warmup_epochs",
                  "label_smoothing", "fusion")
CLASS_WEIGHTINGS = ("balanced", "none")

#: Head-only epochs before fine-tuning an OPD-pretrained encoder (linear probe, then fine-tune).
PRETRAINED_HEAD_EPOCHS = 2
#: Adam learning rate for fine-tuning an OPD-pretrained encoder, chosen by the validation loss of the demo's
#: five-class split (shipped encoder, 6 epochs, seeds 0 and 1): 1e-4 gave 0.274, 5e-5 0.250, 3e-5 0.275;
#: 1e-3 overwrote the pretrained features (test accuracy 0.70 against the frozen probe's 0.88).
PRETRAINED_LEARNING_RATE = 5e-5
#: config["test_time_augmentation"] of models that predict with the mean class probabilities of the
#: map's 8 rotations and reflections (``pipeline.dihedral_views``); None: the map as it is.
TTA_DIHEDRAL = "dihedral-8"


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentations that a real OPD map of the same cell could show (all on maps in nm).

    Attributes
    ----------
    rotate90, flip : bool
        The dihedral group of the square map (a cell has no preferred orientation).
    max_shift_px : int
        Integer shift (circular, background wraps) of up to this many pixels per axis.
    noise_nm : float
        Additive white Gaussian noise with a per-map std drawn from [0, noise_nm] (nm).
    max_blur_sigma_px : float
        Slight defocus, a Gaussian blur with sigma drawn from [0, max_blur_sigma_px] (px).
    max_tilt_nm, max_offset_nm : float
        Residual background plane: tilt across the field and offset (nm).
    scale_jitter : float
        OPD multiplied by 1 + u, u in [-scale_jitter, scale_jitter] (session batch effects: wavelength,
        medium index, calibration).
    max_zoom : float
        Map magnified about its centre by 1 + u, u in [-max_zoom, max_zoom] (bilinear; session batch
        effects: pixel-size calibration, culture passage or donor changing cell size).
    """

    rotate90: bool = True
    flip: bool = True
    max_shift_px: int = 3
    noise_nm: float = 2.0
    max_blur_sigma_px: float = 0.7
    max_tilt_nm: float = 4.0
    max_offset_nm: float = 2.0
    scale_jitter: float = 0.05
    max_zoom: float = 0.0

    @classmethod
    def none(cls) -> AugmentConfig:
        """A configuration that changes nothing."""
        return cls(rotate90=False, flip=False, max_shift_px=0, noise_nm=0.0, max_blur_sigma_px=0.0,
                   max_tilt_nm=0.0, max_offset_nm=0.0, scale_jitter=0.0, max_zoom=0.0)

    @property
    def active(self) -> bool:
        """Whether any augmentation is on."""
        return self != AugmentConfig.none()

    def as_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Profile:
    """Default training settings of a profile (:data:`PROFILES`), read by :meth:`TrainConfig.from_profile`.

    Attributes
    ----------
    input_size, dinov2_input_size : int
        Side (px) the model resizes maps to; DINOv2's is a multiple of its 14 px patch.
    epochs, patience : int
        Maximum epochs and early-stopping patience (epochs) of the deep models.
    batch_size : int
        Maps per training step.
    learning_rate : float
        Adam learning rate of the deep models.
    mobilenet_alpha : float
        Width of the MobileNetV2 backbones.
    features_epochs, features_patience, features_learning_rate : int, int, float
        The same for ``features`` (an epoch is one boosting iteration).
    epochs_by_model, learning_rate_by_model : dict
        Per-family exceptions (heavy backbones; VGG16 without BatchNormalization).
    pretrained_epochs, pretrained_patience : int
        Epochs and patience of fine-tuning an OPD-pretrained encoder (which keeps the settings it was
        measured with, :data:`PRE_RECIPE` at a constant rate: the recipe, the physical quantities and late
        fusion did not beat them on the demo's validation groups, docs/recipe.md "The goals still missed").
    pretrained_epochs_by_model : dict
        Families whose OPD-pretrained encoder is not fine-tuned (0): the head alone is trained on the frozen
        encoder for up to ``probe_epochs`` epochs (early stopping with ``pretrained_patience``).
        ResNet50: fine-tuning all 23.5 million weights at Adam 5e-5 after the head-only epochs lowered
        validation accuracy on the demo's five-class split (0.8875 -> 0.80-0.81 with the encoder of
        pretraining epoch 5, 0.883 -> 0.67-0.80 with epoch 4; docs/recipe.md).
        VGG16: fine-tuning lowered it too (0.8925 after the head -> 0.82-0.86; docs/recipe.md "VGG16:
        shipped").
    probe_epochs : int or None
        Head-only epochs of an encoder that is not fine-tuned (None: ``pretrained_epochs``).
    tta_by_model : dict
        Families whose saved models predict each map as it is (False) instead of with the mean over its 8
        rotations and reflections (the default of a model trained with both).
    input_size_by_model : dict
        Per-family input side (px) instead of ``input_size`` (heavy backbones in the quick profile).
    fusion : str
        ``TrainConfig.fusion`` of the deep backbones trained from scratch or ImageNet weights (chosen on the
        demo's validation groups, docs/recipe.md "Late fusion").
    features_refit : bool
        ``TrainConfig.refit`` of the features model and of fused models' features parts (docs/recipe.md,
        "More sessions for the features model").
    """

    input_size: int
    dinov2_input_size: int
    epochs: int
    patience: int
    batch_size: int = 32
    learning_rate: float = 1e-3
    mobilenet_alpha: float = 0.35
    features_epochs: int = 200
    features_patience: int = 10
    features_learning_rate: float = 0.1
    epochs_by_model: dict = field(default_factory=dict)
    # VGG16 has no BatchNormalization: from scratch at Adam 1e-3 it collapses to one class (measured:
    # balanced accuracy 0.20 on five classes); 1e-4 trains.
    learning_rate_by_model: dict = field(default_factory=lambda: {"vgg16": 1e-4})
    pretrained_epochs: int = 8
    pretrained_patience: int = 3
    pretrained_epochs_by_model: dict = field(default_factory=lambda: {"resnet50": 0, "vgg16": 0})
    probe_epochs: int | None = None
    tta_by_model: dict = field(default_factory=dict)
    input_size_by_model: dict = field(default_factory=dict)
    fusion: str = FEATURES
    features_refit: bool = True


PROFILES = {
    # MobileNetV2-0.35: 20 epochs of the recipe (warm-up + cosine) gave 0.61 on the demo's validation groups
    # against 0.59 for 8 (docs/recipe.md), about 70 s on 2 idle cores. ResNet50 and VGG16 cost 7-10x a
    # MobileNetV2-0.35 epoch: the quick profile gives them 3 epochs so the demo stays within minutes
    # (their quick figures are a smoke test, not a verdict). For `make demo` within 15 minutes on 2 cores
    # (issue 12; docs/demo.md) they predict each map once: their 8-view test-time augmentation (8 passes
    # over the 400 validation and 400 test maps, 6,400 forward passes against 3 x 1,200 training steps)
    # cost about half their training. And they see 48 px instead of 64: (48/64)^2 = 0.56 of the
    # convolutions (ResNet50 31 s and VGG16 45 s an epoch of the demo's maps at 64 px on 2 idle cores).
    # Measured on the demo's test sessions: ResNet50 0.640 at 48 px with one view against 0.642 at 64 px
    # with eight, VGG16 0.615 against 0.583 (docs/demo.md).
    "quick": Profile(input_size=64, dinov2_input_size=56, epochs=20, patience=6, mobilenet_alpha=0.35,
                     features_epochs=200, epochs_by_model={"resnet50": 3, "vgg16": 3},
                     tta_by_model={"resnet50": False, "vgg16": False},
                     input_size_by_model={"resnet50": 48, "vgg16": 48},
                     # the shipped ResNet50's head on the demo split: validation loss 0.2608, 0.2590, 0.2598,
                     # 0.2603, 0.2598 in epochs 1-5 (best at 2; 5 epochs made Final_Project 120 s longer)
                     probe_epochs=3),
    "full": Profile(input_size=128, dinov2_input_size=112, epochs=40, patience=8, mobilenet_alpha=1.0,
                    learning_rate=5e-4, features_epochs=500, pretrained_epochs=40, pretrained_patience=8),
}


def resolve_alias(model: str, weights: str | None = None) -> tuple[str, str]:
    """Resolve a model alias (the one place): ``opd_mobilenetv2`` is ``mobilenetv2`` with weights "opd".

    Parameters
    ----------
    model : str
        A name of :data:`MODEL_NAMES`.
    weights : str, optional
        The weights asked for (None, "none" and "random" mean: not given).

    Returns
    -------
    (str, str)
        The family (or ``features``) and the weights (``"random"`` when not given).

    Raises
    ------
    ConfigError
        An unknown model, or an alias given weights that contradict it (ImageNet).
    """
    given = None if weights is None or str(weights).lower() in ("none", RANDOM, "") else os.fspath(weights)
    if model in ALIASES:
        family, preset = ALIASES[model]
        if given is not None and (given == IMAGENET) != (preset == IMAGENET):
            raise ConfigError("<arguments>", f"{model} is {family} with weights={preset!r}; for other "
                                              f"weights use --model {family} --weights {given}")
        return family, given or preset
    if model not in (*FAMILIES, FEATURES):
        raise ConfigError("<arguments>", f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")
    return model, given or RANDOM


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (as StarDist's ``Config2D``); saved as config.json ``train_config``.

    Attributes
    ----------
    model : str
        Backbone family (mobilenetv2, resnet50, vgg16, dinov2) or features (the morphology-feature
        baseline); opd_mobilenetv2 is accepted as mobilenetv2 with weights opd.
    weights : str
        Initial encoder weights: random, imagenet (the CNNs), opd (the registry's OPD-pretrained encoder
        of the family), opd:NAME (a registry entry) or the path of an encoder folder or weights file.
    alpha : float or None
        MobileNetV2 width multiplier (None for the other families; a pretrained encoder fixes its own).
    input_size : int or None
        Side (px) the model resizes the maps to (None for features).
    crop_px : int or None
        Side (px) of the centre crop of each map at its own pixel size, taken inside the model before the
        resize to input_size (e.g. 96 of 128 px maps at 0.25 um/px: a 24 um field at full resolution);
        None or 0: the whole map. The physical quantities are measured on the whole map.
    model_kw : dict
        Further keyword arguments of models.build_model (dinov2_preset, dinov2_config, dropout,
        bn_momentum).
    epochs : int
        Maximum epochs (boosting iterations for features); of a pretrained encoder, the fine-tuning epochs
        after ``head_epochs``, where 0 keeps the encoder frozen (a linear probe: the head alone is trained,
        with early stopping on the validation loss).
    patience : int
        Early-stopping patience (epochs) on the validation loss; the best weights are restored.
    batch_size : int
        Maps per training step.
    learning_rate : float
        Peak learning rate of the optimizer (the boosting learning rate for features).
    optimizer : str
        adamw (Adam with decoupled weight decay, biases and BatchNorm excluded) or adam.
    weight_decay : float
        AdamW's decoupled weight decay per step, as a fraction of the learning rate times the weight.
    lr_schedule : str
        constant, or cosine (linear warm-up, then cosine decay to 0 over the fine-tuning epochs).
    warmup_epochs : int
        Epochs of linear learning-rate warm-up from 0 (cosine schedule only).
    label_smoothing : float
        Weight in [0, 1) of the uniform target mixed into each map's one-hot label.
    head_epochs : int
        Epochs training only the head on the frozen encoder before fine-tuning (linear probe, then
        fine-tune).
    freeze_batchnorm : bool
        Keep the encoder's BatchNorm statistics fixed while fine-tuning.
    physical_quantities : bool or list of str
        The softmax head also sees physical quantities of each map, measured in the model
        (opdcells.models.PhysicalQuantities): dry mass (pg), projected area (um^2), mean, peak and spread of
        OPD (nm), radius of gyration (um) and radial-profile ring means (relative), standardised on the
        training maps. True: DEFAULT_PHYSICAL_QUANTITIES; a list: those names of PHYSICAL_QUANTITIES;
        False: the map only (model folders saved before this field read as False).
    fusion : str
        none: the deep model alone; features: the features model (OPD morphology + boosting, as model
        features) is trained on the same split and saved in the same folder, and the model predicts the
        weighted mean of both parts' class probabilities, the deep part's weight chosen on the validation
        groups from FUSION_DEEP_WEIGHTS (late fusion; docs/recipe.md). Deep models only; model folders saved
        before this field read as none.
    refit : bool
        The features model (``model`` features, or the features part of a fused model): once early stopping
        on the validation groups has chosen the number of boosting iterations, fit it again with that number
        on the training and validation groups together, and save that fit. Its validation figures, the
        fusion weight and the calibration use the first fit's probabilities of the validation maps (which it
        never saw). Chosen on validation sessions alone, where 15 training sessions instead of 10 gave
        +0.02-0.03; over the demo's 25 unseen sessions it gave +0.006 (features) and +0.005 (fused
        MobileNetV2) (docs/recipe.md, "More sessions for the features model"). No effect without validation
        maps or for a deep model alone; folders saved before this field read as False.
    augment : dict or None
        Augmentation of the training maps (the fields of AugmentConfig: shifts in px, noise and background
        in nm); None: none.
    tta : bool
        The saved model predicts with the mean over each map's 8 rotations and reflections.
    norm_scale_nm : float or None
        Scale (nm) the model divides OPD by; None: a pretrained encoder's own, else the 99th percentile of
        |OPD| over cell pixels of the training maps.
    class_weight : str
        balanced (classes weighted inversely to their training counts) or none.
    seed : int
        Seed of weights, augmentation and shuffling.
    split_seed : int or None
        Seed of the group split (None: seed).
    test_size, val_size : float
        Fractions of the maps (whole acquisition groups) for testing and validation.
    test_groups, val_groups : list of str or None
        Acquisition groups that form the test and validation parts (instead of the fractions).
    split_by : str
        group: whole acquisition groups in each part (the default); map: single maps, for datasets without
        groups -- session effects are then NOT tested (warned, recorded in config.json and metrics.json).
    group_pattern : str or None
        Acquisition groups from the stored source file names: a regular expression whose named group
        'group', else first group, else whole match names a map's group (for one folder per class holding
        every session's files); None: the dataset's own groups.
    task : str or None
        Task definition: a reference task, all, "A,B" or "NAME=A,B NAME=C" (None: five_class when the
        dataset has the five reference classes, else every class).
    profile : str
        Profile the defaults came from (quick or full).
    distribute : str
        Devices to train on: none (one device), mirrored (every GPU of this machine), multiworker
        (the machines or processes of the cluster in TF_CONFIG, each running the same command) or auto
        (multiworker when TF_CONFIG names a cluster, mirrored with two or more GPUs, else none); see
        opdcells.distribute.
    """

    model: str = "mobilenetv2"
    weights: str = RANDOM
    alpha: float | None = None
    input_size: int | None = 64
    crop_px: int | None = None
    model_kw: dict = field(default_factory=dict)
    epochs: int = 8
    patience: int = 3
    batch_size: int = 32
    learning_rate: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    head_epochs: int = 0
    freeze_batchnorm: bool = False
    physical_quantities: bool | list = True
    fusion: str = "none"
    refit: bool = False
    augment: dict | None = field(default_factory=lambda: AugmentConfig().as_dict())
    tta: bool = True
    norm_scale_nm: float | None = None
    class_weight: str = "balanced"
    seed: int = 0
    split_seed: int | None = None
    test_size: float = 0.2
    val_size: float = 0.15
    test_groups: list | None = None
    val_groups: list | None = None
    split_by: str = "group"
    group_pattern: str | None = None
    task: str | None = None
    profile: str = "quick"
    distribute: str = "none"

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ checks

    def validate(self, where: str | os.PathLike = "<arguments>") -> None:
        """Raise :class:`ConfigError` (naming ``where``) for a wrong type or a value out of range."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _is_instance(value, hints[f.name]):
                raise ConfigError(where, f"{f.name} must be {_type_name(hints[f.name])}, "
                                         f"not {type(value).__name__} {value!r}")
        problems = [
            (self.model not in (*FAMILIES, FEATURES), f"model {self.model!r} is not one of "
                                                      f"{', '.join((*FAMILIES, FEATURES))}"),
            (self.lr_schedule not in LR_SCHEDULES, f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}"),
            (self.optimizer not in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.weight_decay < 0 or self.warmup_epochs < 0, "weight_decay and warmup_epochs must not be "
                                                              "negative"),
            (not 0 <= self.label_smoothing < 1, "label_smoothing must lie in [0, 1)"),
            (self.class_weight not in CLASS_WEIGHTINGS,
             f"class_weight must be one of {', '.join(CLASS_WEIGHTINGS)}"),
            (self.profile not in PROFILES, f"profile must be one of {', '.join(PROFILES)}"),
            (self.fusion not in FUSIONS, f"fusion must be one of {', '.join(FUSIONS)}"),
            (self.model == FEATURES and self.fusion != "none", "fusion is for deep models (the features "
                                                               "model is one of its parts)"),
            (self.refit and self.model != FEATURES and self.fusion != FEATURES,
             "refit is for the features model (model features, or fusion features)"),
            (self.split_by not in SPLIT_BY, f"split_by must be one of {', '.join(SPLIT_BY)}"),
            (self.distribute not in DISTRIBUTE, f"distribute must be one of {', '.join(DISTRIBUTE)}"),
            (self.epochs < 1 and not (self.epochs == 0 and self.head_epochs > 0 and self.model != FEATURES),
             "epochs must be at least 1 (0 only with head_epochs: the head alone on a frozen encoder)"),
            (self.batch_size < 1, "batch_size must be at least 1"),
            (self.patience < 0 or self.head_epochs < 0, "patience and head_epochs must not be negative"),
            (not self.learning_rate > 0, "learning_rate must be positive"),
            (self.input_size is not None and self.input_size < 1, "input_size must be at least 1 px"),
            (self.crop_px is not None and self.crop_px < 0, "crop_px must not be negative (0: no crop)"),
            (self.norm_scale_nm is not None and not self.norm_scale_nm > 0, "norm_scale_nm must be positive"),
            (not (0 <= self.test_size < 1 and 0 <= self.val_size < 1),
             "test_size and val_size must lie in [0, 1)"),
        ]
        if isinstance(self.physical_quantities, list):
            unknown = sorted(set(self.physical_quantities) - set(PHYSICAL_QUANTITIES))
            problems.append((bool(unknown) or not self.physical_quantities,
                             "physical_quantities must be true, false or some of "
                             f"{', '.join(PHYSICAL_QUANTITIES)} (not {', '.join(unknown) or 'none'})"))
        if self.augment is not None:
            unknown = set(self.augment) - {f.name for f in dataclasses.fields(AugmentConfig)}
            problems.append((bool(unknown), f"augment has unknown keys {', '.join(sorted(unknown))}"))
        for bad, reason in problems:
            if bad:
                raise ConfigError(where, reason)

    # ------------------------------------------------------------------ derived

    @property
    def augment_config(self) -> AugmentConfig | None:
        """:attr:`augment` as an :class:`AugmentConfig` (None: no augmentation)."""
        return None if self.augment is None else AugmentConfig(**self.augment)

    @property
    def build_kw(self) -> dict:
        """Keyword arguments of ``models.build_model`` beyond the input shape and size: ``alpha``,
        ``crop_px`` (when set) and ``model_kw``."""
        return {**({"alpha": self.alpha} if self.alpha is not None else {}),
                **({"crop_px": self.crop_px} if self.crop_px else {}), **self.model_kw}

    @property
    def quantity_names(self) -> tuple[str, ...]:
        """The names :attr:`physical_quantities` stands for (empty when off)."""
        if self.physical_quantities is True:
            return DEFAULT_PHYSICAL_QUANTITIES
        return tuple(self.physical_quantities or ())

    @property
    def resolved_split_seed(self) -> int:
        """:attr:`split_seed`, or :attr:`seed` when not given."""
        return self.seed if self.split_seed is None else self.split_seed

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ profiles

    @classmethod
    def from_profile(cls, model: str = "mobilenetv2", profile: str = "quick", **overrides) -> TrainConfig:
        """The profile's defaults for ``model``, every override that is not None taking precedence.

        A pretrained encoder (``weights`` opd, opd:NAME or a folder; ``opd_mobilenetv2``) fixes the
        MobileNetV2 width and suggests the input size, and by default is fine-tuned after
        :data:`PRETRAINED_HEAD_EPOCHS` head-only epochs with its BatchNorm statistics frozen (they come
        from thousands of sessions, a training split has a few) at :data:`PRETRAINED_LEARNING_RATE`
        (families of the profile's ``pretrained_epochs_by_model`` at 0: the head alone, encoder frozen),
        with the optimizer it was measured with (Adam at a constant rate, :data:`PRE_RECIPE`) and the
        profile's ``pretrained_epochs``; other deep models get the recipe (the dataclass defaults:
        AdamW, warm-up + cosine, label smoothing; ``docs/recipe.md``).
        Deep models trained with rotations and flips predict with test-time augmentation unless told
        not to; ``features`` ignore orientation (no augmentation, no TTA).

        Parameters
        ----------
        model : str
            A name of :data:`MODEL_NAMES`.
        profile : str
            A key of :data:`PROFILES`.
        **overrides
            Fields of :class:`TrainConfig`; ``augment`` may also be an :class:`AugmentConfig`, False or
            None (no augmentation; None means "not given" for every other field).

        Returns
        -------
        TrainConfig

        Raises
        ------
        ConfigError
            Unknown profile, model or field, a value of the wrong type, or (via the registry)
            :class:`~opdcells.errors.RegistryError` for an unusable pretrained encoder.
        """
        if profile not in PROFILES:
            raise ConfigError("<arguments>",
                              f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"model", "profile"}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError("<arguments>", f"unknown TrainConfig field {', '.join(unknown)}")
        augment = augment_dict(overrides.pop("augment", True))
        given = {k: v for k, v in overrides.items() if v is not None}
        p = PROFILES[profile]
        model, weights = resolve_alias(model, given.pop("weights", None))
        for key in ("test_groups", "val_groups"):
            if key in given:
                given[key] = [str(g) for g in given[key]]
        if model == FEATURES:
            if given.pop("tta", None):
                log.warning("features ignore orientation: test-time augmentation would not change them; off")
            deep_only = {"alpha", "input_size", "crop_px", "head_epochs", "freeze_batchnorm", "model_kw",
                         "physical_quantities", "fusion"}
            ignored = sorted(set(given) & deep_only)
            if ignored or weights != RANDOM:   # settings shared with deep models in one call (notebooks)
                log.info("features are hand-crafted: %s ignored", ", ".join(ignored + ["weights"] * (
                    weights != RANDOM)))
            given = {k: v for k, v in given.items() if k not in ignored}
            defaults = {"epochs": p.features_epochs, "patience": p.features_patience,
                        "learning_rate": p.features_learning_rate, "batch_size": p.batch_size,
                        "refit": p.features_refit}
            return cls(model=model, profile=profile, weights=RANDOM, alpha=None, input_size=None,
                       augment=None, tta=False, physical_quantities=False, **{**defaults, **given})
        from .registry import resolve_weights  # the encoder folder's config.json (no TensorFlow)

        saved = resolve_weights(model, weights).config
        pretrained = saved is not None
        # fine-tuning epochs of a pretrained encoder; 0: the head alone (head_epochs of it)
        fine_tune = given.get("epochs", p.pretrained_epochs_by_model.get(model, p.pretrained_epochs))
        defaults = {
            "alpha": ((saved or {}).get("alpha") or p.mobilenet_alpha) if model == "mobilenetv2" else None,
            "input_size": (saved or {}).get("input_size") or (
                p.dinov2_input_size if model == "dinov2" else p.input_size_by_model.get(model, p.input_size)),
            "epochs": fine_tune if pretrained else p.epochs_by_model.get(model, p.epochs),
            "patience": p.pretrained_patience if pretrained else p.patience,
            "batch_size": p.batch_size,
            "learning_rate": PRETRAINED_LEARNING_RATE if pretrained else p.learning_rate_by_model.get(
                model, p.learning_rate),
            "head_epochs": ((PRETRAINED_HEAD_EPOCHS if fine_tune else p.probe_epochs or p.pretrained_epochs)
                            if pretrained else 0),
            "freeze_batchnorm": pretrained,
            "tta": bool(augment and augment["rotate90"] and augment["flip"]
                        and p.tta_by_model.get(model, True)),
            # OPD-pretrained encoders: quantities and fusion measured, no gain (docs/recipe.md)
            "physical_quantities": not pretrained,
            "fusion": "none" if pretrained else p.fusion,
            **({**PRE_RECIPE, "lr_schedule": "constant"} if pretrained else {}),
        }
        settings = {**defaults, **given}
        # a fused model's features part is refit as the features model is
        settings.setdefault("refit", p.features_refit and settings["fusion"] == FEATURES)
        return cls(model=model, profile=profile, weights=weights, augment=augment, **settings)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        """JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str | os.PathLike = "<dict>") -> TrainConfig:
        """The config ``to_dict`` wrote; :class:`ConfigError` naming ``where`` for unknown keys or wrong
        types."""
        if not isinstance(data, dict):
            raise ConfigError(where, f"a training config must be a JSON object, not {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(where, f"unknown training config key {', '.join(unknown)} (known: "
                                     f"{', '.join(f.name for f in dataclasses.fields(cls))})")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(where, exc.reason) from None

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the config to ``path`` atomically (a temporary sibling renamed over it)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a config written by :meth:`to_json`, or a model folder's config.json (any format).

        Raises
        ------
        ConfigError
            Unreadable file, not JSON, unknown keys or wrong types; the message names ``path``.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(path, f"cannot read the training config ({exc})") from None
        if isinstance(data, dict) and data.get("format") == "opdcells-model":
            return cls.from_model_config(data, path)
        return cls.from_dict(data, path)

    @classmethod
    def from_model_config(cls, config: dict, where: str | os.PathLike = "config.json") -> TrainConfig:
        """The training config of a model folder's config.json: its ``train_config``, or for model format
        3 and older (saved before this class) the same settings read from their old keys. Recipe fields
        a saved config lacks (:data:`PRE_RECIPE`) are what it was trained with then, not today's defaults."""
        if "train_config" in config:   # saved before the recipe's fields: trained without them
            saved = config["train_config"]
            before = {**PRE_RECIPE, "physical_quantities": False}
            return cls.from_dict({**before, **saved} if isinstance(saved, dict) else saved, where)
        training, split = config.get("training") or {}, config.get("split") or {}
        model_kw = dict(training.get("model_kw") or {})
        alpha = model_kw.pop("alpha", None)
        try:   # opd_mobilenetv2 with weights "none" was the OPD-pretrained MobileNetV2
            model, weights = resolve_alias(str(config.get("model")), config.get("weights"))
        except ConfigError as exc:
            raise ConfigError(where, exc.reason) from None
        old = {
            "model": model, "weights": weights,
            "alpha": alpha, "input_size": config.get("input_size"), "model_kw": model_kw,
            **{k: training[k] for k in ("epochs", "patience", "batch_size", "learning_rate", "seed",
                                        "head_epochs", "freeze_batchnorm", "augment") if k in training},
            "profile": training.get("profile"), **PRE_RECIPE, "physical_quantities": False,
            "tta": config.get("test_time_augmentation") == TTA_DIHEDRAL,
            "norm_scale_nm": None,
            "split_seed": split.get("seed"), "test_size": split.get("test_size"),
            "val_size": split.get("val_size"), "task": config.get("task"),
        }
        old = {k: v for k, v in old.items() if v is not None}
        if model == FEATURES:   # no geometry, no augmentation (None, where the dataclass defaults differ)
            old.update(input_size=None, augment=None)
        return cls.from_dict(old, where)


# --------------------------------------------------------------------------------------------- helpers


def augment_dict(augment) -> dict | None:
    """An ``augment`` setting as TrainConfig stores it.

    Parameters
    ----------
    augment : bool, AugmentConfig, dict or None
        True: the defaults; False or None: no augmentation; an AugmentConfig or a dict of its fields.

    Returns
    -------
    dict or None
    """
    if augment is True:
        return AugmentConfig().as_dict()
    if augment is None or augment is False:
        return None
    if isinstance(augment, AugmentConfig):
        return augment.as_dict()
    return dict(augment)


def _is_instance(value, hint) -> bool:
    """``isinstance`` for the annotations TrainConfig uses (unions, generics; an int is a float, a bool
    is no number)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, arg) for arg in typing.get_args(hint))
    hint = origin or hint
    if hint is type(None):
        return value is None
    if isinstance(value, bool) and hint in (int, float):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _type_name(hint) -> str:
    text = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return re.sub(r"\bNoneType\b", "None", text)


def field_help(name: str, cls=TrainConfig) -> str:
    """The docstring entry of field ``name`` of ``cls`` on one line (the CLI's option help).

    Parameters
    ----------
    name : str
        A field of ``cls`` (or one of several named together, ``"test_size, val_size"``).
    cls : type
        A dataclass with a numpydoc Attributes section.

    Returns
    -------
    str
        The description, or "" when the docstring has none.
    """
    doc = (cls.__doc__ or "").split("Attributes\n    ----------\n", 1)[-1]
    entries = re.split(r"\n    (?=\S)", "\n" + doc)
    for entry in entries:
        head, _, body = entry.strip().partition("\n")
        names = [n.strip() for n in head.split(":")[0].split(",")]
        if name in names:
            return " ".join(body.split())
    return ""


def field_default(name: str) -> str:
    """How the default of TrainConfig field ``name`` reads in the CLI's help.

    Parameters
    ----------
    name : str
        A field of :class:`TrainConfig`.

    Returns
    -------
    str
        ``"default X"``, the profile note for profile fields, or "" when the default is None.
    """
    if name in PROFILE_FIELDS:
        return "default: from --profile (and a pretrained encoder)"
    default = TrainConfig.__dataclass_fields__[name].default
    return "" if default is None or default is dataclasses.MISSING else f"default {default}"


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Write ``data`` as indented JSON to ``path`` through a temporary sibling (never half-written).

    Parameters
    ----------
    path : str or os.PathLike
        The file; its folder is created.
    data : object
        JSON-serialisable data.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
