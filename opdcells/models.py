"""Keras models for OPD maps, all built by one path: an OPD encoder plus a softmax head.

Encoder (:func:`build_encoder`), input ``(S, S, 1)`` float32 OPD in nm at the dataset pixel size:

1. :class:`OPDScale` divides by ``norm_scale_nm`` -- a fixed, serialised layer, so a saved ``.keras``
   file carries its own normalisation and prediction cannot apply a different one;
2. with ``crop_px``, ``keras.layers.CenterCrop`` (named ``crop``) to the central ``crop_px`` pixels at the
   map's own pixel size; then ``keras.layers.Resizing`` to ``input_size`` (bilinear with antialiasing, i.e.
   area-weighted when shrinking; the identity when the sizes agree);
3. the OPD channel repeated to 3 channels: ImageNet filters were learnt on RGB, and feeding the same
   image to all three colour inputs is what they see for a grey image, so pretrained filters keep their
   meaning; for random initialisation the repeat is harmless (the first layer can learn any mix);
4. the backbone -- ``keras.applications`` MobileNetV2 / ResNet50 / VGG16 (``include_top=False``) or
   ``keras_hub`` DINOV2Backbone -- and pooling (global average of the last feature map; the CLS token,
   DINOv2's pooled output, for DINOv2) to an embedding vector.

:func:`build_model` adds dropout and a Dense softmax head; with ``physical_quantities`` the head also
sees rotation-invariant physical quantities of the map measured in-graph (:class:`PhysicalQuantities`:
dry mass, projected area, mean / peak / spread of OPD, radius of gyration, radial-profile rings),
standardised by a Normalization layer adapted on the training maps (:func:`adapt_quantities`); the
layer named ``encoder`` then outputs the CNN embedding concatenated with them, so it stays the exact
input of the ``classifier`` layer (what screening's OOD detector and ``explain.embed`` read).

Every BatchNormalization layer gets momentum ``bn_momentum`` (default 0.9): with Keras' 0.99/0.999 the
moving statistics never settle when training from scratch on a few thousand maps, and evaluation-mode
accuracy stays at chance while training accuracy climbs (measured in tests/test_models.py).

Weights (``weights=``, resolved by ``opdcells.registry.resolve_weights``): ``"random"`` (or "none"),
``"imagenet"`` (keras.applications' own cache/download mechanism; if that fails the model is random and
says so, loudly, in the log and in ``info["init"]``), ``"opd"`` (the registry's OPD-pretrained encoder of
the family; a family without one is an error naming the missing registry entry), ``"opd:NAME"`` (a
registry entry), or a path to encoder weights -- a ``.weights.h5`` file or a folder written by
:func:`save_encoder`. A missing or corrupt pretrained file is an error, never a random start.
``opd_mobilenetv2`` is an alias of ``mobilenetv2`` with ``weights="opd"`` (``config.resolve_alias``).
DINOv2 presets come through ``dinov2_preset``.

Input scaling (``info["input_scaling"]``): ImageNet-initialised backbones get the input their family was
trained with (:class:`ImageNetInput` after step 3: ``OPD / norm_scale_nm`` read as a 0-1 grey level, then
MobileNetV2's [-1, 1], ResNet50's and VGG16's caffe-style BGR minus the channel means); random and
OPD-pretrained encoders see ``OPD / norm_scale_nm`` itself (``"opd"``; a saved encoder records its own).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import keras
import keras_hub  # imported eagerly: registers DINOV2Backbone for keras.saving.load_model
import numpy as np

from . import __version__, registry
from .config import ALIASES, FAMILIES, IMAGENET, PHYSICAL_QUANTITIES, resolve_alias
from .errors import ConfigError
from .features import ALPHA_ML_PER_G, OUTLINE_FRACTION

log = logging.getLogger(__name__)

#: Names build_encoder takes: the backbone families and their aliases (``config.ALIASES``).
ARCHITECTURES = (*FAMILIES, *ALIASES)
DEFAULT_NORM_SCALE_NM = 100.0
DEFAULT_ALPHA = 0.35  # MobileNetV2 width for CPU training; 1.0 is the full network
IMAGENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)  # MobileNetV2 widths with ImageNet weights
IMAGENET_SIZES = (96, 128, 160, 192, 224)  # MobileNetV2 sizes with their own ImageNet weights
# CPU-sized DINOv2 (ViT-S/14 has 12 layers, hidden 384, 6 heads): ~1.9 M parameters at 56 px.
DINOV2_CPU_CONFIG = {
    "patch_size": 14,
    "num_layers": 4,
    "hidden_dim": 192,
    "num_heads": 3,
    "intermediate_dim": 768,
    "use_mask_token": False,  # masked-image pretraining only; unused weights otherwise
}
ENCODER_WEIGHTS = registry.ENCODER_WEIGHTS
ENCODER_CONFIG = registry.ENCODER_CONFIG
ENCODER_FORMAT = "opdcells-encoder"
_ENCODER_CONFIG_KEYS = (
    "architecture", "input_shape", "input_size", "alpha", "norm_scale_nm", "bn_momentum",
    "embedding_dim", "dinov2_config", "init", "weights_source", "input_scaling",
)

#: Input convention of each family's ImageNet weights (``mode`` of keras.applications' ``preprocess_input``
#: for that family): "tf" maps 0-255 pixels to [-1, 1] (MobileNetV2); "caffe" reorders RGB to BGR and
#: subtracts the ImageNet channel means (103.939, 116.779, 123.68) of 0-255 pixels (ResNet50, VGG16).
IMAGENET_INPUT = {"mobilenetv2": "tf", "resnet50": "caffe", "vgg16": "caffe"}
#: ``input_scaling`` of encoders that are not ImageNet-initialised: the backbone sees ``OPD / norm_scale_nm``.
OPD_INPUT = "opd"

_APPLICATIONS = {
    "mobilenetv2": keras.applications.MobileNetV2,
    "resnet50": keras.applications.ResNet50,
    "vgg16": keras.applications.VGG16,
}


@keras.saving.register_keras_serializable(package="opdcells")
class OPDScale(keras.layers.Layer):
    """Fixed normalisation of OPD maps: ``x / scale_nm`` (no weights; the scale is in the config)."""

    def __init__(self, scale_nm: float = DEFAULT_NORM_SCALE_NM, **kwargs):
        """Fix the scale.

        Parameters
        ----------
        scale_nm : float
            OPD (nm) that maps to 1.
        **kwargs
            Arguments of ``keras.layers.Layer``.

        Raises
        ------
        ValueError
            When ``scale_nm`` is not positive.
        """
        super().__init__(**kwargs)
        if not scale_nm > 0:
            raise ValueError(f"norm_scale_nm must be positive, got {scale_nm}")
        self.scale_nm = float(scale_nm)

    def call(self, x):
        return keras.ops.divide(keras.ops.cast(x, self.compute_dtype), self.scale_nm)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scale_nm": self.scale_nm}


#: Radial-profile rings of :class:`PhysicalQuantities` (equal widths out to the equivalent radius), as
#: ``opdcells.features.RADIAL_BINS``.
QUANTITY_RINGS = 4
#: Floor (nm) of the cell outline of :class:`PhysicalQuantities`: a map whose peak is noise finds no cell.
QUANTITY_MIN_THRESHOLD_NM = 5.0


@keras.saving.register_keras_serializable(package="opdcells")
class PhysicalQuantities(keras.layers.Layer):
    """Rotation-invariant physical quantities of each OPD map, measured in-graph (no weights).

    The cell is every pixel above ``outline_fraction`` of the map's peak OPD (at least ``min_threshold_nm``)
    -- the outline of :mod:`opdcells.features`, without its connected-component step. Sums over the cell
    do not change under rotations and reflections of the pixel grid, nor do distances to its mass centre,
    so every quantity is invariant to the dihedral group of the map:

    * ``dry_mass_pg``: sum of OPD x pixel area / ``alpha_ml_per_g`` (pg; OPD in um, area in um^2 and
      alpha in mL/g = um^3/pg); alpha is the specific refraction increment, 0.19 mL/g as
      ``opdcells.features.ALPHA_ML_PER_G`` (Barer 1952, Nature 169:366; Zangle & Teitell 2014, Nat.
      Methods 11:1221);
    * ``area_um2``: projected area (um^2); ``phase_volume_um3``: sum of OPD x pixel area (um^3, dry mass x
      alpha: collinear with the dry mass, so not in the default set);
    * ``opd_mean_nm``, ``opd_max_nm``, ``opd_std_nm``: mean, peak and standard deviation of OPD over the
      cell (nm);
    * ``gyration_radius_um``: OPD-weighted radius of gyration about the mass centre (um);
    * ``ring_0`` .. ``ring_3``: mean OPD in :data:`QUANTITY_RINGS` rings of equal width out to the
      equivalent radius, relative to the cell's mean OPD (as ``features``' ``radial_ring_*``).

    Parameters
    ----------
    pixel_size_um : float
        Pixel size (um) of the maps the layer takes (the dataset's, before any resizing).
    quantities : sequence of str
        Names of :data:`opdcells.config.PHYSICAL_QUANTITIES`, in the output's column order.
    outline_fraction : float
        Fraction of the peak OPD that outlines the cell (``opdcells.features.OUTLINE_FRACTION``).
    min_threshold_nm : float
        Lowest outline threshold (nm).
    alpha_ml_per_g : float
        Specific refraction increment (mL/g).
    **kwargs
        Arguments of ``keras.layers.Layer``.

    Raises
    ------
    ValueError
        For an unknown quantity, none asked for, or a non-positive pixel size or alpha.

    Notes
    -----
    Input ``(N, S, S, 1)`` OPD (nm); output ``(N, Q)`` float32, one column per name of ``quantities``.
    """

    def __init__(self, pixel_size_um: float = 0.25, quantities=PHYSICAL_QUANTITIES,
                 outline_fraction: float = OUTLINE_FRACTION,
                 min_threshold_nm: float = QUANTITY_MIN_THRESHOLD_NM,
                 alpha_ml_per_g: float = ALPHA_ML_PER_G, **kwargs):
        super().__init__(**kwargs)
        unknown = sorted(set(quantities) - set(PHYSICAL_QUANTITIES))
        if unknown or not quantities:
            raise ValueError(f"physical quantities must be some of {', '.join(PHYSICAL_QUANTITIES)}, "
                             f"not {unknown or 'none'}")
        if not (pixel_size_um > 0 and alpha_ml_per_g > 0):
            raise ValueError("pixel_size_um and alpha_ml_per_g must be positive")
        self.pixel_size_um = float(pixel_size_um)
        self.quantities = [str(q) for q in quantities]
        self.outline_fraction = float(outline_fraction)
        self.min_threshold_nm = float(min_threshold_nm)
        self.alpha_ml_per_g = float(alpha_ml_per_g)

    def call(self, x):
        ops = keras.ops
        opd = ops.cast(x[..., 0], "float32")                                      # (N, H, W) nm
        peak = ops.max(opd, axis=(1, 2), keepdims=True)
        mask = ops.cast(opd > ops.maximum(self.outline_fraction * peak, self.min_threshold_nm), "float32")
        pixels = ops.maximum(ops.sum(mask, axis=(1, 2)), 1.0)
        total = ops.sum(opd * mask, axis=(1, 2))                                  # nm x pixels
        mean = total / pixels
        spread = ops.sqrt(ops.sum(mask * ops.square(opd - mean[:, None, None]), axis=(1, 2)) / pixels)
        weight = mask * ops.maximum(opd, 0.0)
        r2, radius = self._radii(weight, ops.shape(opd)[1], ops.shape(opd)[2])    # px^2, px
        mass = ops.maximum(ops.sum(weight, axis=(1, 2)), 1e-6)
        gyration = ops.sqrt(ops.sum(weight * r2, axis=(1, 2)) / mass)
        pixel_area = self.pixel_size_um ** 2
        values = {
            "dry_mass_pg": total * 1e-3 * pixel_area / self.alpha_ml_per_g,
            "area_um2": ops.sum(mask, axis=(1, 2)) * pixel_area,
            "phase_volume_um3": total * 1e-3 * pixel_area,
            "opd_mean_nm": mean, "opd_max_nm": peak[:, 0, 0], "opd_std_nm": spread,
            "gyration_radius_um": gyration * self.pixel_size_um,
            **self._rings(opd, mask, ops.sqrt(r2) / radius[:, None, None], mean),
        }
        return ops.stack([values[name] for name in self.quantities], axis=-1)

    @staticmethod
    def _radii(weight, height, width):
        """Squared distance (px^2) of every pixel to the OPD-weighted mass centre, and the equivalent
        radius sqrt(area / pi) (px)."""
        ops = keras.ops
        rows = ops.cast(ops.arange(height), "float32")[None, :, None]
        cols = ops.cast(ops.arange(width), "float32")[None, None, :]
        mass = ops.maximum(ops.sum(weight, axis=(1, 2)), 1e-6)
        centre_r = ops.sum(weight * rows, axis=(1, 2)) / mass
        centre_c = ops.sum(weight * cols, axis=(1, 2)) / mass
        r2 = ops.square(rows - centre_r[:, None, None]) + ops.square(cols - centre_c[:, None, None])
        area = ops.sum(ops.cast(weight > 0, "float32"), axis=(1, 2))
        return r2, ops.maximum(ops.sqrt(area / 3.141592653589793), 1.0)

    @staticmethod
    def _rings(opd, mask, relative_radius, mean):
        """Mean OPD in each ring of relative radius [k/R, (k+1)/R) (the last one open), over ``mean``."""
        ops = keras.ops
        ring = ops.minimum(ops.floor(relative_radius * QUANTITY_RINGS), QUANTITY_RINGS - 1)
        rings = {}
        for k in range(QUANTITY_RINGS):
            inside = mask * ops.cast(ops.equal(ring, float(k)), "float32")
            ring_mean = ops.sum(opd * inside, axis=(1, 2)) / ops.maximum(ops.sum(inside, axis=(1, 2)), 1.0)
            rings[f"ring_{k}"] = ring_mean / ops.maximum(mean, 1e-6)
        return rings

    def compute_output_shape(self, input_shape):
        return (input_shape[0], len(self.quantities))

    def get_config(self):
        return {**super().get_config(), "pixel_size_um": self.pixel_size_um, "quantities": self.quantities,
                "outline_fraction": self.outline_fraction, "min_threshold_nm": self.min_threshold_nm,
                "alpha_ml_per_g": self.alpha_ml_per_g}


@keras.saving.register_keras_serializable(package="opdcells")
class ImageNetInput(keras.layers.Layer):
    """Grey OPD maps to the input an ImageNet-trained backbone was trained with (no weights).

    The input is ``OPD / norm_scale_nm`` repeated to 3 channels; with the default ``norm_scale_nm`` (the
    99th percentile of |OPD| over cell pixels) a cell spans about 0-1, read as a grey level 0-255 of a
    photograph. ``keras.applications.imagenet_utils.preprocess_input(255 x, mode)`` then applies the
    family's own convention (:data:`IMAGENET_INPUT`).

    Parameters
    ----------
    mode : {"tf", "caffe"}
        "tf": ``2 x - 1`` ([-1, 1], MobileNetV2); "caffe": ``255 x`` in BGR order minus the ImageNet
        channel means (ResNet50, VGG16).
    """

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("tf", "caffe"):
            raise ValueError(f"ImageNet input mode must be 'tf' or 'caffe', not {mode!r}")
        self.mode = mode

    def call(self, x):
        grey = keras.ops.multiply(keras.ops.cast(x, self.compute_dtype), 255.0)
        return keras.applications.imagenet_utils.preprocess_input(grey, data_format="channels_last",
                                                                  mode=self.mode)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="opdcells")
class ClassToken(keras.layers.Layer):
    """First token of a transformer sequence ``(B, T, D) -> (B, D)``: the CLS embedding."""

    def call(self, x):
        return x[:, 0, :]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


def _family(name: str) -> str:
    """Backbone family of an architecture name (``opd_mobilenetv2`` is a MobileNetV2)."""
    return resolve_alias(name)[0]


def _same(a, b) -> bool:
    """Config values equal, lists and tuples alike."""
    return list(a) == list(b) if isinstance(a, list | tuple) and isinstance(b, list | tuple) else a == b


def _settle_with_saved(name, alpha, dinov2_config, input_size, norm_scale_nm, saved, source):
    """Fill unset arguments from a saved encoder config; ValueError where they contradict it."""
    arch = saved.get("architecture")
    if arch not in ARCHITECTURES or _family(arch) != _family(name):
        raise ValueError(f"{source}: encoder weights are for architecture {arch!r}, not {name!r}")
    if alpha is None:
        alpha = saved.get("alpha")
    elif saved.get("alpha") is not None and float(alpha) != float(saved["alpha"]):
        raise ValueError(f"{source}: encoder weights have alpha {saved['alpha']}, requested {alpha}")
    saved_dinov2 = saved.get("dinov2_config") or {}
    asked = dinov2_config or {}
    conflicts = {k: v for k, v in asked.items() if k in saved_dinov2 and not _same(v, saved_dinov2[k])}
    if conflicts:
        raise ValueError(f"{source}: encoder weights have DINOv2 config {saved_dinov2}, not {conflicts}")
    dinov2_config = {**saved_dinov2, **(dinov2_config or {})} or None
    for key, value in (("input_size", input_size), ("norm_scale_nm", norm_scale_nm)):
        if saved.get(key) is not None and float(saved[key]) != float(value):
            log.warning("%s: encoder pretrained with %s=%s, built with %s", source, key, saved[key], value)
    return alpha, dinov2_config


def _dinov2_config(config: dict | None) -> dict:
    """DINOv2 constructor arguments: DINOV2_CPU_CONFIG updated by ``config`` (image shape excluded)."""
    merged = {**DINOV2_CPU_CONFIG, **(config or {})}
    for key in ("image_shape", "name", "dtype", "trainable"):
        merged.pop(key, None)
    if "position_embedding_shape" in merged:
        merged["position_embedding_shape"] = tuple(merged["position_embedding_shape"])
    return merged


def _patch_size_multiple(input_size: int, patch: int) -> int:
    """``input_size`` rounded to the nearest multiple of the patch size (at least one patch)."""
    rounded = max(patch, int(round(input_size / patch)) * patch)
    if rounded != input_size:
        log.info("DINOv2 uses %d-pixel patches: input_size %d rounded to %d", patch, input_size, rounded)
    return rounded


def _loud_random(what: str, err: BaseException) -> None:
    log.warning(
        "!!! %s could not be loaded (%s: %s). THE MODEL IS RANDOMLY INITIALISED (init='random') !!!",
        what,
        type(err).__name__,
        str(err).splitlines()[0][:300] if str(err) else "",
    )


def _imagenet_file(family: str, alpha: float, size: int) -> str:
    """Name of the no-top ImageNet weights file keras.applications uses (for the record only)."""
    if family == "mobilenetv2":
        rows = size if size in IMAGENET_SIZES else 224
        return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"
    return f"{family}_weights_tf_dim_ordering_tf_kernels_notop.h5"


def imagenet_weights_file(family: str, alpha: float = 1.0, input_size: int = 224) -> Path:
    """The file keras.applications reads a CNN's no-top ImageNet weights from (and downloads them to).

    Parameters
    ----------
    family : str
        mobilenetv2, resnet50 or vgg16.
    alpha : float
        MobileNetV2's width (ignored for the others).
    input_size : int
        Input side in px: MobileNetV2 has files for 96-224 px (others read the 224 px file).

    Returns
    -------
    Path
        ``$KERAS_HOME/models/<keras.applications' file name>`` (``KERAS_HOME`` defaults to ``~/.keras``);
        whether it exists says whether a machine without internet can start from ImageNet.
    """
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    return cache / _imagenet_file(family, alpha, input_size)


def _application_backbone(family: str, size: int, alpha: float, imagenet: bool) -> tuple[Any, dict]:
    """keras.applications backbone (no top, no pooling) and its init record."""
    kwargs = {"input_shape": (size, size, 3), "include_top": False, "weights": None, "name": "backbone"}
    if family == "mobilenetv2":
        kwargs["alpha"] = alpha
    if not imagenet:
        return _APPLICATIONS[family](**kwargs), {"init": "random", "weights_source": None}
    if family == "mobilenetv2" and alpha not in IMAGENET_ALPHAS:
        raise ValueError(f"MobileNetV2 ImageNet weights exist for alpha in {IMAGENET_ALPHAS}, not {alpha}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backbone = _APPLICATIONS[family](**{**kwargs, "weights": "imagenet"})
    except Exception as err:  # offline, no cached file, hash mismatch, corrupt file
        _loud_random(f"ImageNet weights for {family}", err)
        return _APPLICATIONS[family](**kwargs), {"init": "random", "weights_source": None}
    notes = [str(w.message) for w in caught if "Weights for input shape" in str(w.message)]
    for note in notes:
        log.info("%s ImageNet weights at input_size %d: %s", family, size, note)
    file = imagenet_weights_file(family, alpha, size)
    source = str(file) if file.is_file() else f"keras.applications:{file.name}"
    return backbone, {"init": "imagenet", "weights_source": source, "weights_note": "; ".join(notes) or None}


def _dinov2_backbone(size: int, preset: str | None, config: dict) -> tuple[Any, dict]:
    """keras_hub DINOV2Backbone from ``preset`` (if given and loadable) or random with ``config``."""
    shape = (size, size, 3)
    if preset:
        try:
            backbone = keras_hub.models.DINOV2Backbone.from_preset(preset, image_shape=shape, name="backbone")
            return backbone, {"init": f"dinov2-preset:{preset}", "weights_source": str(preset)}
        except Exception as err:  # offline, unknown preset, unreadable folder
            _loud_random(f"DINOv2 preset {preset!r}", err)
    config = {"position_embedding_shape": shape, **config}
    backbone = keras_hub.models.DINOV2Backbone(**config, image_shape=shape, name="backbone")
    return backbone, {"init": "random", "weights_source": None}


def _freeze_position_embeddings(backbone) -> None:
    """Keep DINOv2's position embeddings fixed so a saved model predicts exactly as before saving.

    keras_hub 0.32 ``DINOV2Embedding.save_own_variables`` detects trained position embeddings by a
    signed sum of differences (> epsilon) and otherwise saves the untrained ones; when it does detect
    them it resamples them through ``position_embedding_shape`` (518 px for presets). Either way a
    reloaded fine-tuned model predicted differently (max |dp| 6e-4 measured). Fixed (random or
    pretrained) position embeddings still encode position and round-trip exactly.
    """
    backbone.embeddings.interpolated_position_embeddings.trainable = False


def _dinov2_record(backbone) -> dict:
    cfg = backbone.get_config()
    keys = (*DINOV2_CPU_CONFIG, "position_embedding_shape", "num_register_tokens", "use_swiglu_ffn",
            "layer_scale_init_value")
    return {k: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k] for k in keys if k in cfg}


def _all_layers(model) -> list:
    """Layers of ``model``, descending into nested models."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(_all_layers(layer))
    return found


def batch_norm_layers(model) -> list:
    """Every BatchNormalization layer of ``model``, nested models included.

    Parameters
    ----------
    model : keras.Model

    Returns
    -------
    list of keras.layers.BatchNormalization
    """
    return [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]


def set_bn_momentum(model, momentum: float) -> int:
    """Set every BatchNormalization layer's momentum (nested models included); returns how many.

    Parameters
    ----------
    model : keras.Model
    momentum : float
        Momentum of the moving mean and variance (0-1).

    Returns
    -------
    int
        The number of BatchNormalization layers set.
    """
    layers = batch_norm_layers(model)
    for layer in layers:
        layer.momentum = float(momentum)
    return len(layers)


def saved_encoder_config(name: str, weights) -> dict | None:
    """The ``config.json`` of the encoder folder ``build_encoder(name, weights=weights)`` would load
    (``opd_mobilenetv2`` and "opd" included), or None (random, ImageNet, a bare weights file).

    Parameters
    ----------
    name : str
        Model name (a family or an alias).
    weights : str or os.PathLike or None
        The weights asked for (see :func:`build_encoder`).

    Returns
    -------
    dict or None

    Raises
    ------
    RegistryError
        For an unusable pretrained encoder (not registered, missing or corrupt file).
    ConfigError
        For an unknown model, or an alias given contradicting weights.
    """
    family, weights = resolve_alias(name, weights)
    return registry.resolve_weights(family, weights).config


def _load_encoder_weights(encoder, file: Path, name: str) -> None:
    """Load encoder weights from ``file``; ValueError naming the file if they do not fit exactly."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            encoder.load_weights(file)
    except Exception as err:
        raise ValueError(f"{file}: weights do not fit a {name} encoder ({str(err).splitlines()[0]})") from err
    skipped = [str(w.message) for w in caught if any(k in str(w.message) for k in ("Skipping", "could not"))]
    if skipped:
        raise ValueError(f"{file}: weights do not fit a {name} encoder ({skipped[0].splitlines()[0]})")


def _resolve_weights(name: str, weights, alpha, dinov2_config, input_size: int, norm_scale_nm: float):
    """``(registry.ResolvedWeights, alpha, dinov2_config)``, the latter filled from a saved encoder config."""
    family, weights = resolve_alias(name, weights)
    if weights == IMAGENET and family == "dinov2":
        raise ValueError("dinov2 has no ImageNet weights: use dinov2_preset or weights='opd'")
    resolved = registry.resolve_weights(family, weights)
    if resolved.config is not None:
        alpha, dinov2_config = _settle_with_saved(
            name, alpha, dinov2_config, input_size, norm_scale_nm, resolved.config, resolved.file.parent
        )
    return resolved, alpha, dinov2_config


def _input_scaling(family: str, kind: str, saved: dict | None) -> str:
    """What the backbone's input is: the ImageNet convention of the family for ImageNet weights
    (:data:`IMAGENET_INPUT`), a saved encoder's own (older encoders: ``OPD / norm_scale_nm``), else
    :data:`OPD_INPUT`."""
    if kind == "imagenet":
        return IMAGENET_INPUT[family]
    return (saved or {}).get("input_scaling") or OPD_INPUT


def _backbone(family: str, input_size: int, alpha, imagenet: bool, dinov2_preset, dinov2_config):
    """``(backbone, pooling layer, input size used, init record)`` for one backbone family."""
    if family != "dinov2":
        backbone, record = _application_backbone(family, input_size, alpha, imagenet)
        return backbone, keras.layers.GlobalAveragePooling2D(name="pool"), input_size, record
    config = _dinov2_config(dinov2_config)
    input_size = _patch_size_multiple(input_size, int(config["patch_size"]))
    backbone, record = _dinov2_backbone(input_size, dinov2_preset, config)
    if input_size % backbone.patch_size:
        raise ValueError(f"input_size {input_size} is not a multiple of DINOv2 patch {backbone.patch_size}")
    _freeze_position_embeddings(backbone)
    return backbone, ClassToken(name="pool"), input_size, record


def _crop_side(crop_px: int | None, input_shape) -> int | None:
    """The centre crop's side (px), None for the whole map; a crop larger than the maps is an error."""
    side = min(int(input_shape[0]), int(input_shape[1]))
    if not crop_px or int(crop_px) == side:
        return None
    if not 0 < int(crop_px) < side:
        raise ConfigError("<arguments>", f"crop_px {crop_px} does not fit the {input_shape[0]} x "
                                          f"{input_shape[1]} px maps (give at most {side}, or 0 for no crop)")
    return int(crop_px)


def build_encoder(
    name: str,
    *,
    input_shape: tuple[int, int, int] = (128, 128, 1),
    input_size: int = 64,
    crop_px: int | None = None,
    weights: str | os.PathLike | None = "random",
    norm_scale_nm: float = DEFAULT_NORM_SCALE_NM,
    bn_momentum: float = 0.9,
    alpha: float | None = None,
    seed: int = 0,
    dinov2_preset: str | None = None,
    dinov2_config: dict | None = None,
) -> tuple[keras.Model, dict]:
    """OPD encoder ``(S, S, 1)`` nm -> embedding vector, and a JSON-ready record of how it was built.

    ``weights``: "random", "imagenet" (CNNs only), "opd" (the registry's OPD-pretrained encoder of the
    family), "opd:NAME" (a registry entry), or encoder weights (a ``.weights.h5`` file or a
    :func:`save_encoder` folder, whose config fills ``alpha``/``dinov2_config`` when unset); see
    ``registry.resolve_weights``. ``opd_mobilenetv2`` is ``mobilenetv2`` with "opd". DINOv2 with both a
    loadable ``dinov2_preset`` and weights uses the preset; if the preset cannot be loaded, the weights.
    ``alpha`` is MobileNetV2's width
    (default 0.35). DINOv2: ``input_size`` is rounded to a multiple of the patch size (logged);
    ``dinov2_config`` overrides :data:`DINOV2_CPU_CONFIG`; ``dinov2_preset`` is a keras_hub preset name
    or folder. ``seed`` seeds Keras' global RNGs (``keras.utils.set_random_seed``) before building.

    Parameters
    ----------
    name : str
        A backbone family or alias (:data:`ARCHITECTURES`).
    input_shape : tuple of int
        (S, S, 1) of the OPD maps the encoder takes (px).
    input_size : int
        Side (px) the maps are resized to for the backbone.
    crop_px : int, optional
        Side (px) of the centre crop taken before the resize, at the maps' own pixel size (None or 0,
        or the maps' side: the whole map).
    weights : str or os.PathLike or None
        Initial weights (see above).
    norm_scale_nm : float
        OPD (nm) the maps are divided by (:class:`OPDScale`).
    bn_momentum : float
        Momentum of every BatchNormalization layer.
    alpha : float, optional
        MobileNetV2 width multiplier.
    seed : int
        Random seed of the initial weights.
    dinov2_preset : str, optional
        keras_hub preset name or folder.
    dinov2_config : dict, optional
        DINOv2 architecture overrides.

    Returns
    -------
    tuple of (keras.Model, dict)
        The encoder ((N, S, S, 1) nm -> (N, D)) and its record (architecture, init, weights source,
        input size px, ``norm_scale_nm``, embedding dimension, parameters, ...).

    Raises
    ------
    ConfigError
        For an unknown model, an alias given contradicting weights, or a crop larger than the maps.
    RegistryError
        For an unusable pretrained encoder (a missing or corrupt file is never a random start).
    ValueError
        For weights that do not fit the architecture, ImageNet weights for DINOv2, or an input size
        that DINOv2 cannot take.
    """
    family = _family(name)
    crop = _crop_side(crop_px, input_shape)
    resolved, alpha, dinov2_config = _resolve_weights(
        name, weights, alpha, dinov2_config, input_size, norm_scale_nm
    )
    kind, weights_file = resolved.kind, resolved.file
    alpha = float(alpha if alpha is not None else DEFAULT_ALPHA) if family == "mobilenetv2" else None
    keras.utils.set_random_seed(seed)
    backbone, pool, size, record = _backbone(
        family, int(input_size), alpha, kind == "imagenet", dinov2_preset, dinov2_config
    )

    inputs = keras.Input(shape=tuple(input_shape), name="opd_nm")
    x = OPDScale(norm_scale_nm, name="opd_scale")(inputs)
    if crop:
        x = keras.layers.CenterCrop(crop, crop, name="crop")(x)
    x = keras.layers.Resizing(size, size, interpolation="bilinear", antialias=True, name="resize")(x)
    x = keras.layers.Concatenate(axis=-1, name="opd_to_rgb")([x, x, x])
    scaling = _input_scaling(family, kind, resolved.config)
    if scaling != OPD_INPUT:
        x = ImageNetInput(scaling, name="imagenet_input")(x)
    features = backbone({"images": x} if family == "dinov2" else x)
    encoder = keras.Model(inputs, pool(features), name="encoder")
    n_bn = set_bn_momentum(encoder, bn_momentum)
    if weights_file is not None and record["init"].startswith("dinov2-preset"):
        log.info("DINOv2 preset %s loaded: the weights %s are not used", dinov2_preset, weights_file)
    elif weights_file is not None:
        _load_encoder_weights(encoder, weights_file, name)
        record = {"init": resolved.init, "weights_source": str(weights_file)}

    info = {
        "architecture": family,
        "weights_note": None,
        **record,
        "input_shape": [int(v) for v in input_shape],
        "input_size": size,
        "input_size_requested": int(input_size),
        "crop_px": crop,
        "norm_scale_nm": float(norm_scale_nm),
        "input_scaling": scaling,
        "bn_momentum": float(bn_momentum) if n_bn else None,
        "alpha": alpha,
        "embedding_dim": int(encoder.output_shape[-1]),
        "dinov2_config": _dinov2_record(backbone) if family == "dinov2" else None,
        "dinov2_preset": dinov2_preset if family == "dinov2" else None,
        "seed": seed,
        "encoder_params": count_params(encoder),
    }
    log.info("built encoder: %s", describe(info))
    return encoder, info


def build_model(
    name: str, n_classes: int, *, dropout: float = 0.2, physical_quantities=(),
    pixel_size_um: float | None = None, **encoder_kwargs
) -> tuple[keras.Model, dict]:
    """Classifier: :func:`build_encoder` (same keyword arguments) + dropout + Dense softmax head.

    With ``physical_quantities`` the layer named ``encoder`` is the CNN encoder (then named
    ``map_encoder``) with :class:`PhysicalQuantities` of the input, standardised by the Normalization layer
    ``quantities_norm``, concatenated to its embedding (:func:`with_quantities`); adapt that layer on the
    training maps (:func:`adapt_quantities`) before training.

    Parameters
    ----------
    name : str
        A backbone family or alias.
    n_classes : int
        Classes of the softmax head (at least 2).
    dropout : float
        Dropout rate before the head.
    physical_quantities : sequence of str
        Names of ``config.PHYSICAL_QUANTITIES`` the head also sees (empty: the CNN embedding only).
    pixel_size_um : float, optional
        Pixel size (um) of the input maps; required with ``physical_quantities``.
    **encoder_kwargs
        Arguments of :func:`build_encoder`.

    Returns
    -------
    tuple of (keras.Model, dict)
        The classifier ((N, S, S, 1) OPD in nm -> (N, n_classes) probabilities; its encoder is the layer
        ``encoder``, its head ``classifier``) and the encoder's record with ``n_classes``, ``dropout``,
        ``physical_quantities`` and ``params``.

    Raises
    ------
    ValueError
        When ``n_classes`` is under 2, quantities are asked for without ``pixel_size_um`` or are unknown,
        or as :func:`build_encoder`.
    """
    if n_classes < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    encoder, info = build_encoder(name, **encoder_kwargs)
    quantities = [str(q) for q in physical_quantities or ()]
    if quantities:
        if pixel_size_um is None:
            raise ValueError("physical quantities need the pixel size of the maps (pixel_size_um)")
        encoder = with_quantities(encoder, quantities, pixel_size_um)
        info.update(embedding_dim=int(encoder.output_shape[-1]), pixel_size_um=float(pixel_size_um))
    inputs = keras.Input(shape=encoder.input_shape[1:], name="opd_nm")
    x = keras.layers.Dropout(dropout, seed=info["seed"], name="dropout")(encoder(inputs))
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="classifier")(x)
    model = keras.Model(inputs, outputs, name=f"opdcells_{name}")
    info.update(n_classes=int(n_classes), dropout=float(dropout), physical_quantities=quantities,
                params=count_params(model))
    return model, info


