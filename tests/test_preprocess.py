"""Tests of opdcells.preprocess on synthetic ellipsoid cells (analytic dry mass) and the real HL60 series."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from helpers import disc_field
from scipy import ndimage as ndi
from skimage import filters
from skimage.transform import downscale_local_mean

from opdcells import preprocess as pp
from opdcells.errors import ExportError, MetadataError
from opdcells.metadata import Meta

ALPHA = 0.19
DELTA_N = 0.03          # refractive index of the cell minus that of the medium
OUT_PX = pp.DEFAULT_CONFIG.out_pixel_size_um


def ellipsoid_opd(shape, pixel_size_um, centre_um, semi_axes_um, delta_n=DELTA_N, supersample=5):
    """OPD (nm) of a homogeneous ellipsoid, pixels area-averaged; and its dry mass V * delta_n / alpha (pg).

    semi_axes_um: (a along rows, b along columns, c along the optical axis).
    """
    a, b, c = semi_axes_um
    rows = (np.arange(shape[0] * supersample) + 0.5) / supersample * pixel_size_um - centre_um[0]
    cols = (np.arange(shape[1] * supersample) + 0.5) / supersample * pixel_size_um - centre_um[1]
    inside = 1.0 - (rows[:, None] / a) ** 2 - (cols[None, :] / b) ** 2
    fine = 2.0 * c * delta_n * np.sqrt(np.clip(inside, 0.0, None)) * 1000.0
    mass = 4.0 / 3.0 * np.pi * a * b * c * delta_n / ALPHA
    return downscale_local_mean(fine, (supersample, supersample)), mass


def add_background(opd_nm, rng, noise_nm=2.0, offset_nm=40.0, tilt_nm=(150.0, -90.0), curvature_nm=0.0):
    """Add an offset, a tilt and curvature (nm across the map) and white noise."""
    y = np.linspace(-0.5, 0.5, opd_nm.shape[0])[:, None]
    x = np.linspace(-0.5, 0.5, opd_nm.shape[1])[None, :]
    background = offset_nm + tilt_nm[0] * y + tilt_nm[1] * x + curvature_nm * (x ** 2 + 2 * y ** 2 + x * y)
    return opd_nm + background + rng.normal(0.0, noise_nm, opd_nm.shape)


def test_to_opd_nm_converts_units():
    data = np.array([[0.5, -1.0], [2.0, 0.0]])
    np.testing.assert_array_equal(pp.to_opd_nm(data, "nm"), data)
    np.testing.assert_allclose(pp.to_opd_nm(data, "um"), data * 1000)
    # 2 pi rad of phase = one wavelength of optical path
    np.testing.assert_allclose(pp.to_opd_nm(np.full((2, 2), 2 * np.pi), "rad", 633.0), 633.0)
    np.testing.assert_allclose(pp.to_opd_nm(data, "rad", 500.0), data * 500 / (2 * np.pi))
    assert pp.to_opd_nm(data.astype(np.float32), "nm").dtype == np.float64
    assert pp.to_opd_nm(data, "nm") is not data


@pytest.mark.parametrize("units, wavelength, reason", [
    ("rad", None, "wavelength_nm"), ("rad", -5.0, "wavelength_nm"), ("mm", None, "unknown units")])
def test_to_opd_nm_rejects_bad_metadata(units, wavelength, reason):
    with pytest.raises(MetadataError, match=reason) as err:
        pp.to_opd_nm(np.ones((8, 8)), units, wavelength, path="cell.mat")
    assert err.value.path == "cell.mat"


def _nan_filled():
    data = np.random.default_rng(0).normal(size=(32, 32))
    data[:, :10] = np.nan
    return data


@pytest.mark.parametrize("data, reason", [
    (np.ones((4, 16, 16)), "2-D"),
    (np.ones(64), "2-D"),
    (np.arange(7 * 40, dtype=float).reshape(7, 40), "too small"),
    (_nan_filled(), "NaN"),
    (np.zeros((32, 32)), "all zeros"),
    (np.full((32, 32), 3.5), "constant"),
    (np.ones((32, 32)) * (1 + 1j), "real numbers"),
    (np.eye(32, dtype=bool), "real numbers"),
])
def test_check_map_rejects_unusable_maps(data, reason):
    with pytest.raises(ExportError, match=reason) as err:
        pp.check_map(data, "export/cell_7.tif")
    assert str(err.value).startswith("export/cell_7.tif: ")


def test_few_nonfinite_pixels_are_accepted_and_filled_from_neighbours():
    data = np.arange(64 * 64, dtype=float).reshape(64, 64)
    holes = [(10, 10), (30, 41), (63, 0)]
    broken = data.copy()
    for i, (r, c) in enumerate(holes):
        broken[r, c] = [np.nan, np.inf, -np.inf][i]
    pp.check_map(broken, "x.npy")  # 3 of 4096 pixels: filled, not rejected
    filled = pp.fill_nonfinite(broken)
    assert np.isfinite(filled).all()
    untouched = np.ones(data.shape, bool)
    for r, c in holes:
        untouched[r, c] = False
        neighbours = data[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2]
        assert filled[r, c] in neighbours and filled[r, c] != data[r, c]
    np.testing.assert_array_equal(filled[untouched], data[untouched])


@pytest.mark.parametrize("order, curvature", [(1, 0.0), (2, 120.0)])
def test_remove_background_recovers_cell_under_tilt_offset_and_curvature(order, curvature):
    rng = np.random.default_rng(1)
    truth, _ = ellipsoid_opd((160, 160), 0.25, (18.0, 22.0), (5.0, 6.0, 3.0))
    raw = add_background(truth, rng, curvature_nm=curvature)
    corrected = pp.remove_background(raw, order=order, pixel_size_um=0.25)
    error = corrected - truth
    assert abs(error.mean()) < 0.3                 # offset removed (noise 2 nm)
    assert error.std() < 2.2                       # nothing but the noise is left
    assert abs(error[truth > 0].mean()) < 0.5      # cell OPD unbiased
    if order == 2:  # a plane cannot take out the curvature: the order matters
        plane_error = pp.remove_background(raw, order=1, pixel_size_um=0.25) - truth
        assert plane_error.std() > 3 * error.std()


def test_remove_background_refits_outside_a_cell_lying_in_the_border_frame():
    # the first guess (border frame) is biased by the cell; the refits outside the cell mask are not
    truth, _ = ellipsoid_opd((160, 160), 0.25, (20.0, 6.6), (5.0, 6.0, 3.0))
    raw = add_background(truth, np.random.default_rng(8))
    error = pp.remove_background(raw, pixel_size_um=0.25) - truth
    assert abs(error.mean()) < 0.3 and error.std() < 2.2


def test_remove_background_with_given_mask_fits_only_outside_it():
    truth, _ = ellipsoid_opd((64, 64), 0.25, (8.0, 8.0), (4.0, 4.0, 3.0))
    raw = add_background(truth, np.random.default_rng(0), noise_nm=0.0)
    corrected = pp.remove_background(raw, mask=truth > 0, order=1)
    np.testing.assert_allclose(corrected, truth, atol=1e-9)
    # a mask that leaves no background: clear error naming the file
    with pytest.raises(ExportError, match="background") as err:
        pp.remove_background(raw, mask=np.ones(raw.shape, bool), path="full.mat")
    assert err.value.path == "full.mat"


def test_cell_mask_takes_the_cell_not_brighter_debris():
    rng = np.random.default_rng(2)
    cell, _ = ellipsoid_opd((120, 120), 0.25, (15.0, 15.0), (5.0, 5.0, 3.0))
    debris, _ = ellipsoid_opd((120, 120), 0.25, (3.0, 27.0), (0.8, 0.8, 2.0), delta_n=0.2)
    assert debris.max() > cell.max()
    opd = cell + debris + rng.normal(0, 1.0, cell.shape)
    mask = pp.cell_mask(opd, 0.25)
    assert mask[60, 60] and not mask[12, 108]
    assert cell[mask].sum() > 0.999 * cell.sum()   # the whole cell footprint is inside
    assert ndi.label(mask)[1] == 1
    core = pp.cell_mask(opd, 0.25, margin_um=0.0)
    assert core.sum() < mask.sum() and mask[core].all()


@pytest.mark.parametrize("bump_nm", [0.0, 3.0])
def test_noise_without_a_clear_cell_is_refused(bump_nm):
    noise = np.random.default_rng(3).normal(0, 2.0, (100, 100))
    noise += ellipsoid_opd(noise.shape, 0.25, (12.0, 12.0), (5.0, 5.0, 1.0), delta_n=bump_nm / 2000)[0]
    with pytest.raises(ExportError, match="no cell|background") as err:
        pp.preprocess_map(noise, Meta(units="nm", pixel_size_um=0.25), path="empty.tif")
    assert err.value.path == "empty.tif"


@pytest.mark.parametrize("pixel_size", [0.1, 0.139, 0.2, 0.35, 0.5])
def test_resample_conserves_integral_and_matches_direct_sampling(pixel_size):
    n = int(round(30 / pixel_size))
    opd, _ = ellipsoid_opd((n, n), pixel_size, (15.0, 14.0), (5.0, 6.0, 3.0))
    noisy = opd + np.random.default_rng(4).normal(0, 2.0, opd.shape)
    out = pp.resample(noisy, pixel_size, OUT_PX)
    assert out.shape == (int(np.ceil(n * pixel_size / OUT_PX - 1e-9)),) * 2
    np.testing.assert_allclose(out.sum() * OUT_PX ** 2, noisy.sum() * pixel_size ** 2, rtol=1e-9)
    # the same cell drawn directly on the output grid (same field centre) looks the same
    offset = (out.shape[0] * OUT_PX - n * pixel_size) / 2
    direct, _ = ellipsoid_opd(out.shape, OUT_PX, (15.0 + offset, 14.0 + offset), (5.0, 6.0, 3.0))
    clean = pp.resample(opd, pixel_size, OUT_PX)
    assert np.sqrt(np.mean((clean - direct) ** 2)) < 0.01 * direct.max()


def test_centre_crop_puts_the_cell_centroid_in_the_middle_and_pads_with_zeros():
    opd, _ = ellipsoid_opd((60, 90), 0.25, (5.6, 16.1), (3.0, 4.0, 2.0))
    crop = pp.centre_crop(opd + 0.0, 128, mask=opd > 0)
    assert crop.shape == (128, 128)
    np.testing.assert_allclose(ndi.center_of_mass(crop), (64, 64), atol=0.75)
    assert crop.sum() == pytest.approx(opd.sum())       # nothing cut off
    assert (crop[:30] == 0).all() and (crop[:, -10:] == 0).all()   # padding
    big = np.pad(opd, 100)
    np.testing.assert_array_equal(pp.centre_crop(big, 128, mask=big > 0), crop)


def test_dry_mass_formula_and_analytic_ellipsoid():
    # 100 nm over 10 x 10 px of 1 um: 0.1 um * 100 um^2 = 10 um^3 of OPD; / 0.19 um^3/pg
    assert pp.dry_mass_pg(np.full((10, 10), 100.0), 1.0) == pytest.approx(10 / 0.19)
    assert pp.dry_mass_pg(np.full((10, 10), 100.0), 1.0, alpha_ml_per_g=0.18) == pytest.approx(10 / 0.18)
    half = np.zeros((10, 10), bool)
    half[:5] = True
    assert pp.dry_mass_pg(np.full((10, 10), 100.0), 1.0, mask=half) == pytest.approx(5 / 0.19)
    for px in (0.1, 0.25, 0.5):
        n = int(round(20 / px))
        opd, mass = ellipsoid_opd((n, n), px, (10.0, 10.0), (5.0, 4.0, 3.5))
        assert pp.dry_mass_pg(opd, px) == pytest.approx(mass, rel=1e-3)
    with pytest.raises(ValueError):
        pp.dry_mass_pg(opd, 0.0)


@pytest.mark.parametrize("pixel_size", [0.1, 0.17, 0.25, 0.35, 0.5])
def test_preprocess_conserves_dry_mass_of_synthetic_cell(pixel_size):
    rng = np.random.default_rng(5)
    n = int(round(36 / pixel_size))
    truth, mass = ellipsoid_opd((n, n), pixel_size, (16.3, 19.1), (6.0, 4.5, 3.0))
    raw = add_background(truth, rng)
    result = pp.preprocess_map(raw, Meta(units="nm", pixel_size_um=pixel_size), path="syn.npy")
    assert result.opd.shape == (128, 128) and result.opd.dtype == np.float32
    assert result.dry_mass_pg == pytest.approx(mass, rel=0.03)
    assert pp.dry_mass_pg(result.opd, OUT_PX) == pytest.approx(mass, rel=0.03)
    np.testing.assert_allclose(ndi.center_of_mass(np.clip(result.opd, 0, None)), (64, 64), atol=1.0)
    assert np.pi * 6.0 * 4.5 <= result.area_um2 < 1.35 * np.pi * 6.0 * 4.5
    # outside the cell the output is exactly 0: the 36 um input field leaves no outline in it
    rows, cols = np.indices(result.opd.shape)
    assert (result.opd[np.hypot(rows - 64, cols - 64) > 40] == 0).all()
    assert (result.opd != 0).sum() * OUT_PX ** 2 < 2 * result.area_um2


def test_preprocess_phase_input_equals_opd_input():
    opd, _ = ellipsoid_opd((100, 100), 0.2, (10.0, 10.0), (5.0, 5.0, 3.0))
    raw = add_background(opd, np.random.default_rng(6))
    phase = raw * 2 * np.pi / 532.0
    from_nm = pp.preprocess_map(raw, Meta(units="nm", pixel_size_um=0.2))
    from_rad = pp.preprocess_map(phase, Meta(units="rad", wavelength_nm=532.0, pixel_size_um=0.2))
    np.testing.assert_allclose(from_rad.opd, from_nm.opd, atol=1e-3)
    assert from_rad.dry_mass_pg == pytest.approx(from_nm.dry_mass_pg)


def test_preprocess_refuses_incomplete_metadata_and_bad_config():
    with pytest.raises(MetadataError, match="wavelength_nm") as err:
        pp.preprocess_map(np.ones((32, 32)), Meta(units="rad", pixel_size_um=0.2), path="a/b.mat")
    assert err.value.path == "a/b.mat"
    with pytest.raises(ValueError, match="order"):
        pp.PreprocessConfig(background_order=3)
    with pytest.raises(ValueError, match="out_pixel_size_um"):
        pp.PreprocessConfig(out_pixel_size_um=0.0)


@pytest.fixture(scope="module")
def hl60_series(real_qpi):
    qpimage = pytest.importorskip("qpimage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        series = qpimage.QPSeries(h5file=str(real_qpi / "hl60_qlsi_series" / "series.h5"), h5mode="r")
        phases = [series[i].pha for i in range(0, len(series), 20)]
        meta = series[0].meta
    return phases, meta


def test_hl60_dry_mass_is_conserved_by_preprocessing(hl60_series):
    """Real HL60 (647 nm, 0.139 um/px): dry mass at native resolution, after resampling to 0.25 um, and
    the plain integral of the author's background-corrected map agree within 3 %; the cell seen from
    different rotation angles has the same dry mass (a projection integral)."""
    phases, meta = hl60_series
    assert meta["wavelength"] == pytest.approx(647e-9) and meta["pixel size"] == pytest.approx(0.139e-6)
    info = Meta(units="rad", wavelength_nm=647.0, pixel_size_um=0.139)
    rng = np.random.default_rng(7)
    masses = []
    for phase in phases:
        independent = pp.dry_mass_pg(pp.to_opd_nm(phase, "rad", 647.0), 0.139)
        tilted = phase + 0.6 + np.linspace(0, 0.8, phase.shape[1])[None, :] + rng.normal(0, 0.01, phase.shape)
        for data in (phase, tilted):
            result = pp.preprocess_map(data, info, path="series.h5")
            resampled = pp.dry_mass_pg(result.opd, OUT_PX)
            assert resampled == pytest.approx(result.dry_mass_pg, rel=0.03)
            assert result.dry_mass_pg == pytest.approx(independent, rel=0.03)
        masses.append(result.dry_mass_pg)
    assert 100 < np.mean(masses) < 300           # pg, a large leukaemia cell
    assert np.std(masses) / np.mean(masses) < 0.03


def test_config_round_trips_through_stored_settings():
    config = pp.PreprocessConfig(out_pixel_size_um=0.5, out_size=96, background_order=2, alpha_ml_per_g=0.18)
    assert pp.PreprocessConfig.from_settings(config.as_settings()) == config
    assert pp.PreprocessConfig.from_settings({"out_size": 64}) == pp.PreprocessConfig(out_size=64)


# ------------------------------------------------------------------ fast paths equal the plain operations


def random_blobs(rng, shape=(61, 47), n=6):
    """A boolean map of a few random discs (some touching the edge, some with holes)."""
    rows, cols = np.indices(shape)
    mask = np.zeros(shape, bool)
    for _ in range(n):
        r, c, radius = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(2, 9)
        mask |= (rows - r) ** 2 + (cols - c) ** 2 <= radius ** 2
    mask[rng.random(shape) < 0.05] ^= True       # specks and holes
    return mask


@pytest.mark.parametrize("seed", range(4))
def test_fill_holes_and_dilate_equal_scipy_on_the_whole_map(seed):
    rng = np.random.default_rng(seed)
    mask = random_blobs(rng)
    np.testing.assert_array_equal(pp.fill_holes(mask), ndi.binary_fill_holes(mask))
    for radius in (0.7, 2.0, 4.5):
        np.testing.assert_array_equal(pp.dilate(mask, radius), ndi.distance_transform_edt(~mask) <= radius)
    single = np.zeros((40, 40), bool)
    single[38, 1] = True                          # a box reaching past two edges
    np.testing.assert_array_equal(pp.dilate(single, 3.2), ndi.distance_transform_edt(~single) <= 3.2)
    thin = np.zeros((3, 20), bool)
    thin[1, 5] = True                             # a map less tall than the disk
    np.testing.assert_array_equal(pp.dilate(thin, 4.6), ndi.distance_transform_edt(~thin) <= 4.6)


@pytest.mark.parametrize("seed", range(3))
def test_longest_axis_equals_scikit_image_major_axis(seed):
    from skimage.measure import label, regionprops

    blobs = label(random_blobs(np.random.default_rng(seed)))
    for region in regionprops(blobs)[:5]:
        assert pp._longest_axis_px(blobs == region.label) == pytest.approx(region.axis_major_length, rel=1e-9)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_background_fit_equals_least_squares_and_smooths_once(order):
    rng = np.random.default_rng(order)
    opd = add_background(ellipsoid_opd((70, 90), 0.2, (7.0, 9.0), (3.0, 4.0, 2.0))[0], rng,
                         curvature_nm=30.0)
    use = ~random_blobs(rng, opd.shape, n=3)
    y, x = np.linspace(-1, 1, opd.shape[0])[:, None], np.linspace(-1, 1, opd.shape[1])[None, :]
    powers = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]
    design = np.stack([np.broadcast_to(x ** i * y ** j, opd.shape)[use] for i, j in powers], axis=1)
    coef = np.linalg.lstsq(design, opd[use], rcond=None)[0]
    expected = sum(c * x ** i * y ** j for c, (i, j) in zip(coef, powers, strict=True))
    np.testing.assert_allclose(pp._fit_surface(opd, use, order, "x"), expected, rtol=1e-9, atol=1e-9)
    corrected, smoothed, objects = pp._background_removed(opd, pp.smooth(opd, 0.2), order, 0.2, "x")
    np.testing.assert_allclose(smoothed, pp.smooth(corrected, 0.2), atol=1e-9 * np.abs(opd).max())
    if objects is not None:   # the refits stopped early: the objects of the final map, found already
        assert np.array_equal(objects, pp._smoothed_objects(smoothed, 0.2))
    plain = opd - pp._fit_surface(opd, pp._border_frame(opd.shape), order, "x")    # the refits, as written
    for _ in range(2):
        plain = opd - pp._fit_surface(opd, ~pp.foreground_mask(plain, 0.2), order, "x")
    np.testing.assert_allclose(corrected, plain, rtol=1e-9, atol=1e-9 * np.abs(opd).max())


@pytest.mark.parametrize("pixel_size", [0.17, 0.25, 0.4])
def test_resampling_the_cell_box_equals_resampling_the_whole_map(pixel_size):
    opd, _ = ellipsoid_opd((80, 70), pixel_size, (6.0, 5.0), (3.0, 2.5, 2.0))
    mask = pp.dilate(opd > 5.0, 2.0)
    support, resampled = pp._resample_cell(opd, mask, pixel_size, OUT_PX)
    whole_support = pp.resample(mask.astype(float), pixel_size, OUT_PX) > pp.SUPPORT_FRACTION
    whole = np.where(whole_support, pp.resample(np.where(mask, opd, 0.0), pixel_size, OUT_PX), 0.0)
    np.testing.assert_array_equal(support, whole_support)
    np.testing.assert_allclose(resampled, whole, rtol=1e-9, atol=1e-9 * opd.max())


def _arrays_for_medians(rng):
    """Odd and even sizes, ties, sorted values, and values whose strided sample misses the middle."""
    yield rng.normal(size=1)
    yield rng.normal(size=2)
    yield rng.normal(size=27_001)
    yield rng.normal(size=27_000) * 3 + np.where(rng.random(27_000) < 0.05, 300.0, 0.0)
    yield rng.integers(0, 4, 20_000).astype(np.float64)                        # many ties at the middle
    yield np.sort(rng.normal(size=9_999))
    misleading = rng.normal(size=16 * 500)
    misleading[::pp.MEDIAN_SAMPLE_STEP] += 1e6                                  # the sample sees only these
    yield misleading


def test_median_and_robust_level_equal_numpys_bit_for_bit():
    """The selection (a sample brackets the middle, only the values inside are partitioned; all of them when
    the bracket misses) gives np.median's float exactly, and the robust level its MAD exactly."""
    for values in _arrays_for_medians(np.random.default_rng(3)):
        level = float(np.median(values))
        assert pp._median_in_place(values.copy()) == level
        assert pp._robust_level(values.copy()) == (level, 1.4826 * float(np.median(np.abs(values - level))))
    assert np.isnan(pp._median_in_place(np.zeros(0)))


