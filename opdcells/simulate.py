"""Physically grounded simulator of OPD maps of SW480, SW620, granulocytes, monocytes and PBMCs.

Each cell is a 3-D refractive-index model (ellipsoidal body, nucleus with a LOWER index than the
cytoplasm, nucleoli/chromatin, granules, vacuoles) voxelised on a grid with the session's pixel size in
x, y and a fine step in z; the optical path delay is ``OPD(x, y) = sum_z (n(x, y, z) - n_medium) dz``.
The OPD map is then imaged like an off-axis holographic / interferometric phase microscope would:
coherent transfer function of the objective (NA, wavelength, defocus), phase offset and tilt,
parasitic fringes and camera noise, with per-session (batch) variation of all of them.

The numbers live in ONE table, :data:`CLASS_PARAMETERS` (one row per cell type, with its literature
source); :data:`CLASS_MIXTURE` says which cell types make up each of the five classes.
``docs/simulator.md`` renders both and explains the model.
"""
from __future__ import annotations

import csv
import datetime
import logging
import math
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import scipy.fft
import scipy.io
from scipy import ndimage
from tqdm import tqdm

from .errors import DatasetError

log = logging.getLogger(__name__)

__all__ = ["CLASS_NAMES", "CLASS_PARAMETERS", "CLASS_MIXTURE", "CellType", "Session", "sample_session",
           "simulate_cell", "simulate_dataset", "cell_rng", "build_cell_model", "render_opd",
           "coherent_image", "parameter_table_markdown"]

CLASS_NAMES = ("SW480", "SW620", "granulocytes", "monocytes", "PBMCs")

#: Specific refraction increment (mL/g == um^3/pg): dry mass = integral of OPD over area / alpha.
ALPHA_UM3_PER_PG = 0.19
#: Axial voxel size (um) of the 3-D cell models.
DZ_UM = 0.1
#: Tissues of the label volume; a model gives each a refractive index (medium: the session's).
TISSUES = ("medium", "cytoplasm", "nucleus", "nuclear_body", "granule", "vacuole", "debris")
MEDIUM, CYTOPLASM, NUCLEUS, NUCLEAR_BODY, GRANULE, VACUOLE, DEBRIS = range(len(TISSUES))

#: Written into the header text of every MAT file the simulator exports (``is_simulated_export``).
SIMULATOR_STAMP = "opdcells.simulate"

TRUTH_COLUMNS = (
    "path", "index", "class", "session", "subtype", "diameter_um", "volume_fl", "dry_mass_pg",
    "mean_index", "n_nuclei", "n_granules", "n_vacuoles", "has_debris", "has_neighbour",
    "centre_x_um", "centre_y_um", "defocus_um", "wavelength_nm", "pixel_size_um", "medium_index", "na",
)


# ---------------------------------------------------------------------------------------------------
# Parameter table
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellType:
    """Morphology and refractive indices of one cell type (ranges are (low, high), pairs (mean, sd)).

    Attributes
    ----------
    diameter_um : tuple of float
        Volume-equivalent diameter in suspension (um; mean, sd).
    aspect : tuple of float
        In-plane axis ratio range.
    height_ratio : tuple of float
        Height / in-plane size range (1 = sphere).
    irregularity : float
        Relative amplitude of the boundary harmonics (orders 2-5).
    nucleus : {"round", "lobed", "kidney"}
        Nucleus shape: "lobed" for granulocytes, "kidney" for monocytes.
    nucleus_fraction : tuple of float
        Nucleus / cell diameter (mean, sd).
    n_cytoplasm : tuple of float
        Refractive index of the cytoplasm (mean, sd).
    nucleus_drop : tuple of float
        n_cytoplasm - n_nucleus (mean, sd), > 0.
    source : str
        The literature the values come from (shown in docs/simulator.md).
    lobes : tuple of int
        Nuclear lobe count range.
    multinucleated : float
        Probability of 2-3 nuclei.
    nuclear_bodies : tuple of int
        Count range of nucleoli / heterochromatin clumps.
    nuclear_body_radius_um : tuple of float
        Their radius range (um).
    nuclear_body_excess : float
        Their refractive index excess over the cytoplasm.
    granules : tuple of int
        Granule count range.
    granule_radius_um : tuple of float
        Granule radius range (um).
    n_granule : float
        Absolute refractive index of granules.
    vacuoles : tuple of int
        Vacuole count range.
    vacuole_radius_um : tuple of float
        Vacuole radius range (um).
    n_vacuole : float
        Absolute refractive index of vacuoles.
    """

    diameter_um: tuple[float, float]
    aspect: tuple[float, float]
    height_ratio: tuple[float, float]
    irregularity: float
    nucleus: str
    nucleus_fraction: tuple[float, float]
    n_cytoplasm: tuple[float, float]
    nucleus_drop: tuple[float, float]
    source: str
    lobes: tuple[int, int] = (1, 1)
    multinucleated: float = 0.0
    nuclear_bodies: tuple[int, int] = (0, 0)
    nuclear_body_radius_um: tuple[float, float] = (0.4, 0.7)
    nuclear_body_excess: float = 0.012
    granules: tuple[int, int] = (0, 0)
    granule_radius_um: tuple[float, float] = (0.2, 0.35)
    n_granule: float = 1.40
    vacuoles: tuple[int, int] = (0, 0)
    vacuole_radius_um: tuple[float, float] = (0.3, 0.6)
    n_vacuole: float = 1.345


_RI = ("Refractive indices: Schürmann et al. 2016 J Biophotonics 9:1068 (nucleus index lower than "
       "cytoplasm, HL60 and other lines, ODT); Steelman et al. 2017 J Biophotonics 10:1714; review Liu et "
       "al. 2016 Lab Chip 16:634 (cells 1.36-1.39)")

