"""Hand-made features: geometry and mass of synthetic shapes, texture, robustness on simulated maps."""
from __future__ import annotations

import math

import numpy as np
import pytest

from opdcells import simulate as sim
from opdcells.features import FEATURE_NAMES, extract_features, feature_matrix
from opdcells.metadata import Meta
from opdcells.preprocess import preprocess_map


def coords(px: float, field_um: float = 32.0):
    x = (np.arange(int(field_um / px)) - (int(field_um / px) - 1) / 2) * px
    return x[None, :], x[:, None]


def disk(px: float, radius_um: float = 5.0, opd_nm: float = 200.0, seed: int = 0) -> np.ndarray:
    x, y = coords(px)
    noise = np.random.default_rng(seed).normal(0.0, 1.0, (y.size, x.size))
    return np.where(x ** 2 + y ** 2 <= radius_um ** 2, opd_nm, 0.0) + noise


@pytest.mark.parametrize("px", [0.15, 0.25, 0.3])
def test_disk_area_diameter_and_mass(px):
    f = extract_features(disk(px), px)
    assert f["area_um2"] == pytest.approx(math.pi * 25, rel=0.04)
    assert f["equivalent_diameter_um"] == pytest.approx(10.0, rel=0.02)
    assert f["dry_mass_pg"] == pytest.approx(0.2 * math.pi * 25 / 0.19, rel=0.04)
    assert f["phase_volume_um3"] == pytest.approx(0.2 * math.pi * 25, rel=0.04)
    assert f["opd_mean_nm"] == pytest.approx(200.0, rel=0.05)
    assert f["eccentricity"] < 0.2 and f["solidity"] > 0.95 and f["circularity"] > 0.8


def test_ellipse_eccentricity_and_axes():
    px = 0.25
    x, y = coords(px)
    ellipse = np.where((x / 6.0) ** 2 + (y / 3.0) ** 2 <= 1.0, 150.0, 0.0)
    f = extract_features(ellipse, px)
    assert f["eccentricity"] == pytest.approx(math.sqrt(1 - 0.25), abs=0.03)
    assert f["major_axis_um"] == pytest.approx(12.0, rel=0.05)
    assert f["minor_axis_um"] == pytest.approx(6.0, rel=0.05)


def test_granular_texture_scores_higher_than_smooth():
    px = 0.25
    x, y = coords(px)
    smooth = np.where(x ** 2 + y ** 2 <= 25, 200.0 * np.sqrt(np.clip(1 - (x ** 2 + y ** 2) / 25, 0, 1)), 0.0)
    rng = np.random.default_rng(1)
    granular = smooth.copy()
    for cx, cy in rng.uniform(-3.5, 3.5, size=(40, 2)):
        granular += 40.0 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 0.25 ** 2))
    f_smooth, f_granular = extract_features(smooth, px), extract_features(granular, px)
    assert f_granular["highpass_std_nm"] > 3 * f_smooth["highpass_std_nm"]
    assert f_granular["glcm_contrast"] > f_smooth["glcm_contrast"]
    assert f_granular["local_maxima_per_um2"] > f_smooth["local_maxima_per_um2"]


def test_radial_profile_sees_a_dim_centre():
    """A cell with a low-index centre (nucleus) has a lower inner ring than a homogeneous sphere."""
    px = 0.25
    x, y = coords(px)
    r2 = x ** 2 + y ** 2
    sphere = 300.0 * np.sqrt(np.clip(1 - r2 / 36, 0, None))
    nucleus = sphere - 80.0 * np.sqrt(np.clip(1 - r2 / 9, 0, None))
    inner_ring = {name: extract_features(opd, px)["radial_ring_0"]
                  for name, opd in (("sphere", sphere), ("nucleus", nucleus))}
    assert inner_ring["nucleus"] < inner_ring["sphere"] - 0.1


def test_blank_map_gives_nan_features():
    f = extract_features(np.zeros((64, 64)), 0.25)
    assert list(f) == list(FEATURE_NAMES) and all(math.isnan(v) for v in f.values())


def test_feature_matrix_of_simulated_cells_is_finite():
    maps = []
    for name in sim.CLASS_NAMES:
        session = sim.sample_session(sim.cell_rng(2, name, 1), name, 1)
        for i in range(2):
            opd, _ = sim.simulate_cell(name, sim.cell_rng(2, name, 1, i), session)
            maps.append(preprocess_map(opd, Meta(units="nm", pixel_size_um=session.pixel_size_um)).opd)
    X, names = feature_matrix(maps, 0.25)
    assert X.shape == (10, len(FEATURE_NAMES)) and names == list(FEATURE_NAMES)
    assert np.isfinite(X).all()
    diameters = X[:, names.index("equivalent_diameter_um")]
    assert diameters[:2].mean() > diameters[-2:].mean()  # SW480 > PBMCs


def test_feature_matrix_accepts_one_pixel_size_per_map():
    X, _ = feature_matrix([disk(0.15), disk(0.3)], [0.15, 0.3])
    assert X[0, 0] == pytest.approx(X[1, 0], rel=0.05)