def with_quantities(encoder: keras.Model, quantities, pixel_size_um: float) -> keras.Model:
    """The encoder ``encoder`` (renamed ``map_encoder``) whose embedding is concatenated with standardised
    :class:`PhysicalQuantities` of its input.

    Parameters
    ----------
    encoder : keras.Model
        A :func:`build_encoder` encoder ((N, S, S, 1) nm -> (N, D)).
    quantities : sequence of str
        Names of ``config.PHYSICAL_QUANTITIES``.
    pixel_size_um : float
        Pixel size (um) of the input maps.

    Returns
    -------
    keras.Model
        ``encoder``: (N, S, S, 1) nm -> (N, D + Q); the Normalization layer ``quantities_norm`` is the
        identity until adapted (:func:`adapt_quantities`).
    """
    encoder.name = "map_encoder"
    inputs = keras.Input(shape=encoder.input_shape[1:], name="opd_nm")
    measured = PhysicalQuantities(pixel_size_um, quantities, name="physical_quantities")(inputs)
    standardised = keras.layers.Normalization(axis=-1, name="quantities_norm")(measured)
    joined = keras.layers.Concatenate(name="embedding_and_quantities")([encoder(inputs), standardised])
    return keras.Model(inputs, joined, name="encoder")


def quantity_layers(model: keras.Model) -> tuple[PhysicalQuantities, keras.layers.Normalization] | None:
    """The :class:`PhysicalQuantities` layer of ``model`` and its Normalization (nested models included),
    or None for a model without them.

    Parameters
    ----------
    model : keras.Model

    Returns
    -------
    tuple or None
    """
    layers = {layer.name: layer for layer in _all_layers(model)}
    if not isinstance(layers.get("physical_quantities"), PhysicalQuantities):
        return None
    return layers["physical_quantities"], layers["quantities_norm"]