CLASS_PARAMETERS: dict[str, CellType] = {
    "SW480": CellType(
        diameter_um=(14.5, 2.0), aspect=(1.0, 1.5), height_ratio=(0.6, 0.95), irregularity=0.05,
        nucleus="round", nucleus_fraction=(0.60, 0.06), multinucleated=0.15,
        n_cytoplasm=(1.370, 0.005), nucleus_drop=(0.010, 0.003), nuclear_bodies=(1, 4),
        granules=(10, 40), granule_radius_um=(0.25, 0.45), n_granule=1.40,
        source="Leibovitz et al. 1976 Cancer Res 36:4562 and Hewitt et al. 2000 J Pathol 192:446 "
               "(primary-tumour line, mixed round and spread epithelial-like cells, heterogeneous); "
               "13-16 um in suspension (estimate); multinucleation rate and lipid/organelle granules "
               "are estimates. " + _RI),
    "SW620": CellType(
        diameter_um=(12.0, 1.1), aspect=(1.0, 1.15), height_ratio=(0.85, 1.0), irregularity=0.02,
        nucleus="round", nucleus_fraction=(0.64, 0.04), multinucleated=0.03,
        n_cytoplasm=(1.372, 0.004), nucleus_drop=(0.010, 0.003), nuclear_bodies=(1, 3),
        granules=(8, 30), granule_radius_um=(0.25, 0.4), n_granule=1.40,
        source="Leibovitz et al. 1976; Hewitt et al. 2000 (lymph-node metastasis line of the same "
               "patient: smaller, rounder, more uniform cells); 11-13 um in suspension (estimate). "
               + _RI),
    "neutrophil": CellType(
        diameter_um=(9.0, 0.7), aspect=(1.0, 1.1), height_ratio=(0.9, 1.0), irregularity=0.02,
        nucleus="lobed", lobes=(3, 5), nucleus_fraction=(0.55, 0.05),
        n_cytoplasm=(1.372, 0.004), nucleus_drop=(0.008, 0.003),
        granules=(60, 140), granule_radius_um=(0.2, 0.3), n_granule=1.40,
        source="Downey et al. 1990 J Appl Physiol 69:1767 and Ting-Beall et al. 1993 Blood 81:2774 "
               "(neutrophils 8-9 um in suspension; 10-12 um in smears); 3-5 nuclear lobes "
               "and dense granules from hematology texts; granule index 1.40 is an estimate. " + _RI),
    "eosinophil": CellType(
        diameter_um=(10.0, 0.8), aspect=(1.0, 1.1), height_ratio=(0.9, 1.0), irregularity=0.02,
        nucleus="lobed", lobes=(2, 2), nucleus_fraction=(0.5, 0.05),
        n_cytoplasm=(1.372, 0.004), nucleus_drop=(0.008, 0.003),
        granules=(40, 80), granule_radius_um=(0.3, 0.45), n_granule=1.42,
        source="Hematology texts (eosinophils 10-14 um in smears, bilobed nucleus, large refractile "
               "granules); sizes in suspension and granule index are estimates. " + _RI),
    "monocyte": CellType(
        diameter_um=(10.5, 1.0), aspect=(1.0, 1.2), height_ratio=(0.85, 1.0), irregularity=0.03,
        nucleus="kidney", nucleus_fraction=(0.62, 0.05),
        n_cytoplasm=(1.368, 0.004), nucleus_drop=(0.008, 0.003),
        granules=(5, 20), granule_radius_um=(0.2, 0.3), n_granule=1.39,
        vacuoles=(2, 8), vacuole_radius_um=(0.3, 0.7), n_vacuole=1.345,
        source="Downey et al. 1990 (monocytes ~9-11 um in suspension; 12-20 um in smears); kidney-"
               "shaped nucleus, vacuoles and fine azurophilic granules from hematology texts; "
               "vacuole index near the medium is an estimate. " + _RI),
    "lymphocyte": CellType(
        diameter_um=(7.3, 0.6), aspect=(1.0, 1.08), height_ratio=(0.92, 1.0), irregularity=0.015,
        nucleus="round", nucleus_fraction=(0.80, 0.04),
        n_cytoplasm=(1.370, 0.004), nucleus_drop=(0.006, 0.003), nuclear_bodies=(4, 12),
        nuclear_body_radius_um=(0.3, 0.5), nuclear_body_excess=0.015,
        source="Downey et al. 1990 (small lymphocytes 6.5-7.5 um in suspension); large round nucleus "
               "with clumped chromatin and a thin cytoplasm rim from hematology texts; Yoon et al. "
               "2015 Biomed Opt Express 6:3865 (3-D RI maps of lymphocytes, 1.36-1.38). " + _RI),
    "large_lymphocyte": CellType(
        diameter_um=(9.5, 0.9), aspect=(1.0, 1.1), height_ratio=(0.9, 1.0), irregularity=0.02,
        nucleus="round", nucleus_fraction=(0.70, 0.05),
        n_cytoplasm=(1.369, 0.004), nucleus_drop=(0.007, 0.003), nuclear_bodies=(2, 8),
        granules=(0, 10), granule_radius_um=(0.2, 0.3), n_granule=1.39,
        source="Hematology texts (large granular lymphocytes / NK cells 9-12 um in smears, few "
               "azurophilic granules); sizes in suspension are estimates. " + _RI),
}

#: Cell-type composition of each class (fractions sum to 1), i.e. sample purity.
CLASS_MIXTURE: dict[str, dict[str, float]] = {
    "SW480": {"SW480": 1.0},
    "SW620": {"SW620": 1.0},
    "granulocytes": {"neutrophil": 0.94, "eosinophil": 0.06},
    "monocytes": {"monocyte": 0.95, "lymphocyte": 0.05},
    "PBMCs": {"lymphocyte": 0.72, "large_lymphocyte": 0.13, "monocyte": 0.15},
}
MIXTURE_SOURCE = ("PBMCs: 70-90% lymphocytes, 10-20% monocytes (Kleiveland 2015, in The Impact of Food "
                  "Bioactives on Health, ch. 15); granulocyte preparations: neutrophils with a few "
                  "percent eosinophils (normal blood differential); monocyte isolation purity ~95% "
                  "(typical for CD14 selection; estimate).")


def _pm(pair: tuple[float, float], digits: int) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def _range(pair: tuple[float, float], digits: int = 2) -> str:
    return f"{pair[0]:.{digits}f}" if pair[0] == pair[1] else f"{pair[0]:.{digits}f}-{pair[1]:.{digits}f}"


def _organelles(count: tuple[int, int], radius: tuple[float, float], index: str) -> str:
    return f"{_range(count, 0)}, {_range(radius)}, {index}" if count[1] else "-"