def test_background_refits_stop_when_they_would_repeat_with_the_same_result():
    """A cell on a tilted plane: the second refit's pixels are the first's, so the loop stops with the
    objects already found; the corrected maps are those of both refits made, bit for bit."""
    opd = disc_field((80, 90), [(20.0, 22.0)], seed=2).astype(np.float64) + np.linspace(0, 60, 90)[None, :]
    px, order = 0.5, 1
    smoothed = pp.smooth(opd, px)
    corrected, smoothed_corrected, objects = pp._background_removed(opd, smoothed, order, px, "x")
    assert objects is not None
    basis, smooth_basis = pp._surface_basis(opd.shape, order), pp._smoothed_basis(opd.shape, order, px)
    coef = pp._surface_coefficients(opd, pp._border_frame(opd.shape), order, "x")
    for _ in range(2):                                                          # the loop as it was
        found = pp._smoothed_objects(smoothed - (coef @ smooth_basis).reshape(opd.shape), px)
        coef = pp._surface_coefficients(opd, ~pp.dilate(found, pp.MASK_MARGIN_UM / px), order, "x")
    assert np.array_equal(corrected, opd - (coef @ basis).reshape(opd.shape))
    final = smoothed - (coef @ smooth_basis).reshape(opd.shape)
    assert np.array_equal(smoothed_corrected, final)
    assert np.array_equal(objects, pp._smoothed_objects(final, px))


