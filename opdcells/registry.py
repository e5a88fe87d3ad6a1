"""Pretrained OPD encoders by name, shipped inside the package or downloaded into a cache, SHA-256 checked.

One :class:`RegisteredEncoder` entry per encoder (as CSBDeep/StarDist ``register_model`` do for their
pretrained models). An entry points at an encoder folder (``config.json`` + ``encoder.weights.h5``, as
``models.save_encoder`` writes it) that is either

* shipped inside the package (``folder="pretrained/NAME"``, listed in pyproject's package-data so a wheel
  carries it); ``sha256`` is that of its ``encoder.weights.h5``; or
* a ``.zip`` of such a folder at ``url``; ``sha256`` is that of the archive. It is downloaded once into
  :func:`cache_dir` (``$OPDCELLS_CACHE``, default ``~/.cache/opdcells``) and unpacked beside it.

:func:`encoder_folder` returns the verified folder or raises :class:`~opdcells.errors.RegistryError`
naming the entry and the file: a missing or corrupt encoder never becomes a silent random start.
``weights="opd"`` of a backbone loads its default entry (:data:`DEFAULTS`).

Adding an encoder: write it with ``python -m opdcells pretrain ... --out opdcells/pretrained/NAME``
(or zip that folder and put it on a server), then add one ``register_encoder(RegisteredEncoder(...))``
call below with :func:`file_sha256` of its weights (or archive). This module imports neither TensorFlow
nor Keras.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import RegistryError

log = logging.getLogger(__name__)

#: Folder of the shipped encoders (package data).
PACKAGE_DIR = Path(__file__).resolve().parent
#: Environment variable naming the download cache (default ``~/.cache/opdcells``).
CACHE_ENV = "OPDCELLS_CACHE"
ENCODER_WEIGHTS = "encoder.weights.h5"
ENCODER_CONFIG = "config.json"
#: Files an encoder archive may hold (anything else is refused: an archive is data, never code).
ARCHIVE_FILES = frozenset({ENCODER_CONFIG, ENCODER_WEIGHTS, "README.md", "history.csv"})
_VERIFIED = ".verified.sha256"   # written into an unpacked download: the SHA-256 of its weights


@dataclass(frozen=True)
class RegisteredEncoder:
    """One pretrained OPD encoder of the registry.

    Attributes
    ----------
    name : str
        Registry name (``weights="opd:NAME"``; also the folder name under ``opdcells/pretrained/``).
    backbone : str
        Backbone family of ``opdcells.models`` (``"mobilenetv2"``, ``"dinov2"``, ...).
    sha256 : str
        SHA-256 (hex) of ``encoder.weights.h5`` for a shipped folder, of the ``.zip`` for a URL.
    input_size : int
        Side (px) the encoder resizes its maps to.
    pixel_size_um : float
        Pixel size (um) of the OPD maps it was trained on.
    out_size : int
        Side (px) of the OPD maps it was trained on (their window is ``out_size * pixel_size_um`` um).
    trained_on : str
        What it was trained on (data, labels used or not, method).
    command : str
        The command that made it.
    commit : str
        The opdcells git commit that ran ``command``.
    folder : str, optional
        Package-relative folder of a shipped encoder (``"pretrained/NAME"``).
    url : str, optional
        Address of a ``.zip`` of the encoder folder (``https://``, ``file://``).
    """

    name: str
    backbone: str
    sha256: str
    input_size: int
    pixel_size_um: float
    out_size: int
    trained_on: str
    command: str
    commit: str
    folder: str | None = None
    url: str | None = None

    def __post_init__(self):
        if (self.folder is None) == (self.url is None):
            raise ValueError(f"registry entry {self.name}: give exactly one of folder (shipped) and url")

    @property
    def init(self) -> str:
        """What a model records as its initialisation: ``opd:NAME@SHA12``."""
        return f"opd:{self.name}@{self.sha256[:12]}"


#: name -> entry (:func:`register_encoder`).
REGISTRY: dict[str, RegisteredEncoder] = {}
#: backbone -> name of the entry ``weights="opd"`` loads.
DEFAULTS: dict[str, str] = {}


def register_encoder(entry: RegisteredEncoder, *, default: bool = False) -> RegisteredEncoder:
    """Add ``entry`` to the registry (replacing one of the same name).

    Parameters
    ----------
    entry : RegisteredEncoder
        The encoder.
    default : bool
        Make it what ``weights="opd"`` loads for ``entry.backbone``.

    Returns
    -------
    RegisteredEncoder
        ``entry``.
    """
    REGISTRY[entry.name] = entry
    if default:
        DEFAULTS[entry.backbone] = entry.name
    return entry


def get_registered_encoders(backbone: str | None = None) -> dict[str, RegisteredEncoder]:
    """The registered encoders (of ``backbone`` only, if given), by name.

    Parameters
    ----------
    backbone : str, optional
        Backbone family to list.

    Returns
    -------
    dict of str to RegisteredEncoder
    """
    return {n: e for n, e in REGISTRY.items() if backbone is None or e.backbone == backbone}


def get_entry(name: str) -> RegisteredEncoder:
    """The entry ``name``.

    Parameters
    ----------
    name : str
        A key of :data:`REGISTRY`.

    Returns
    -------
    RegisteredEncoder
        The entry.

    Raises
    ------
    RegistryError
        No such entry (the message lists the registered names).
    """
    if name not in REGISTRY:
        raise RegistryError(f"registry entry {name}", "no such pretrained encoder is registered "
                                                      f"(registered: {', '.join(REGISTRY) or 'none'})")
    return REGISTRY[name]


def default_entry(backbone: str) -> RegisteredEncoder:
    """The entry ``weights="opd"`` loads for ``backbone``.

    Parameters
    ----------
    backbone : str
        A model family (mobilenetv2, dinov2, ...).

    Returns
    -------
    RegisteredEncoder
        Its OPD-pretrained entry (:data:`DEFAULTS`).

    Raises
    ------
    RegistryError
        No OPD-pretrained encoder is registered for ``backbone``; the message names the missing entry
        (``registry.DEFAULTS[backbone]``) and the backbones that have one.
    """
    if backbone not in DEFAULTS:
        have = ", ".join(f"{b} ({n})" for b, n in DEFAULTS.items()) or "none"
        raise RegistryError(f"registry.DEFAULTS[{backbone!r}]", "no OPD-pretrained encoder is registered "
                            f"for backbone {backbone} (weights='opd' exists for: {have}); use weights="
                            "random, imagenet or an encoder folder, or register one (docs/pretraining.md)")
    return get_entry(DEFAULTS[backbone])


def cache_dir() -> Path:
    """Download cache: ``$OPDCELLS_CACHE``, default ``~/.cache/opdcells``.

    Returns
    -------
    pathlib.Path
        The folder (not created here).
    """
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "opdcells").expanduser()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB blocks.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    str
        64 hexadecimal digits.

    Raises
    ------
    RegistryError
        The file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise RegistryError(path, f"cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()


def _check_sha(path: Path, expected: str, entry: RegisteredEncoder, fix: str) -> None:
    if not path.is_file():
        raise RegistryError(path, f"missing: the file of pretrained encoder {entry.name}; {fix}")
    found = file_sha256(path)
    if found != expected:
        raise RegistryError(path, f"corrupt: SHA-256 {found[:12]}... differs from the {expected[:12]}... "
                                  f"that registry entry {entry.name} records; {fix}")


def encoder_folder(name: str) -> Path:
    """The verified encoder folder of registry entry ``name`` (downloaded first for a URL entry).

    Parameters
    ----------
    name : str
        Registry name.

    Returns
    -------
    pathlib.Path
        Folder holding ``config.json`` and ``encoder.weights.h5`` whose SHA-256 matches the entry.

    Raises
    ------
    RegistryError
        Unknown name; a missing or corrupt (SHA-256 mismatch) file; a failed download.
    """
    entry = get_entry(name)
    if entry.folder is not None:
        folder = PACKAGE_DIR / entry.folder
        fix = "reinstall opdcells (the file ships with the package)"
        _check_sha(folder / ENCODER_WEIGHTS, entry.sha256, entry, fix)
        if not (folder / ENCODER_CONFIG).is_file():
            raise RegistryError(folder / ENCODER_CONFIG,
                                f"missing: the config of pretrained encoder {name}; {fix}")
        return folder
    return _downloaded(entry)


def _downloaded(entry: RegisteredEncoder) -> Path:
    """Unpacked cache folder of a URL entry: downloaded and verified once, its weights checked each time."""
    root = cache_dir()
    archive = root / f"{entry.name}-{entry.sha256[:12]}.zip"
    folder = root / f"{entry.name}-{entry.sha256[:12]}"
    fix = f"delete {folder} and {archive} to download it again"
    if (folder / _VERIFIED).is_file():
        _check_sha(folder / ENCODER_WEIGHTS, (folder / _VERIFIED).read_text().strip(), entry, fix)
        return folder
    if not archive.is_file() or file_sha256(archive) != entry.sha256:
        _download(entry, archive)
    _unpack(entry, archive, folder)
    return folder


def _download(entry: RegisteredEncoder, archive: Path) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading pretrained encoder %s from %s", entry.name, entry.url)
    fd, tmp = tempfile.mkstemp(prefix=f".{archive.name}.", dir=archive.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(entry.url, timeout=60) as response:  # noqa: S310
            shutil.copyfileobj(response, out)
        found = file_sha256(tmp)
        if found != entry.sha256:
            raise RegistryError(entry.url, f"corrupt download: SHA-256 {found[:12]}... differs from the "
                                           f"{entry.sha256[:12]}... that registry entry {entry.name} records")
        os.replace(tmp, archive)
    except OSError as exc:
        if isinstance(exc, RegistryError):
            raise
        raise RegistryError(entry.url, f"cannot download pretrained encoder {entry.name} ({exc})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _unpack(entry: RegisteredEncoder, archive: Path, folder: Path) -> None:
    """Unpack the verified ``archive`` into ``folder`` (atomically; only :data:`ARCHIVE_FILES`)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            members = {Path(m.filename).name: m for m in zf.infolist() if not m.is_dir()}
            odd = sorted(set(members) - ARCHIVE_FILES)
            if odd or not {ENCODER_CONFIG, ENCODER_WEIGHTS} <= set(members):
                raise RegistryError(archive, f"not an encoder archive (needs {ENCODER_CONFIG} and "
                                             f"{ENCODER_WEIGHTS}; unexpected: {', '.join(odd) or 'none'})")
            for base, member in members.items():
                (tmp / base).write_bytes(zf.read(member))
        (tmp / _VERIFIED).write_text(file_sha256(tmp / ENCODER_WEIGHTS) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except zipfile.BadZipFile as exc:
        raise RegistryError(archive, f"not a zip archive ({exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def encoder_config(folder: str | os.PathLike) -> dict:
    """The ``config.json`` of an encoder folder.

    Parameters
    ----------
    folder : str or os.PathLike
        An encoder folder.

    Returns
    -------
    dict
        Its config.json.

    Raises
    ------
    RegistryError
        Unreadable or not JSON.
    """
    path = Path(folder) / ENCODER_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RegistryError(path, f"unreadable encoder config ({exc})") from None


# ------------------------------------------------------------------------------------- the entries
# One entry per encoder. The commit is that of the opdcells that ran the command (from the folder's
# config.json "git"); the command's --out named the folder's place before it moved into the package.

register_encoder(RegisteredEncoder(
    name="opd_mobilenetv2_pretrained", backbone="mobilenetv2", folder="pretrained/opd_mobilenetv2_pretrained",
    sha256="ea6cfa65cdac0c19b0f053fcd9c661fb6d21a5439dcfff775c57d54c8bbe4931",
    input_size=128, pixel_size_um=0.25, out_size=128,
    trained_on="20000 simulated OPD maps of the five classes (supervised-sim, labels used), 16 epochs "
               "in three stages (96 px 12 ep, 128 px 6 ep, 128 px 10 ep; docs/pretraining.md)",
    command="python -m opdcells pretrain --backbone mobilenetv2 --method supervised-sim --out "
            "saved_models/opd_mobilenetv2_pretrained --epochs 10 --input-size 128 --n-sim 20000 --seed 0 "
            "--batch-size 64 --lr 0.0003 --probe 500 --sim-cache data/sim_cache --sim-maps-per-session 10 "
            "--init saved_models/opd_mobilenetv2_128px_6ep",
    commit="4bdce45b7cab07fd66d0f53d9811fe0894600374"))

register_encoder(RegisteredEncoder(
    name="opd_mobilenetv2_pretrained_v2", backbone="mobilenetv2",
    folder="pretrained/opd_mobilenetv2_pretrained_v2",
    sha256="c62578eea9636a947643b5554c81c27bc2857c2bd0c30817b34b3cb4f5f954e5",
    input_size=128, pixel_size_um=0.25, out_size=128,
    trained_on="20000 simulated OPD maps of the five classes (supervised-sim, labels used): "
               "opd_mobilenetv2_pretrained continued 8 epochs at 128 px (peak rate 2e-4; 24 epochs in all)",
    command="python -m opdcells pretrain --backbone mobilenetv2 --method supervised-sim --out "
            "saved_models/opd_mobilenetv2_128px_26ep --epochs 8 --input-size 128 --n-sim 20000 --seed 0 "
            "--batch-size 64 --lr 0.0002 --probe 500 --sim-cache data/sim_cache --sim-maps-per-session 10 "
            "--init opd:opd_mobilenetv2_pretrained",
    commit="825ded06afff66f882c43e1988d4a506bf4ee6c8"))

register_encoder(RegisteredEncoder(
    name="opd_mobilenetv2_pretrained_v3", backbone="mobilenetv2",
    folder="pretrained/opd_mobilenetv2_pretrained_v3",
    sha256="e96f2a7d7c83e0afdc7e9d034ddb28af334903dc179efe1005ac2c8eec86851f",
    input_size=128, pixel_size_um=0.25, out_size=128,
    trained_on="20000 simulated OPD maps of the five classes (supervised-sim, labels used): "
               "opd_mobilenetv2_pretrained_v2 continued 8 epochs at 128 px (peak rate 2e-4; "
               "32 epochs in all)",
    command="python -m opdcells pretrain --backbone mobilenetv2 --method supervised-sim --out "
            "saved_models/opd_mobilenetv2_128px_34ep --epochs 8 --input-size 128 --n-sim 20000 --seed 0 "
            "--batch-size 64 --lr 0.0002 --probe 500 --sim-cache data/sim_cache --sim-maps-per-session 10 "
            "--init opd:opd_mobilenetv2_pretrained_v2",
    commit="a5235a40586813131497bde01115328eca2c80c1"), default=True)

register_encoder(RegisteredEncoder(
    name="opd_resnet50_pretrained", backbone="resnet50", folder="pretrained/opd_resnet50_pretrained",
    sha256="de0fd7ef9715eb359a74ad47463518870731b5115ead5dc90d55b2ab9e0117c4",
    input_size=64, pixel_size_um=0.25, out_size=128,
    trained_on="20000 simulated OPD maps of the five classes (supervised-sim, labels used), 10 epochs in "
               "three resumed chunks; weights stored as float16",
    command="python -m opdcells pretrain --backbone resnet50 --method supervised-sim --out "
            "saved_models/opd_resnet50_pretrained --epochs 10 --input-size 64 --n-sim 20000 --seed 0 "
            "--batch-size 64 --lr 0.0003 --probe 500 --sim-cache data/sim_cache --sim-maps-per-session 10",
    commit="4ce0f0b6147c984a6464f713426c6d141d67f7ba"), default=True)

register_encoder(RegisteredEncoder(
    name="opd_dinov2_pretrained", backbone="dinov2", folder="pretrained/opd_dinov2_pretrained",
    sha256="412de8e2f5c306a6c184ec153fcfc7dd36676b7315b6bcdbf95d90ae03f58215",
    input_size=56, pixel_size_um=0.25, out_size=128,
    trained_on="20000 simulated OPD maps of the five classes (supervised-sim, labels used), 5 epochs; "
               "CPU-sized DINOv2 (models.DINOV2_CPU_CONFIG)",
    command="python -m opdcells pretrain --backbone dinov2 --method supervised-sim --out "
            "saved_models/opd_dinov2_pretrained --epochs 5 --input-size 56 --n-sim 20000 --seed 0 "
            "--batch-size 64 --probe 500 --sim-cache data/sim_cache --sim-maps-per-session 10",
    commit="dffe1a0a1d41848f1187c9201383b0b857dd0b9a"), default=True)

register_encoder(RegisteredEncoder(
    name="opd_vgg16_pretrained", backbone="vgg16", folder="pretrained/opd_vgg16_pretrained",
    sha256="25a17b85595d69d3548de7d88b8ace90733b6f553f0739a15569c7dc79d5cd9e",
    input_size=48, pixel_size_um=0.25, out_size=128,
    trained_on="20000 simulated OPD maps of the five classes (supervised-sim, labels used), 10 epochs at "
               "48 px in resumed chunks of one epoch (oneDNN kernels); weights stored as float16",
    command="python -m opdcells pretrain --backbone vgg16 --method supervised-sim --out "
            "saved_models/opd_vgg16_pretrained --epochs 10 --input-size 48 --n-sim 20000 --seed 0 "
            "--batch-size 64 --lr 0.0001 --probe 500 --sim-cache data/sim_cache --sim-maps-per-session 10",
    commit="890e83f27540d9134914628766cdd87e707f24ee"), default=True)


# ------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class ResolvedWeights:
    """What a ``weights`` setting loads (:func:`resolve_weights`).

    Attributes
    ----------
    kind : str
        ``"random"``, ``"imagenet"`` or ``"file"`` (encoder weights to load).
    file : pathlib.Path or None
        The ``encoder.weights.h5`` (or bare weights file) to load.
    config : dict or None
        The encoder folder's config.json (alpha, input size, norm scale, pixel size it was trained at).
    init : str
        What the model records as its initialisation: ``random``, ``imagenet``, ``opd:NAME@SHA12`` (a
        registry entry) or ``file:PATH@SHA12`` (weights given by path).
    """

    kind: str
    file: Path | None = None
    config: dict | None = None
    init: str = "random"


def resolve_weights(backbone: str, weights: str | os.PathLike | None) -> ResolvedWeights:
    """Resolve a ``weights`` setting of a ``backbone`` encoder (the one place this happens).

    Parameters
    ----------
    backbone : str
        Backbone family (``config.FAMILIES``).
    weights : str, os.PathLike or None
        ``"random"`` (also None, "none"), ``"imagenet"``, ``"opd"`` (the family's default entry,
        :data:`DEFAULTS`), ``"opd:NAME"`` (a registry entry), or the path of an encoder folder
        (``config.json`` + ``encoder.weights.h5``) or of a bare weights file.

    Returns
    -------
    ResolvedWeights

    Raises
    ------
    RegistryError
        No OPD-pretrained encoder registered for ``backbone``, an entry of another backbone, a missing or
        corrupt file, a path that is no encoder.
    """
    text = "random" if weights is None else os.fspath(weights)
    if text.lower() in ("none", "random", ""):
        return ResolvedWeights("random")
    if text.lower() == "imagenet":
        return ResolvedWeights("imagenet", init="imagenet")
    if text.lower() == "opd" or text.startswith("opd:"):
        entry = default_entry(backbone) if text.lower() == "opd" else get_entry(text[4:])
        if entry.backbone != backbone:
            raise RegistryError(f"registry entry {entry.name}",
                                f"is a {entry.backbone} encoder, not {backbone}")
        folder = encoder_folder(entry.name)
        return ResolvedWeights("file", folder / ENCODER_WEIGHTS, encoder_config(folder), entry.init)
    path = Path(text).expanduser()
    if path.is_dir():
        absent = [n for n in (ENCODER_WEIGHTS, ENCODER_CONFIG) if not (path / n).is_file()]
        if absent:
            raise RegistryError(path, f"encoder weights folder lacks {', '.join(absent)}")
        file, config = path / ENCODER_WEIGHTS, encoder_config(path)
    elif path.is_file():
        file, config = path, None
    else:
        raise RegistryError(text, "no such encoder folder or weights file (weights are random, imagenet, "
                                  f"opd, opd:NAME of a registry entry ({', '.join(REGISTRY)}) or a path)")
    return ResolvedWeights("file", file, config, f"file:{path}@{file_sha256(file)[:12]}")