def adapt_quantities(model: keras.Model, maps) -> np.ndarray | None:
    """Standardise the physical quantities of ``model`` on ``maps``: adapt ``quantities_norm`` to their
    mean and variance. Nothing for a model without quantities.

    Parameters
    ----------
    model : keras.Model
        A :func:`build_model` classifier (or its encoder).
    maps : iterable of array_like (B, S, S, 1)
        Batches of training maps (nm), e.g. a ``tf.data.Dataset`` of maps without augmentation.

    Returns
    -------
    (N, Q) ndarray or None
        The quantities measured on ``maps`` (None without quantities).

    Raises
    ------
    ValueError
        When ``maps`` holds no map.
    """
    layers = quantity_layers(model)
    if layers is None:
        return None
    measure, norm = layers
    blocks = [keras.ops.convert_to_numpy(measure(batch[0] if isinstance(batch, tuple) else batch))
              for batch in maps]
    if not blocks:
        raise ValueError("no training maps to standardise the physical quantities on")
    values = np.concatenate(blocks)
    norm.adapt(values)
    log.info("physical quantities standardised on %d maps: %s", len(values), ", ".join(
        f"{name} {m:.3g}" for name, m in zip(measure.quantities, values.mean(axis=0), strict=True)))
    return values


def save_encoder(encoder: keras.Model, info: dict, folder: str | os.PathLike) -> Path:
    """Write ``folder/encoder.weights.h5`` and ``folder/config.json`` (loadable as ``weights=folder``).

    Parameters
    ----------
    encoder : keras.Model
        The encoder.
    info : dict
        Its record from :func:`build_encoder`.
    folder : str or os.PathLike
        The folder (created).

    Returns
    -------
    Path
        ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder.save_weights(folder / ENCODER_WEIGHTS)
    config = {
        "format": ENCODER_FORMAT,
        "format_version": 1,
        **{k: info.get(k) for k in _ENCODER_CONFIG_KEYS},
        "opdcells_version": __version__,
        "keras_version": keras.__version__,
    }
    (folder / ENCODER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    log.info("saved encoder weights to %s", folder)
    return folder


def count_params(model: keras.Model) -> int:
    """Number of parameters (trainable and not).

    Parameters
    ----------
    model : keras.Model

    Returns
    -------
    int
    """
    return int(model.count_params())


def describe(info: dict) -> str:
    """One line summary of a build record from :func:`build_encoder` / :func:`build_model`.

    Parameters
    ----------
    info : dict
        The record.

    Returns
    -------
    str
    """
    arch = info["architecture"] + (f" (alpha {info['alpha']})" if info.get("alpha") else "")
    source = f" from {info['weights_source']}" if info.get("weights_source") else ""
    params = info.get("params", info.get("encoder_params"))
    head = f", {info['n_classes']} classes" if "n_classes" in info else ""
    crop = f" (of a {info['crop_px']} px centre crop)" if info.get("crop_px") else ""
    if info.get("physical_quantities"):
        head += f"; the head sees {len(info['physical_quantities'])} physical quantities (" + ", ".join(
            info["physical_quantities"][:3]) + (", ..." if len(info["physical_quantities"]) > 3 else "") + ")"
    return (
        f"{arch}, init {info['init']}{source}; input {info['input_size']} px{crop}, "
        f"OPD / {info['norm_scale_nm']:g} nm, embedding {info['embedding_dim']}{head}, {params:,} parameters"
    )