def parameter_table_markdown() -> str:
    """:data:`CLASS_PARAMETERS` and :data:`CLASS_MIXTURE` as Markdown tables (for docs/simulator.md).

    Returns
    -------
    str
        The Markdown (diameters and radii in um, refractive indices, sources).
    """
    header = ("| cell type | diameter um | aspect | height ratio | nucleus | nucleus / cell diameter "
              "| n cytoplasm | n nucleus | nucleoli / chromatin (count, r um, +n) "
              "| granules (count, r um, n) | vacuoles (count, r um, n) | multinucleated | source |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, ct in CLASS_PARAMETERS.items():
        nucleus = ct.nucleus + (f" ({_range(ct.lobes, 0)} lobes)" if ct.nucleus == "lobed" else "")
        n_nucleus = (ct.n_cytoplasm[0] - ct.nucleus_drop[0],
                     math.hypot(ct.n_cytoplasm[1], ct.nucleus_drop[1]))
        lines.append("| " + " | ".join([
            name, _pm(ct.diameter_um, 1), _range(ct.aspect), _range(ct.height_ratio), nucleus,
            _pm(ct.nucleus_fraction, 2), _pm(ct.n_cytoplasm, 3), _pm(n_nucleus, 3),
            _organelles(ct.nuclear_bodies, ct.nuclear_body_radius_um, f"+{ct.nuclear_body_excess:.3f}"),
            _organelles(ct.granules, ct.granule_radius_um, f"{ct.n_granule:.3f}"),
            _organelles(ct.vacuoles, ct.vacuole_radius_um, f"{ct.n_vacuole:.3f}"),
            f"{ct.multinucleated:.0%}", ct.source]) + " |")
    lines += ["", "| class | cell types (fraction) |", "|---|---|"]
    lines += [f"| {cls} | " + ", ".join(f"{t} {f:.0%}" for t, f in mix.items()) + " |"
              for cls, mix in CLASS_MIXTURE.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Sessions (acquisition batches)
# ---------------------------------------------------------------------------------------------------
#: The two interferometric microscopes sessions are drawn from: (name, wavelength nm).
MICROSCOPES = (("IPM-532", 532.0), ("DHM-633", 633.0))


@dataclass(frozen=True)
class Session:
    """Acquisition settings of one session; everything here varies between sessions (batch effects).

    Attributes
    ----------
    class_name : str
        The class imaged (one of :data:`CLASS_NAMES`).
    session_id : str
        Name of the session.
    microscope : str
        The simulated instrument.
    wavelength_nm : float
        Vacuum wavelength (nm).
    pixel_size_um : float
        Object-plane pixel size (um).
    shape : tuple of int
        (H, W) of each exported map (px).
    na : float
        Numerical aperture of the objective.
    medium_index : float
        Refractive index of the medium.
    defocus_um : float
        Mean defocus of the session (um).
    defocus_sd_um : float
        Cell-to-cell spread of the defocus (um; cells at different depths in the flow).
    noise_rad : float
        White (shot/read) phase noise (rad).
    smooth_noise_rad : float
        Spatially correlated background noise (rad).
    fringe_rad : float
        Parasitic interference fringes (rad).
    tilt_rad_per_um : float
        Typical background tilt (rad/um).
    opd_scale : float
        Calibration drift of the OPD scale (a factor).
    off_centre_um : float
        Standard deviation of the cell position (um).
    debris_rate : float
        Probability of debris beside the cell in a map.
    neighbour_rate : float
        Probability of a neighbouring cell in view of a map.
    size_scale : float
        Biological batch effect on size (culture passage, donor; a factor).
    index_shift : float
        Biological batch effect on the refractive index.
    """

    class_name: str
    session_id: str
    microscope: str
    wavelength_nm: float
    pixel_size_um: float
    shape: tuple[int, int]
    na: float
    medium_index: float
    defocus_um: float          # mean defocus of the session
    defocus_sd_um: float       # cell-to-cell spread (cells at different depths in the flow)
    noise_rad: float           # white (shot/read) phase noise
    smooth_noise_rad: float    # spatially correlated background noise
    fringe_rad: float          # parasitic interference fringes
    tilt_rad_per_um: float     # typical background tilt
    opd_scale: float           # calibration drift of the OPD scale
    off_centre_um: float       # sd of the cell position
    debris_rate: float
    neighbour_rate: float
    size_scale: float          # biological batch effect (culture passage, donor)
    index_shift: float         # biological batch effect on the refractive index


def sample_session(rng: np.random.Generator, class_name: str, k: int) -> Session:
    """Draw the settings of session number ``k`` (1-based) of ``class_name``.

    Optics and noise are drawn from the same distributions for every class, so a classifier can only
    profit from them when the same session is in train and test.

    Parameters
    ----------
    rng : numpy.random.Generator
        The session's random stream (:func:`cell_rng` with ``index=None``).
    class_name : str
        One of :data:`CLASS_NAMES`.
    k : int
        Session number (1-based).

    Returns
    -------
    Session

    Raises
    ------
    ValueError
        For an unknown class.
    """
    _check_class(class_name)
    microscope, wavelength = MICROSCOPES[int(rng.integers(len(MICROSCOPES)))]
    pixel = round(float(rng.uniform(0.15, 0.30)), 4)
    shape = tuple(int(round(rng.uniform(32.0, 40.0) / pixel)) for _ in range(2))
    return Session(
        class_name=class_name, session_id=f"session_{k}", microscope=microscope,
        wavelength_nm=wavelength, pixel_size_um=pixel, shape=shape,
        na=round(float(rng.uniform(0.6, 1.2)), 3), medium_index=round(float(rng.uniform(1.335, 1.337)), 4),
        defocus_um=float(rng.normal(0.0, 0.4)), defocus_sd_um=float(rng.uniform(0.1, 0.5)),
        noise_rad=float(rng.uniform(0.01, 0.05)), smooth_noise_rad=float(rng.uniform(0.01, 0.06)),
        fringe_rad=float(rng.uniform(0.0, 0.05)), tilt_rad_per_um=float(rng.uniform(0.0, 0.1)),
        opd_scale=float(rng.uniform(0.97, 1.03)), off_centre_um=float(rng.uniform(0.5, 3.0)),
        debris_rate=float(rng.uniform(0.05, 0.3)), neighbour_rate=float(rng.uniform(0.0, 0.1)),
        size_scale=float(np.exp(rng.normal(0.0, 0.08))), index_shift=float(rng.normal(0.0, 0.002)),
    )


def _check_class(class_name: str) -> None:
    if class_name not in CLASS_MIXTURE:
        raise ValueError(f"unknown class {class_name!r}; expected one of {CLASS_NAMES}")


# ---------------------------------------------------------------------------------------------------
# 3-D cell models and voxelisation
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ellipsoid:
    """Ellipsoid with semi-axes ``axes`` (x', y', z; um), rotated by ``angle`` about z.

    ``harmonics`` = ((order, relative amplitude, phase), ...) modulates the in-plane radius, giving
    irregular (spread, blebbing) outlines while keeping the z profile ellipsoidal.

    Attributes
    ----------
    axes : tuple of float
        Semi-axes (um).
    centre : tuple of float
        (x, y, z) of the centre relative to the cell's origin (um).
    angle : float
        Rotation about z (rad).
    harmonics : tuple of tuple
        ``(order, relative amplitude, phase)`` of each boundary harmonic.
    """

    axes: tuple[float, float, float]
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    angle: float = 0.0
    harmonics: tuple[tuple[int, float, float], ...] = ()

    def radius_xy(self) -> float:
        """Largest in-plane distance of the surface from the ellipsoid's centre (um)."""
        return max(self.axes[:2]) * (1.0 + sum(abs(amp) for _, amp, _ in self.harmonics))

    def reach_xy(self) -> float:
        """Largest in-plane distance of the surface from the origin of the cell (um)."""
        return math.hypot(self.centre[0], self.centre[1]) + self.radius_xy()

    def reach_z(self) -> float:
        return abs(self.centre[2]) + self.axes[2]

    def mask(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Boolean (z, y, x) inside-mask on the grid given by 1-D voxel-centre coordinates (um)."""
        a, b, c = self.axes
        dx = x[None, :] - self.centre[0]
        dy = y[:, None] - self.centre[1]
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        u = (dx * cos + dy * sin) / a
        v = (dy * cos - dx * sin) / b
        q = u * u + v * v
        if self.harmonics:
            phi = np.arctan2(v, u)
            radius = 1.0 + sum(amp * np.cos(order * phi + phase) for order, amp, phase in self.harmonics)
            q = q / radius ** 2
        w = (z - self.centre[2]) / c
        return q[None, :, :] + (w * w)[:, None, None] <= 1.0


@dataclass(frozen=True)
class Part:
    """A shape painted with tissue ``tissue`` over the voxels whose tissue is in ``over`` (None: all).

    Attributes
    ----------
    shape : Ellipsoid
        The part's shape.
    tissue : int
        Tissue code (a key of :attr:`CellModel.indices`).
    over : tuple of int or None
        Tissues it may paint over (None: all).
    """

    shape: Ellipsoid
    tissue: int
    over: tuple[int, ...] | None = None


@dataclass
class CellModel:
    """Parts painted in order (later parts win) plus the refractive index of each tissue.

    Attributes
    ----------
    parts : list of Part
        Body, nuclei, nuclear bodies, granules, vacuoles.
    indices : dict of int to float
        Tissue code -> refractive index.
    subtype : str
        The cell type drawn (e.g. a PBMC subtype).
    n_nuclei, n_granules, n_vacuoles : int
        Counts, for the truth table.
    """

    parts: list[Part]
    indices: dict[int, float]
    subtype: str = ""
    n_nuclei: int = 0
    n_granules: int = 0
    n_vacuoles: int = 0

    def reach_xy(self) -> float:
        return max(p.shape.reach_xy() for p in self.parts)

    def reach_z(self) -> float:
        return max(p.shape.reach_z() for p in self.parts)


@dataclass
class Rendered:
    """OPD patch (nm) of a voxelised model and its true volume (fL) and dry mass (pg).

    Attributes
    ----------
    opd_nm : (h, w) float64 ndarray
        OPD (nm).
    volume_fl : float
        Volume (fL = um^3).
    dry_mass_pg : float
        Dry mass (pg), with alpha = :data:`ALPHA_UM3_PER_PG`.
    """

    opd_nm: np.ndarray
    volume_fl: float
    dry_mass_pg: float

    @property
    def diameter_um(self) -> float:
        """Volume-equivalent diameter."""
        return (6.0 * self.volume_fl / math.pi) ** (1.0 / 3.0)


def _span(coords: np.ndarray, centre: float, reach: float) -> slice:
    """Index range of sorted ``coords`` within ``centre +- reach``."""
    low = np.searchsorted(coords, centre - reach)
    return slice(int(low), int(np.searchsorted(coords, centre + reach, side="right")))


def render_opd(model: CellModel, x_um: np.ndarray, y_um: np.ndarray, pixel_size_um: float,
               medium_index: float, dz_um: float = DZ_UM) -> Rendered:
    """Voxelise ``model`` on pixel centres ``x_um``, ``y_um`` (1-D, ascending, spaced ``pixel_size_um``,
    relative to the cell centre) with axial step ``dz_um``; integrate ``(n - n_medium) dz`` into an OPD
    map in nm.

    Parameters
    ----------
    model : CellModel
        The 3-D cell.
    x_um, y_um : (W,) and (H,) ndarray
        Pixel centres (um).
    pixel_size_um : float
        Their spacing (um).
    medium_index : float
        Refractive index of the medium.
    dz_um : float
        Axial voxel size (um).

    Returns
    -------
    Rendered
        ``opd_nm`` (H, W), volume (fL) and dry mass (pg).
    """
    n_z = max(1, math.ceil(2.0 * model.reach_z() / dz_um))
    z_um = (np.arange(n_z) - (n_z - 1) / 2.0) * dz_um
    labels = np.zeros((n_z, y_um.size, x_um.size), dtype=np.uint8)
    for part in model.parts:
        shape = part.shape
        sz = _span(z_um, shape.centre[2], shape.axes[2])
        sy = _span(y_um, shape.centre[1], shape.radius_xy())
        sx = _span(x_um, shape.centre[0], shape.radius_xy())
        inside = shape.mask(x_um[sx], y_um[sy], z_um[sz])
        if not inside.any():
            continue
        block = labels[sz, sy, sx]
        if part.over is not None:
            allowed = np.zeros(len(TISSUES), dtype=bool)
            allowed[list(part.over)] = True
            inside &= allowed[block]
        block[inside] = part.tissue
    contrast = np.zeros(len(TISSUES), dtype=np.float32)
    for tissue, index in model.indices.items():
        contrast[tissue] = index - medium_index
    column = contrast[labels].sum(axis=0, dtype=np.float64) * dz_um      # um of optical path
    pixel_um2 = pixel_size_um * pixel_size_um
    return Rendered(opd_nm=column * 1e3, volume_fl=float(np.count_nonzero(labels)) * pixel_um2 * dz_um,
                    dry_mass_pg=float(column.sum()) * pixel_um2 / ALPHA_UM3_PER_PG)


# ---------------------------------------------------------------------------------------------------
# Building cell models from the parameter table
# ---------------------------------------------------------------------------------------------------
def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def _normal(rng: np.random.Generator, mean_sd: tuple[float, float], limit: float = 2.0) -> float:
    """Normal draw truncated at ``limit`` standard deviations (keeps physical parameters plausible)."""
    return mean_sd[0] + mean_sd[1] * float(np.clip(rng.normal(), -limit, limit))


def _count(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _points_in(rng: np.random.Generator, body: Ellipsoid, n: int, scale: float = 0.95) -> np.ndarray:
    """``n`` points (n, 3) uniformly inside ``body`` shrunk by ``scale`` (harmonics ignored)."""
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    unit = direction * rng.uniform(0.0, 1.0, size=(n, 1)) ** (1.0 / 3.0) * scale
    local = unit * np.asarray(body.axes)
    cos, sin = math.cos(body.angle), math.sin(body.angle)
    x = local[:, 0] * cos - local[:, 1] * sin + body.centre[0]
    y = local[:, 0] * sin + local[:, 1] * cos + body.centre[1]
    return np.column_stack([x, y, local[:, 2] + body.centre[2]])


def _spheres(rng: np.random.Generator, body: Ellipsoid, n: int, radius: tuple[float, float],
             tissue: int, over: tuple[int, ...]) -> list[Part]:
    radii = rng.uniform(*radius, size=n)
    return [Part(Ellipsoid((r, r, r), tuple(float(v) for v in p)), tissue, over)
            for p, r in zip(_points_in(rng, body, n), radii, strict=True)]


def _body(rng: np.random.Generator, ct: CellType, size_scale: float) -> Ellipsoid:
    """Cell body: volume-equivalent diameter from the table, in-plane aspect, flattening, harmonics."""
    diameter = _normal(rng, ct.diameter_um) * size_scale
    aspect, height = _uniform(rng, ct.aspect), _uniform(rng, ct.height_ratio)
    b = diameter / 2.0 / (height * aspect ** 1.5) ** (1.0 / 3.0)
    a = aspect * b
    harmonics = tuple((order, _normal(rng, (0.0, ct.irregularity)), float(rng.uniform(0, 2 * math.pi)))
                      for order in range(2, 6)) if ct.irregularity > 0 else ()
    return Ellipsoid((a, b, height * math.sqrt(a * b)), angle=float(rng.uniform(0, math.pi)),
                     harmonics=harmonics)


def _nucleus_centre(rng: np.random.Generator, body: Ellipsoid, radius: float) -> tuple[float, float, float]:
    """Random eccentric position that keeps a nucleus of ``radius`` inside the body."""
    room = max(0.0, min(body.axes) - radius) * 0.8
    angle = rng.uniform(0, 2 * math.pi)
    shift = room * math.sqrt(rng.uniform())
    return (shift * math.cos(angle), shift * math.sin(angle), float(rng.uniform(-0.3, 0.3) * room))


def _round_nuclei(rng, ct: CellType, body: Ellipsoid, n_nuclei: int) -> list[Part]:
    """1-3 roughly round nuclei (several are smaller: same total nuclear volume)."""
    radius = min(body.axes) * _normal(rng, ct.nucleus_fraction) / n_nuclei ** (1.0 / 3.0)
    parts = []
    for _ in range(n_nuclei):
        stretch = rng.uniform(1.0, 1.2)
        axes = (radius * stretch, radius / math.sqrt(stretch), radius / math.sqrt(stretch))
        harmonics = ((2, _normal(rng, (0.0, 0.03)), 0.0), (3, _normal(rng, (0.0, 0.03)), 1.0))
        parts.append(Part(Ellipsoid(axes, _nucleus_centre(rng, body, radius), float(rng.uniform(0, math.pi)),
                                    harmonics), NUCLEUS, (CYTOPLASM,)))
    return parts


def _lobed_nucleus(rng, ct: CellType, body: Ellipsoid) -> list[Part]:
    """Granulocyte nucleus: lobes on a curved chain joined by thin strands."""
    n_lobes = _count(rng, ct.lobes)
    radius = min(body.axes) * _normal(rng, ct.nucleus_fraction)
    lobe = radius / n_lobes ** (1.0 / 3.0) * 0.95
    arc = rng.uniform(0.9, 1.6) * math.pi
    start = rng.uniform(0, 2 * math.pi)
    ring = radius * 0.75
    angles = start + np.linspace(0.0, arc, n_lobes)
    centres = [(ring * math.cos(t), ring * math.sin(t), float(rng.uniform(-0.4, 0.4))) for t in angles]
    parts = [Part(Ellipsoid((lobe * 1.15, lobe * 0.9, lobe * 0.9), c, float(t) + math.pi / 2),
                  NUCLEUS, (CYTOPLASM,)) for c, t in zip(centres, angles, strict=True)]
    for c0, c1 in zip(centres[:-1], centres[1:], strict=True):
        mid = tuple((p + q) / 2.0 for p, q in zip(c0, c1, strict=True))
        half = math.hypot(c1[0] - c0[0], c1[1] - c0[1]) / 2.0
        parts.append(Part(Ellipsoid((half, 0.3, 0.3), mid, math.atan2(c1[1] - c0[1], c1[0] - c0[0])),
                          NUCLEUS, (CYTOPLASM,)))
    return parts


def _kidney_nucleus(rng, ct: CellType, body: Ellipsoid) -> list[Part]:
    """Monocyte nucleus: eccentric ellipsoid with a spherical notch (cytoplasm painted back)."""
    radius = min(body.axes) * _normal(rng, ct.nucleus_fraction)
    angle = float(rng.uniform(0, 2 * math.pi))
    axes = (radius * 1.25, radius * 0.85, radius * 0.8)
    centre = _nucleus_centre(rng, body, axes[0])
    notch_r = axes[1] * rng.uniform(0.5, 0.8)
    depth = axes[1] + notch_r * rng.uniform(0.15, 0.5)
    notch = (centre[0] - depth * math.sin(angle), centre[1] + depth * math.cos(angle), centre[2])
    return [Part(Ellipsoid(axes, centre, angle), NUCLEUS, (CYTOPLASM,)),
            Part(Ellipsoid((notch_r, notch_r, notch_r), notch), CYTOPLASM, (NUCLEUS,))]


def _nucleus(rng, ct: CellType, body: Ellipsoid) -> tuple[list[Part], int]:
    """Nucleus parts of the cell type's shape and the number of nuclei."""
    if ct.nucleus == "lobed":
        return _lobed_nucleus(rng, ct, body), 1
    if ct.nucleus == "kidney":
        return _kidney_nucleus(rng, ct, body), 1
    n_nuclei = 1 + int(rng.uniform() < ct.multinucleated) * _count(rng, (1, 2))
    return _round_nuclei(rng, ct, body, n_nuclei), n_nuclei


def build_cell_model(cell_type: str, rng: np.random.Generator, session: Session | None = None) -> CellModel:
    """Draw one 3-D cell of ``cell_type`` (a key of :data:`CLASS_PARAMETERS`).

    Parameters
    ----------
    cell_type : str
        The cell type.
    rng : numpy.random.Generator
        The cell's random stream.
    session : Session, optional
        Its batch effects on size and refractive index (none without).

    Returns
    -------
    CellModel

    Raises
    ------
    KeyError
        For an unknown cell type.
    """
    ct = CLASS_PARAMETERS[cell_type]
    size_scale = session.size_scale if session else 1.0
    shift = session.index_shift if session else 0.0
    body = _body(rng, ct, size_scale)
    n_cyto = _normal(rng, ct.n_cytoplasm) + shift
    nucleus, n_nuclei = _nucleus(rng, ct, body)
    nuclear_bodies = [] if ct.nuclear_bodies[1] == 0 else [   # nucleoli / chromatin clumps per nucleus
        sphere for part in nucleus if part.tissue == NUCLEUS
        for sphere in _spheres(rng, part.shape, _count(rng, ct.nuclear_bodies), ct.nuclear_body_radius_um,
                               NUCLEAR_BODY, (NUCLEUS,))]
    n_granules, n_vacuoles = _count(rng, ct.granules), _count(rng, ct.vacuoles)
    organelles = (_spheres(rng, body, n_granules, ct.granule_radius_um, GRANULE, (CYTOPLASM,))
                  + _spheres(rng, body, n_vacuoles, ct.vacuole_radius_um, VACUOLE, (CYTOPLASM,)))
    indices = {CYTOPLASM: n_cyto, NUCLEUS: n_cyto - max(0.0, _normal(rng, ct.nucleus_drop)),
               NUCLEAR_BODY: n_cyto + ct.nuclear_body_excess, GRANULE: ct.n_granule + shift,
               VACUOLE: ct.n_vacuole}
    return CellModel([Part(body, CYTOPLASM)] + nucleus + nuclear_bodies + organelles, indices,
                     subtype=cell_type, n_nuclei=n_nuclei, n_granules=n_granules, n_vacuoles=n_vacuoles)


def _debris_model(rng: np.random.Generator) -> CellModel:
    """Small dense particle (platelet, cell fragment, dust): 0.3-1.2 um, high index."""
    r = rng.uniform(0.3, 1.2)
    shape = Ellipsoid((r * rng.uniform(1.0, 1.6), r, r * rng.uniform(0.5, 1.0)),
                      angle=float(rng.uniform(0, math.pi)))
    return CellModel([Part(shape, DEBRIS)], {DEBRIS: float(rng.uniform(1.38, 1.48))}, subtype="debris")


# ---------------------------------------------------------------------------------------------------
# Imaging
# ---------------------------------------------------------------------------------------------------
def _pixel_coords(n: int, pixel_size_um: float) -> np.ndarray:
    return (np.arange(n) - (n - 1) / 2.0) * pixel_size_um


def paste_model(canvas: np.ndarray, model: CellModel, centre_um: tuple[float, float], pixel_size_um: float,
                medium_index: float) -> Rendered:
    """Add the OPD (nm) of ``model`` centred at ``centre_um`` (x, y from the field centre) to ``canvas``;
    only the visible part is voxelised.

    Parameters
    ----------
    canvas : (H, W) float ndarray
        The map (nm), changed in place.
    model : CellModel
        The 3-D cell.
    centre_um : tuple of float
        (x, y) of the cell from the map's centre (um).
    pixel_size_um : float
        Pixel size (um).
    medium_index : float
        Refractive index of the medium.

    Returns
    -------
    Rendered
        The visible patch, its volume (fL) and dry mass (pg).
    """
    xs = _pixel_coords(canvas.shape[1], pixel_size_um)
    ys = _pixel_coords(canvas.shape[0], pixel_size_um)
    reach = model.reach_xy() + pixel_size_um
    sx, sy = _span(xs, centre_um[0], reach), _span(ys, centre_um[1], reach)
    if sx.start >= sx.stop or sy.start >= sy.stop:
        return Rendered(np.zeros((0, 0)), 0.0, 0.0)
    rendered = render_opd(model, xs[sx] - centre_um[0], ys[sy] - centre_um[1], pixel_size_um, medium_index)
    canvas[sy, sx] += rendered.opd_nm
    return rendered


def coherent_image(phase_rad: np.ndarray, pixel_size_um: float, wavelength_nm: float, na: float,
                   medium_index: float, defocus_um: float = 0.0) -> np.ndarray:
    """Image a phase object through a coherent microscope: the field ``exp(i phase)`` is filtered by the
    pupil (cut-off NA / wavelength: an Airy amplitude PSF) with angular-spectrum defocus, and the phase
    is read back unwrapped relative to the low-passed input phase. The map is zero-padded to a fast
    FFT size (background phase 0 outside).

    Parameters
    ----------
    phase_rad : (H, W) ndarray
        Object phase (rad).
    pixel_size_um : float
        Pixel size (um).
    wavelength_nm : float
        Vacuum wavelength (nm).
    na : float
        Numerical aperture.
    medium_index : float
        Refractive index of the medium (for the defocus propagation).
    defocus_um : float
        Defocus (um).

    Returns
    -------
    (H, W) float64 ndarray
        Imaged phase (rad).
    """
    shape = phase_rad.shape
    padded = tuple(scipy.fft.next_fast_len(n) for n in shape)
    phase = np.pad(phase_rad, [(0, p - n) for p, n in zip(padded, shape, strict=True)])
    lam_um = wavelength_nm * 1e-3
    fy = scipy.fft.fftfreq(padded[0], d=pixel_size_um)[:, None]
    fx = scipy.fft.fftfreq(padded[1], d=pixel_size_um)[None, :]
    f2 = fx * fx + fy * fy
    pupil = f2 <= (min(na, medium_index * 0.95) / lam_um) ** 2
    k_medium = medium_index / lam_um
    kz = np.sqrt(np.maximum(k_medium ** 2 - f2, 0.0))
    transfer = pupil * np.exp(2j * np.pi * defocus_um * (kz - k_medium))
    field_img = scipy.fft.ifft2(scipy.fft.fft2(np.exp(1j * phase)) * transfer)
    half = slice(0, padded[1] // 2 + 1)
    reference = scipy.fft.irfft2(scipy.fft.rfft2(phase) * pupil[:, half], s=padded)
    imaged = reference + np.angle(field_img * np.exp(-1j * reference))
    return imaged[:shape[0], :shape[1]]


def _background(rng: np.random.Generator, session: Session) -> np.ndarray:
    """Phase offset, tilt, parasitic fringes and correlated + white camera noise (rad)."""
    h, w = session.shape
    y = _pixel_coords(h, session.pixel_size_um)[:, None]
    x = _pixel_coords(w, session.pixel_size_um)[None, :]
    tilt = session.tilt_rad_per_um * rng.uniform(0.5, 1.5)
    theta = rng.uniform(0, 2 * math.pi)
    period = rng.uniform(3.0, 10.0)
    phi = rng.uniform(0, 2 * math.pi)
    fringe = session.fringe_rad * np.sin(2 * math.pi * (x * math.cos(phi) + y * math.sin(phi)) / period
                                         + rng.uniform(0, 2 * math.pi))
    smooth = ndimage.gaussian_filter(rng.standard_normal((h, w)), 1.5 / session.pixel_size_um, mode="wrap")
    smooth *= session.smooth_noise_rad / max(float(smooth.std()), 1e-12)
    white = rng.normal(0.0, session.noise_rad, size=(h, w))
    return rng.normal(0.0, 1.0) + tilt * (x * math.cos(theta) + y * math.sin(theta)) + fringe + smooth + white


def _half_field(session: Session) -> np.ndarray:
    """Half width and half height of the field (um)."""
    return np.array(session.shape[::-1]) * session.pixel_size_um / 2.0


def _cell_centre(rng: np.random.Generator, session: Session, reach_um: float) -> tuple[float, float]:
    """Off-centre (x, y) position that keeps the whole cell (``reach_um``) at least 1 um inside the field."""
    limits = np.maximum(0.0, _half_field(session) - reach_um - 1.0)
    return tuple(float(np.clip(rng.normal(0.0, session.off_centre_um), -lim, lim)) for lim in limits)


def _draw_cell_type(rng: np.random.Generator, class_name: str) -> str:
    types, weights = zip(*CLASS_MIXTURE[class_name].items(), strict=True)
    return types[int(rng.choice(len(types), p=np.asarray(weights) / sum(weights)))]


def _add_neighbour(rng, canvas: np.ndarray, class_name: str, session: Session,
                   main_centre: tuple[float, float], main_reach: float) -> bool:
    """Partially visible cell of the same sample at the field edge, not touching the main cell.
    Returns whether any of it is visible."""
    model = build_cell_model(_draw_cell_type(rng, class_name), rng, session)
    reach = model.reach_xy()
    angle = rng.uniform(0, 2 * math.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    edge = float(np.min(_half_field(session) / np.maximum(np.abs(direction), 1e-9)))
    clear = float(np.dot(main_centre, direction)) + main_reach + reach + 0.5
    distance = max(edge + reach * rng.uniform(-0.5, 0.2), clear)
    rendered = paste_model(canvas, model, tuple(distance * direction), session.pixel_size_um,
                           session.medium_index)
    return rendered.volume_fl > 0


def _add_debris(rng, canvas: np.ndarray, session: Session) -> int:
    """1-3 debris particles anywhere in the field; returns how many."""
    half = _half_field(session) - 1.0
    n = _count(rng, (1, 3))
    for _ in range(n):
        centre = tuple(float(v) for v in rng.uniform(-half, half))
        paste_model(canvas, _debris_model(rng), centre, session.pixel_size_um, session.medium_index)
    return n


def simulate_cell(class_name: str, rng: np.random.Generator, session: Session) -> tuple[np.ndarray, dict]:
    """Simulate one measured map of a cell of ``class_name`` in ``session``.

    Parameters
    ----------
    class_name : str
        One of :data:`CLASS_NAMES`.
    rng : numpy.random.Generator
        The cell's random stream (:func:`cell_rng`).
    session : Session
        The acquisition settings.

    Returns
    -------
    tuple of (ndarray, dict)
        The OPD in nm (float64, ``session.shape``, at ``session.pixel_size_um``; background offset, tilt
        and noise included, as the microscope would export it) and a truth dict (see ``TRUTH_COLUMNS``).

    Raises
    ------
    ValueError
        For an unknown class.
    """
    _check_class(class_name)
    model = build_cell_model(_draw_cell_type(rng, class_name), rng, session)
    canvas = np.zeros(session.shape)
    centre = _cell_centre(rng, session, model.reach_xy())
    cell = paste_model(canvas, model, centre, session.pixel_size_um, session.medium_index)
    has_neighbour = bool(rng.uniform() < session.neighbour_rate) and _add_neighbour(
        rng, canvas, class_name, session, centre, model.reach_xy())
    has_debris = bool(rng.uniform() < session.debris_rate)
    if has_debris:
        _add_debris(rng, canvas, session)
    defocus = session.defocus_um + rng.normal(0.0, session.defocus_sd_um)
    to_rad = 2.0 * math.pi / session.wavelength_nm
    phase = coherent_image(canvas * session.opd_scale * to_rad, session.pixel_size_um, session.wavelength_nm,
                           session.na, session.medium_index, defocus)
    opd_nm = (phase + _background(rng, session)) / to_rad
    truth = {
        "class": class_name, "session": session.session_id, "subtype": model.subtype,
        "diameter_um": round(cell.diameter_um, 3), "volume_fl": round(cell.volume_fl, 2),
        "dry_mass_pg": round(cell.dry_mass_pg, 2),
        "mean_index": round(session.medium_index + cell.dry_mass_pg * ALPHA_UM3_PER_PG / cell.volume_fl, 5),
        "n_nuclei": model.n_nuclei, "n_granules": model.n_granules, "n_vacuoles": model.n_vacuoles,
        "has_debris": has_debris, "has_neighbour": has_neighbour,
        "centre_x_um": round(centre[0], 3), "centre_y_um": round(centre[1], 3),
        "defocus_um": round(defocus, 3),
        "wavelength_nm": session.wavelength_nm, "pixel_size_um": session.pixel_size_um,
        "medium_index": session.medium_index, "na": session.na,
    }
    return opd_nm, truth


def cell_rng(seed: int, class_name: str, session_k: int, index: int | None = None) -> np.random.Generator:
    """Independent random stream of a session (``index=None``) or of one cell in it.

    Parameters
    ----------
    seed : int
        The dataset's seed.
    class_name : str
        One of :data:`CLASS_NAMES`.
    session_k : int
        Session number.
    index : int, optional
        The cell's number in the session.

    Returns
    -------
    numpy.random.Generator

    Raises
    ------
    ValueError
        For an unknown class.
    """
    key = (CLASS_NAMES.index(class_name), session_k) + (() if index is None else (index,))
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


# ---------------------------------------------------------------------------------------------------
# MATLAB exports
# ---------------------------------------------------------------------------------------------------
def _mat_meta(session: Session) -> dict:
    return {"wavelength_nm": session.wavelength_nm, "pixel_size_um": session.pixel_size_um,
            "medium_index": session.medium_index}


def write_mat5(path: Path, phase_rad: np.ndarray, session: Session) -> None:
    """One map as a compressed MATLAB v5 file: ``phase`` (single, rad) plus scalar metadata; the header
    text carries :data:`SIMULATOR_STAMP` (MATLAB ignores the text).

    Parameters
    ----------
    path : Path
        The ``.mat`` file to write.
    phase_rad : (H, W) ndarray
        Phase (rad).
    session : Session
        Gives the metadata (wavelength nm, pixel size um, medium index).
    """
    scipy.io.savemat(path, {"phase": phase_rad.astype(np.float32), **_mat_meta(session), "units": "rad"},
                     do_compression=True)
    with open(path, "r+b") as fh:   # the 116-byte descriptive text of the MAT header
        fh.write(_header_text("MATLAB 5.0 MAT-file"))


def _header_text(prefix: str) -> bytes:
    """The 116 descriptive bytes of a MAT-file header, stamped as written by the simulator."""
    created = datetime.datetime.now().strftime("%a %b %d %H:%M:%S %Y")
    text = f"{prefix}, Platform: GLNXA64, Created on: {created} by {SIMULATOR_STAMP}"
    return text.encode("ascii").ljust(116)[:116]


def is_simulated_export(path: str | os.PathLike) -> bool | None:
    """Whether an export file was written by this simulator.

    Parameters
    ----------
    path : str or os.PathLike
        An export file.

    Returns
    -------
    bool or None
        True when its MAT header carries :data:`SIMULATOR_STAMP`, or (exports of older opdcells) a
        ``truth.csv`` of the simulator lies in one of the three folders above it; False otherwise;
        None when the file cannot be read (moved or deleted since it was ingested).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(116)
    except OSError:
        return None
    if SIMULATOR_STAMP.encode() in head:
        return True
    return any(_is_truth_csv(folder / "truth.csv") for folder in list(path.parents)[:3])


def _is_truth_csv(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().strip() == ",".join(TRUTH_COLUMNS)
    except (OSError, UnicodeDecodeError):
        return False


def dataset_origin(dataset) -> dict:
    """Whether a dataset's maps are simulated or measured, from its source files (``files/path``).

    Parameters
    ----------
    dataset : opdcells.dataset.OPDDataset
        An opened dataset.

    Returns
    -------
    dict
        ``{"origin": "simulated" | "measured" | "mixed" | "unknown", "files_checked": int,
        "files_missing": int}``: simulated when every readable source file is a simulator export
        (:func:`is_simulated_export`), measured when none is, unknown when none can be read.
    """
    import h5py

    with h5py.File(dataset.real_path, "r") as h5:
        paths = [p.decode() if isinstance(p, bytes) else str(p) for p in h5["files/path"][()]] \
            if "files/path" in h5 else []
    verdicts = [is_simulated_export(p) for p in dict.fromkeys(paths)]
    known = [v for v in verdicts if v is not None]
    origin = ("unknown" if not known else "simulated" if all(known) else "measured" if not any(known)
              else "mixed")
    return {"origin": origin, "files_checked": len(known), "files_missing": len(verdicts) - len(known)}


def _mat73_header() -> bytes:
    """512-byte userblock of a MATLAB 7.3 MAT-file (116 text bytes, subsys offset, version, endian)."""
    return (_header_text("MATLAB 7.3 MAT-file") + b" " * 8 + b"\x00\x02IM").ljust(512, b"\x00")


def _matlab_attr(dataset: h5py.Dataset, matlab_class: str) -> None:
    dataset.attrs.create("MATLAB_class", np.bytes_(matlab_class))


class Mat73Stack:
    """MATLAB v7.3 stack ``phase`` (H x W x N in MATLAB = (N, W, H) in HDF5), written one map at a time."""

    def __init__(self, path: Path, n_maps: int, session: Session, *, gzip_level: int = 3,
                 shuffle: bool = False):
        """Create the file and its ``phase`` dataset and metadata; maps are written by :meth:`write`.

        Parameters
        ----------
        path : Path
            The ``.mat`` file.
        n_maps : int
            Maps in the stack.
        session : Session
            Gives the map shape and the metadata.
        gzip_level : int
            gzip level of the ``phase`` chunks (one map each).
        shuffle : bool
            HDF5 byte-shuffle filter before gzip (a standard HDF5 filter MATLAB reads): float32 noise
            compresses to 74% instead of 88% and at about half the CPU time, both ways (measured on
            simulated sample maps: 3.8 vs 7.2 ms a map to write, 0.4 vs 1.1 ms to read).
        """
        self.path = Path(path)
        h, w = session.shape
        self._file = h5py.File(self.path, "w", userblock_size=512, libver="earliest")
        self._phase = self._file.create_dataset("phase", shape=(n_maps, w, h), dtype=np.float32,
                                                chunks=(1, w, h), compression="gzip",
                                                compression_opts=gzip_level, shuffle=shuffle)
        _matlab_attr(self._phase, "single")
        for key, value in _mat_meta(session).items():
            _matlab_attr(self._file.create_dataset(key, data=np.full((1, 1), value)), "double")
        chars = np.frombuffer(b"rad", np.uint8).astype(np.uint16)[:, None]   # MATLAB char: uint16 codes
        units = self._file.create_dataset("units", data=chars)
        _matlab_attr(units, "char")
        units.attrs.create("MATLAB_int_decode", np.int32(2))

    def write(self, index: int, phase_rad: np.ndarray) -> None:
        self._phase[index] = phase_rad.T.astype(np.float32)

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
            with open(self.path, "r+b") as fh:
                fh.write(_mat73_header())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------------
# Dataset on disk
# ---------------------------------------------------------------------------------------------------
README = """Simulated OPD maps (opdcells.simulate, seed {seed}) -- NOT real measurements.

Layout: <class>/<session>/cell_XXXX.mat, one map per file, MATLAB v5 (compressed), or, for the last
session of each class (when a class has 2 or more sessions), one MATLAB v7.3 file <class>/<session>/stack.mat
holding all maps of the session as phase(H, W, N) (HDF5; h5py sees the transpose (N, W, H)).
Classes: {classes}. {n_per_class} maps per class in {sessions} sessions per class.

Variables in every file:
  phase          single, unwrapped phase in RADIANS (OPD_nm = phase * wavelength_nm / (2 pi)),
                 background offset and tilt NOT removed, noise included
  wavelength_nm  vacuum wavelength of the session's microscope (532 or 633)
  pixel_size_um  object-plane pixel size (0.15-0.30 um; the field is 32-40 um wide)
  medium_index   refractive index of the medium (1.335-1.337)
  units          'rad'

truth.csv, one row per map:
  path, index      file relative to this folder and position in it (0 for single-map files)
  class, session   class folder and session id; sessions differ in optics, noise and biology (batch effects)
  subtype          cell type drawn from the class mixture (e.g. PBMCs: lymphocyte / large_lymphocyte /
                   monocyte; granulocytes: neutrophil / eosinophil)
  diameter_um, volume_fl   volume-equivalent diameter and volume of the 3-D cell model
  dry_mass_pg      true dry mass, integral of (n - n_medium) dV / alpha, alpha = 0.19 mL/g
  mean_index       volume-averaged refractive index of the cell
  n_nuclei, n_granules, n_vacuoles   counts in the model
  has_debris, has_neighbour          small dense particles / a partial neighbouring cell in the field
  centre_x_um, centre_y_um           cell centre relative to the field centre
  defocus_um, wavelength_nm, pixel_size_um, medium_index, na   imaging settings of the map
Parameters and literature sources: docs/simulator.md in the opdcells repository.
"""


def _prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir``; replace a previous simulation there, refuse any other non-empty folder."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "truth.csv").is_file():
            raise DatasetError(out_dir, "folder is not empty and holds no earlier simulation (truth.csv); "
                                        "choose an empty or new folder")
        log.info("replacing the earlier simulation in %s", out_dir)
        for name in CLASS_NAMES:
            shutil.rmtree(out_dir / name, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _session_counts(n_per_class: int, sessions: int) -> list[int]:
    return [n_per_class // sessions + (k < n_per_class % sessions) for k in range(sessions)]


def _simulate_session(out_dir: Path, seed: int, class_name: str, k: int, n_maps: int, as_stack: bool,
                      first_number: int) -> Iterator[dict]:
    """Simulate and write the maps of one session; yield their truth rows as they are written."""
    session = sample_session(cell_rng(seed, class_name, k), class_name, k)
    folder = out_dir / class_name / session.session_id
    folder.mkdir(parents=True, exist_ok=True)
    to_rad = 2.0 * math.pi / session.wavelength_nm
    stack = Mat73Stack(folder / "stack.mat", n_maps, session) if as_stack else None
    try:
        for i in range(n_maps):
            opd_nm, truth = simulate_cell(class_name, cell_rng(seed, class_name, k, i), session)
            if stack is not None:
                stack.write(i, opd_nm * to_rad)
                path, index = stack.path, i
            else:
                path, index = folder / f"cell_{first_number + i:04d}.mat", 0
                write_mat5(path, opd_nm * to_rad, session)
            yield {"path": path.relative_to(out_dir).as_posix(), "index": index, **truth}
    finally:
        if stack is not None:
            stack.close()


def _session_rows(job: tuple) -> list[dict]:
    """The truth rows of one session simulated and written by :func:`_simulate_session` (``job``: its
    arguments); a top-level function, so worker processes can run it."""
    return list(_simulate_session(*job))


def _simulated_sessions(jobs: list[tuple], workers: int) -> Iterator[list[dict]]:
    """The truth rows of every session of ``jobs``, in their order, simulated ``workers`` sessions at a
    time. Each map has its own random stream (:func:`cell_rng`) and each session its own folder, so the
    files and rows are the same whatever ``workers`` is."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_session_rows, jobs)
        return
    with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
        yield from pool.map(_session_rows, jobs)


def simulate_preprocessed(seed: int, class_name: str, k: int, n_maps: int, config=None
                          ) -> tuple[list[np.ndarray], int]:
    """Maps ``0 .. n_maps-1`` of session ``k`` of ``class_name``, simulated and preprocessed in memory
    (``preprocess.preprocess_map`` with ``config``): (maps, number the preprocessing rejected).
    Deterministic for (seed, class, k, index); picklable, so corpora can be made in worker processes.

    Parameters
    ----------
    seed : int
        The corpus's seed.
    class_name : str
        One of :data:`CLASS_NAMES`.
    k : int
        Session number.
    n_maps : int
        Maps to simulate.
    config : PreprocessConfig, optional
        The preprocessing (default :class:`~opdcells.preprocess.PreprocessConfig`).

    Returns
    -------
    tuple of (list of ndarray, int)
        The preprocessed maps ((S, S) float32 OPD, nm) and the number rejected.
    """
    from .errors import OPDCellsError
    from .metadata import Meta
    from .preprocess import PreprocessConfig, preprocess_map

    config = config or PreprocessConfig()
    session = sample_session(cell_rng(seed, class_name, k), class_name, k)
    meta = Meta(units="nm", wavelength_nm=session.wavelength_nm, pixel_size_um=session.pixel_size_um,
                medium_index=session.medium_index)
    maps, rejected = [], 0
    for i in range(n_maps):
        opd_nm, _ = simulate_cell(class_name, cell_rng(seed, class_name, k, i), session)
        try:
            maps.append(preprocess_map(opd_nm, meta, config, path=f"<sim {class_name}/{session.session_id}>")
                        .opd)
        except OPDCellsError as err:
            rejected += 1
            log.debug("simulated map rejected: %s", err)
    return maps, rejected


def simulate_dataset(out_dir: str | os.PathLike, n_per_class: int = 400, seed: int = 0, *,
                     sessions_per_class: int = 5, progress: bool = True, workers: int = 1) -> Path:
    """Write a simulated dataset of the five classes to ``out_dir`` and return the path of truth.csv.

    Maps go to ``out_dir/<class>/session_<k>/`` as MATLAB v5 files (one map each) or, for the last
    session of each class when ``sessions_per_class >= 2``, as one MATLAB v7.3 stack; ``truth.csv``
    and ``README.txt`` describe them. Deterministic for a seed; maps are written as they are made.

    Parameters
    ----------
    out_dir : str or os.PathLike
        The folder (created; if not empty it must hold an earlier simulation, which is replaced).
    n_per_class : int
        Maps per class.
    seed : int
        Random seed.
    sessions_per_class : int
        Acquisition sessions per class (the maps of a class are shared among them).
    progress : bool
        Show a progress bar.
    workers : int
        Processes simulating sessions at once (the files are the same whatever it is).

    Returns
    -------
    Path
        ``out_dir/truth.csv``.

    Raises
    ------
    ValueError
        When ``n_per_class`` or ``sessions_per_class`` is below 1.
    DatasetError
        When ``out_dir`` is not empty and holds no earlier simulation.
    """
    if n_per_class < 1 or sessions_per_class < 1:
        raise ValueError("n_per_class and sessions_per_class must be >= 1")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    counts = _session_counts(n_per_class, sessions_per_class)
    truth_path = out_dir / "truth.csv"
    total = n_per_class * len(CLASS_NAMES)
    with open(truth_path, "w", newline="") as fh, \
            tqdm(total=total, desc="simulating", unit="map", disable=not progress) as bar:
        writer = csv.DictWriter(fh, fieldnames=TRUTH_COLUMNS)
        writer.writeheader()
        jobs = []
        for class_name in CLASS_NAMES:
            first = 0
            for k, n_maps in enumerate(counts, start=1):
                if n_maps:   # none when there are fewer maps than sessions
                    as_stack = sessions_per_class >= 2 and k == sessions_per_class
                    jobs.append((out_dir, seed, class_name, k, n_maps, as_stack, first))
                first += n_maps
        for rows in _simulated_sessions(jobs, workers):
            writer.writerows(rows)
            bar.update(len(rows))
    (out_dir / "README.txt").write_text(README.format(
        seed=seed, classes=", ".join(CLASS_NAMES), n_per_class=n_per_class, sessions=sessions_per_class))
    log.info("simulated %d maps in %s", total, out_dir)
    return truth_path