def _arrays_for_histograms(rng):
    """Noise at several scales and offsets, values lying on numpy's bin edges and one ulp beside them, ties,
    an offset huge against the range, and a constant map (skimage's own path)."""
    first, last = -37.5, 412.25
    edges = np.linspace(first, last, pp.OTSU_BINS + 1)
    on_edges = np.concatenate([rng.choice(edges, 5000), [first, last]])
    yield rng.normal(size=(166, 176)) * 3 + np.where(rng.random((166, 176)) < 0.1, 250.0, 0.0)
    yield rng.normal(size=(40, 50)) * 1e-3 + 800.0
    yield on_edges.reshape(1, -1)
    yield np.clip(np.nextafter(on_edges, rng.choice([-np.inf, np.inf], on_edges.size)), first, last)[None]
    yield rng.integers(0, 5, (30, 30)).astype(np.float64)
    yield 1e8 + rng.normal(size=(20, 30)) * 1e-3
    yield np.full((9, 9), 3.0)


def test_otsu_threshold_and_histogram_equal_scikit_image_and_numpy():
    """The histogram counted without np.histogram's copies, its edge tests made only near the edges, gives
    np.histogram's counts, so the threshold is scikit-image's, bit for bit."""
    for image in _arrays_for_histograms(np.random.default_rng(4)):
        assert pp._otsu_threshold(image) == filters.threshold_otsu(image)
        if image.min() < image.max():
            edges = np.linspace(image.min(), image.max(), pp.OTSU_BINS + 1)
            assert np.array_equal(pp._uniform_histogram(image.ravel(), edges),
                                  np.histogram(image, pp.OTSU_BINS)[0])


