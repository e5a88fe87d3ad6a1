"""Simulator: physics of the voxelised cell models, imaging, determinism, exports and truth table."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from opdcells import simulate as sim
from opdcells.errors import DatasetError

MEDIUM = 1.335


def grid(half_um: float, px: float) -> np.ndarray:
    """Pixel centres symmetric about 0 with a pixel exactly at 0."""
    n = int(half_um / px)
    return np.arange(-n, n + 1) * px


def sphere(d: float, tissue=sim.CYTOPLASM, centre=(0.0, 0.0, 0.0), over=None) -> sim.Part:
    return sim.Part(sim.Ellipsoid((d / 2, d / 2, d / 2), centre), tissue, over)


@pytest.fixture(scope="module")
def session():
    return sim.sample_session(sim.cell_rng(3, "SW620", 1), "SW620", 1)


def test_homogeneous_sphere_peaks_at_diameter_times_contrast():
    d, n = 10.0, 1.37
    x = grid(6.0, 0.2)
    out = sim.render_opd(sim.CellModel([sphere(d)], {sim.CYTOPLASM: n}), x, x, 0.2, MEDIUM)
    expected_peak = d * (n - MEDIUM) * 1e3
    assert out.opd_nm.max() == pytest.approx(expected_peak, rel=0.01)
    assert out.opd_nm[0, 0] == 0.0
    volume = math.pi / 6 * d ** 3
    assert out.volume_fl == pytest.approx(volume, rel=0.02)
    assert out.diameter_um == pytest.approx(d, rel=0.01)
    assert out.dry_mass_pg == pytest.approx(volume * (n - MEDIUM) / sim.ALPHA_UM3_PER_PG, rel=0.02)
    # dry mass is the integral of the OPD map over the area divided by alpha
    assert out.dry_mass_pg == pytest.approx(out.opd_nm.sum() * 1e-3 * 0.2 ** 2 / 0.19, rel=1e-6)


def test_nucleus_with_lower_index_lowers_the_opd_locally():
    x = grid(6.0, 0.2)
    body = sphere(10.0)
    nucleus = sphere(5.0, sim.NUCLEUS, centre=(-2.0, 0.0, 0.0), over=(sim.CYTOPLASM,))
    indices = {sim.CYTOPLASM: 1.37, sim.NUCLEUS: 1.36}
    plain = sim.render_opd(sim.CellModel([body], indices), x, x, 0.2, MEDIUM).opd_nm
    with_nucleus = sim.render_opd(sim.CellModel([body, nucleus], indices), x, x, 0.2, MEDIUM).opd_nm
    centre = np.argmin(np.abs(x))
    at_nucleus, away = (centre, centre - 10), (centre, centre + 15)  # (row, col): x = -2 um, +3 um
    assert with_nucleus[at_nucleus] == pytest.approx(plain[at_nucleus] - 5.0 * 0.01 * 1e3, rel=0.03)
    assert with_nucleus[away] == plain[away]


def test_parts_only_paint_over_allowed_tissues():
    """A granule straddling the cell edge only fills the cytoplasm, never the medium."""
    x = grid(6.0, 0.2)
    body = sphere(10.0)
    granule = sim.Part(sim.Ellipsoid((1.0, 1.0, 1.0), (5.0, 0.0, 0.0)), sim.GRANULE, (sim.CYTOPLASM,))
    indices = {sim.CYTOPLASM: 1.37, sim.GRANULE: 1.40}
    out = sim.render_opd(sim.CellModel([body, granule], indices), x, x, 0.2, MEDIUM)
    plain = sim.render_opd(sim.CellModel([body], indices), x, x, 0.2, MEDIUM)
    assert out.volume_fl == pytest.approx(plain.volume_fl)
    assert out.dry_mass_pg > plain.dry_mass_pg


def test_coherent_image_conserves_phase_integral_and_blurs_with_low_na():
    px = 0.2
    x = grid(8.0, px)
    blob = 0.3 * np.exp(-(x[None, :] ** 2 + x[:, None] ** 2) / (2 * 0.3 ** 2))
    sharp = sim.coherent_image(blob, px, 633.0, 1.2, MEDIUM)
    blurred = sim.coherent_image(blob, px, 633.0, 0.3, MEDIUM)
    assert blurred.sum() == pytest.approx(blob.sum(), rel=0.02)
    assert blurred.max() < 0.6 * blob.max() < sharp.max()
    defocused = sim.coherent_image(blob, px, 633.0, 1.2, MEDIUM, defocus_um=2.0)
    assert np.abs(defocused - sharp).max() > 0.05


def test_simulate_cell_is_deterministic_for_a_seed(session):
    first, truth = sim.simulate_cell("SW620", sim.cell_rng(3, "SW620", 1, 0), session)
    again, truth_again = sim.simulate_cell("SW620", sim.cell_rng(3, "SW620", 1, 0), session)
    other, _ = sim.simulate_cell("SW620", sim.cell_rng(3, "SW620", 1, 1), session)
    np.testing.assert_array_equal(first, again)
    assert truth == truth_again
    assert first.shape == session.shape and np.isfinite(first).all()
    assert not np.allclose(first, other)


def test_sessions_vary_within_documented_ranges():
    sessions = [sim.sample_session(sim.cell_rng(0, "PBMCs", k), "PBMCs", k) for k in range(1, 21)]
    pixels = [s.pixel_size_um for s in sessions]
    assert all(0.15 <= p <= 0.30 for p in pixels) and np.ptp(pixels) > 0.05
    assert {s.wavelength_nm for s in sessions} == {532.0, 633.0}
    assert all(1.335 <= s.medium_index <= 1.337 for s in sessions)
    assert all(31.9 <= n * s.pixel_size_um <= 40.1 for s in sessions for n in s.shape)
    assert any(s.shape[0] != s.shape[1] for s in sessions)  # rectangular fields expose transposition bugs
    assert len({s.session_id for s in sessions}) == 20


def test_unknown_class_is_rejected(session):
    with pytest.raises(ValueError, match="unknown class"):
        sim.simulate_cell("HeLa", np.random.default_rng(0), session)


@pytest.fixture(scope="module")
def truths():
    """Truth of 30 simulated cells per class (two sessions each)."""
    rows = {}
    for name in sim.CLASS_NAMES:
        sessions = [sim.sample_session(sim.cell_rng(1, name, k), name, k) for k in (1, 2)]
        rows[name] = [sim.simulate_cell(name, sim.cell_rng(1, name, 1 + i % 2, i), sessions[i % 2])[1]
                      for i in range(30)]
    return rows


def test_class_sizes_follow_the_literature_order(truths):
    mean = {name: np.mean([t["diameter_um"] for t in rows]) for name, rows in truths.items()}
    assert mean["SW480"] > mean["SW620"] > mean["monocytes"] > mean["granulocytes"] > mean["PBMCs"]
    assert 6.0 < mean["PBMCs"] < 9.5 and 12.5 < mean["SW480"] < 17.0


@pytest.mark.parametrize("name, low, high", [
    ("PBMCs", 15, 90), ("granulocytes", 35, 140), ("monocytes", 50, 220), ("SW620", 80, 350),
    ("SW480", 120, 700)])
def test_dry_mass_in_literature_ranges(truths, name, low, high):
    masses = np.array([t["dry_mass_pg"] for t in truths[name]])
    assert low < np.median(masses) < high
    indices = np.array([t["mean_index"] for t in truths[name]])
    assert ((indices > 1.35) & (indices < 1.39)).all()


def test_class_mixtures_are_respected(truths):
    assert {t["subtype"] for t in truths["granulocytes"]} <= {"neutrophil", "eosinophil"}
    assert {t["subtype"] for t in truths["SW480"]} == {"SW480"}
    assert all(abs(sum(mix.values()) - 1.0) < 1e-9 for mix in sim.CLASS_MIXTURE.values())
    assert all(t in sim.CLASS_PARAMETERS for mix in sim.CLASS_MIXTURE.values() for t in mix)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    truth = sim.simulate_dataset(out, n_per_class=3, seed=5, sessions_per_class=2, progress=False)
    with open(truth, newline="") as fh:
        return out, list(csv.DictReader(fh))


def test_dataset_layout_and_truth_table(dataset):
    out, rows = dataset
    assert len(rows) == 15 and list(rows[0]) == list(sim.TRUTH_COLUMNS)
    assert {r["class"] for r in rows} == set(sim.CLASS_NAMES)
    for row in rows:
        path = out / row["path"]
        assert path.is_file()
        assert path.parts[-3:-1] == (row["class"], row["session"])
    assert (out / "README.txt").read_text().startswith("Simulated OPD maps")
    # session 1 (2 maps) as single-map v5 files, session 2 (last) as one v7.3 stack of 1 map
    assert sorted(p.name for p in (out / "PBMCs").rglob("*.mat")) == ["cell_0000.mat", "cell_0001.mat",
                                                                      "stack.mat"]


def test_v5_files_hold_the_simulated_phase(dataset):
    out, rows = dataset
    row = next(r for r in rows if r["class"] == "monocytes" and r["path"].endswith("cell_0001.mat"))
    mat = scipy.io.loadmat(out / row["path"])
    session = sim.sample_session(sim.cell_rng(5, "monocytes", 1), "monocytes", 1)
    opd, truth = sim.simulate_cell("monocytes", sim.cell_rng(5, "monocytes", 1, 1), session)
    assert mat["phase"].dtype == np.float32 and mat["phase"].shape == session.shape
    np.testing.assert_allclose(mat["phase"], opd * 2 * np.pi / session.wavelength_nm, rtol=1e-6)
    assert mat["wavelength_nm"].item() == session.wavelength_nm == float(row["wavelength_nm"])
    assert mat["pixel_size_um"].item() == session.pixel_size_um == float(row["pixel_size_um"])
    assert mat["medium_index"].item() == session.medium_index
    assert str(mat["units"][0]) == "rad"
    assert float(row["dry_mass_pg"]) == truth["dry_mass_pg"]


def test_v73_stack_is_matlab_layout(dataset):
    out, rows = dataset
    row = next(r for r in rows if r["class"] == "SW480" and r["path"].endswith("stack.mat"))
    path = out / row["path"]
    assert path.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"
    session = sim.sample_session(sim.cell_rng(5, "SW480", 2), "SW480", 2)
    opd, _ = sim.simulate_cell("SW480", sim.cell_rng(5, "SW480", 2, int(row["index"])), session)
    with h5py.File(path, "r") as f:
        assert f.userblock_size == 512
        phase = f["phase"]
        assert phase.shape == (1, session.shape[1], session.shape[0])
        assert phase.attrs["MATLAB_class"] == b"single" and phase.dtype == np.float32
        np.testing.assert_allclose(phase[int(row["index"])].T, opd * 2 * np.pi / session.wavelength_nm,
                                   rtol=1e-6)
        assert f["wavelength_nm"][()].item() == session.wavelength_nm
        assert f["wavelength_nm"].attrs["MATLAB_class"] == b"double"
        assert f["units"].attrs["MATLAB_class"] == b"char"
        assert bytes(f["units"][()].ravel().astype(np.uint8)) == b"rad"


def test_simulate_dataset_is_deterministic_and_replaces_an_earlier_run(dataset, tmp_path):
    out, rows = dataset
    again = sim.simulate_dataset(tmp_path / "again", n_per_class=3, seed=5, sessions_per_class=2,
                                 progress=False)
    with open(again, newline="") as fh:
        assert list(csv.DictReader(fh)) == rows
    first = scipy.io.loadmat(out / rows[0]["path"])["phase"]
    np.testing.assert_array_equal(scipy.io.loadmat(tmp_path / "again" / rows[0]["path"])["phase"], first)
    # fewer maps than sessions: the empty last session gets no (empty) stack
    sim.simulate_dataset(tmp_path / "again", n_per_class=1, seed=6, sessions_per_class=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "again").rglob("*.mat")) == ["cell_0000.mat"] * 5


def test_simulate_dataset_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "thesis.docx").write_text("precious")
    with pytest.raises(DatasetError, match="not empty"):
        sim.simulate_dataset(tmp_path, n_per_class=1, progress=False)
    assert (tmp_path / "thesis.docx").exists()


def test_docs_render_the_parameter_table():
    doc = Path(__file__).resolve().parents[1] / "docs" / "simulator.md"
    assert sim.parameter_table_markdown() in doc.read_text()