def test_stands_out_proven_by_counting_only_where_the_medians_agree():
    """The counting proof never says a peak stands out where the robust level's test says it does not
    (peaks at the exact bound, one ulp above, just below), and it does prove a clear cell."""
    rng = np.random.default_rng(6)
    proven = 0
    for trial in range(300):
        values = rng.normal(size=int(rng.integers(100, 20_000))) * rng.uniform(0.1, 5) + rng.uniform(-50, 50)
        if trial % 3 == 0:
            values[:values.size // 10] += rng.uniform(0, 100)                  # a cell's edge left in
        if trial % 5 == 0:
            values = np.round(values, 1)                                        # ties
        level, sigma = pp._robust_level(values.copy())
        bound = level + 2 * pp.NOISE_K * sigma
        for peak in (bound, np.nextafter(bound, np.inf), bound - 1e-9, bound + 1e-3 * abs(bound)):
            assert not pp._surely_above(values, peak) or peak > bound
        proven += pp._surely_above(values, bound + 100 * sigma + 1.0)
    assert proven > 250


def test_specks_and_integrated_opd_equal_scikit_image_and_scipy_bit_for_bit():
    from skimage import morphology

    rng = np.random.default_rng(3)
    for speck_px in (0, 1, 4, 9):
        for density in (0.2, 0.5, 0.7):
            mask = rng.random((40, 37)) < density      # objects of every size, some exactly speck_px
            assert np.array_equal(pp._without_specks(mask, speck_px),
                                  morphology.remove_small_objects(mask, max_size=speck_px))
    labels = ndi.label(rng.random((50, 50)) < 0.4)[0]
    opd = rng.normal(0, 30, labels.shape)
    n = int(labels.max())
    ids = np.arange(1, n + 1)
    sums = np.bincount(labels.ravel(), weights=opd.ravel(), minlength=n + 1)[1:]
    assert np.array_equal(sums, ndi.sum_labels(opd, labels, index=ids))   # cell_mask's sums: scipy's own
    chosen = pp.cell_mask(opd, 0.25, margin_um=0.0, labels=labels)
    assert np.array_equal(chosen, labels == 1 + int(np.argmax(ndi.sum_labels(opd, labels, index=ids))))


def test_wrapped_phase_is_refused_whether_or_not_some_pixels_are_not_finite():
    rows = np.arange(64)[:, None] * np.ones((1, 64))
    wrapped = np.angle(np.exp(1j * 0.4 * rows))           # jumps of 2 pi every ~16 rows, all in (-pi, pi]
    with pytest.raises(ExportError, match=r"wrapped phase: .*\(-3\.13 to 3\.03 rad\)"):
        pp.check_not_wrapped(wrapped, "w.mat")
    holed = wrapped.copy()
    holed[3, 5], holed[10, 10] = np.nan, np.inf          # the range is that of the finite values
    with pytest.raises(ExportError, match=r"\(-3\.13 to 3\.03 rad\)"):
        pp.check_not_wrapped(holed, "w.mat")
    pp.check_not_wrapped(0.4 * rows, "unwrapped.mat")     # spans more than 2 pi: accepted
    pp.check_not_wrapped(np.full((8, 8), np.nan), "no-finite-value.mat")
    pp.check_not_wrapped(np.zeros((0, 8)), "empty.mat")
