"""Traceability and geometry (issues 15 and 16): where each map lies in its file, refusal of fields read
as single cells and of cells cut by the map's edge, and an output window fitted to the cells."""
from __future__ import annotations

import itertools
import logging
import re

import numpy as np
import pytest
from helpers import disc_field

from load_data import main
from opdcells.dataset import open_dataset
from opdcells.errors import ExportError
from opdcells.ingest import IngestOptions, fit_geometry, iter_processed, output_geometry
from opdcells.metadata import Meta
from opdcells.preprocess import dry_mass_pg, preprocess_map

PX = 0.5
NM = ["--units", "nm", "--pixel-size-um", str(PX)]
#: Three whole cells and one cut by the field's top edge, (row, col) in um of a 60 x 60 um field.
WHOLE = [(15.0, 15.0), (15.0, 42.0), (42.0, 30.0)]
CUT = (1.0, 50.0)


def load(argv, capsys):
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err


@pytest.fixture
def field_file(tmp_path):
    path = tmp_path / "SRC" / "SW480" / "day1" / "field.npy"
    path.parent.mkdir(parents=True)
    np.save(path, disc_field((120, 120), [*WHOLE, CUT], px=PX))
    return path


def test_positions_of_field_cells_and_indices_of_stack_maps_round_trip(field_file, tmp_path, capsys):
    stack = tmp_path / "stack.npy"
    np.save(stack, np.stack([disc_field((48, 48), [(12.0, 12.0)], px=PX, seed=s) for s in range(3)]))
    fields = tmp_path / "fields.h5"
    assert load([field_file.parent.parent.parent, "--out", fields, "--fields", *NM], capsys)[0] == 0
    with open_dataset(fields) as ds:
        origin = ds.origins()
        assert sorted(origin["cell"].tolist()) == [0, 1, 2] and (origin["source_index"] == 0).all()
        rows, cols = np.round(origin["centroid_row_px"]), np.round(origin["centroid_col_px"])
        found = sorted(zip(rows, cols, strict=True))
        assert found == sorted((r / PX, c / PX) for r, c in WHOLE)   # the cell cut by the edge is dropped
        np.testing.assert_allclose(origin["centroid_row_um"], origin["centroid_row_px"] * PX, rtol=1e-6)
        for axis, start, stop in (("row", "bbox_row0", "bbox_row1"), ("col", "bbox_col0", "bbox_col1")):
            centre = origin[f"centroid_{axis}_px"]
            assert ((origin[start] < centre) & (centre < origin[stop])).all()
            np.testing.assert_allclose(origin[stop] - origin[start], 2 * 4.0 / PX, atol=3)   # 8 um discs
    stacks = tmp_path / "stacks.h5"
    assert load([stack, "--label", "SW480", "--out", stacks, *NM], capsys)[0] == 0
    with open_dataset(stacks) as ds:
        origin = ds.origins()
        assert origin["source_index"].tolist() == [0, 1, 2] and (origin["cell"] == -1).all()
        assert np.isnan(origin["centroid_row_um"]).all() and (origin["bbox_col1"] == -1).all()


def test_a_field_read_as_one_cell_is_refused_with_the_fields_hint(field_file, tmp_path, capsys):
    options = IngestOptions(units="nm", pixel_size_um=PX)
    with pytest.raises(ExportError, match="field of view.*give --fields") as info:
        list(iter_processed(field_file, options))
    assert info.value.path == str(field_file)
    status, err = load([field_file, "--label", "SW480", "--out", tmp_path / "ds.h5", *NM, "-q"], capsys)
    assert status == 2 and err.count("\n") == 1 and str(field_file) in err and "--fields" in err, err
    assert not (tmp_path / "ds.h5").exists()


def test_a_cell_cut_by_the_map_edge_is_refused_with_the_fix(tmp_path, capsys):
    cut = tmp_path / "cut.npy"
    np.save(cut, disc_field((40, 40), [(10.0, 2.0)], px=PX))   # an 8 um cell 2 um from the left edge
    status, err = load([cut, "--label", "SW480", "--out", tmp_path / "ds.h5", *NM, "-q"], capsys)
    assert status == 2 and err.count("\n") == 1 and str(cut) in err, err
    assert "touches the edge" in err and "larger window" in err and "--fields" in err


def test_a_neighbour_partly_in_view_does_not_replace_the_cell():
    """Exports of one cell often show part of a bigger neighbour at the edge: the whole cell is kept."""
    alone = disc_field((64, 64), [(16.0, 16.0)], px=PX)
    neighbour = disc_field((64, 64), [(30.0, 2.0)], px=PX, radius_um=6.0) - disc_field((64, 64), [], px=PX)
    with_neighbour = alone + neighbour   # a bigger cell, cut by the left edge
    meta = Meta(units="nm", pixel_size_um=PX)
    masses = [preprocess_map(m, meta).dry_mass_pg for m in (alone, with_neighbour)]
    assert masses[1] == pytest.approx(masses[0], rel=0.05)
    expected = dry_mass_pg(disc_field((64, 64), [(16.0, 16.0)], px=PX, seed=1) - 20.0, PX)
    assert masses[0] == pytest.approx(expected, rel=0.1)


def test_geometry_rules():
    assert fit_geometry(12.0) == (0.25, 128)    # the default window holds 1.25 x 12 um
    assert fit_geometry(30.0) == (0.25, 192)    # 37.5 um needed
    assert fit_geometry(60.0) == (0.5, 192)     # 75 um: over 256 px at 0.25 um/px
    assert fit_geometry(10.0, out_size=64) == (0.25, 64)
    assert fit_geometry(30.0, pixel_size_um=0.1) == (0.1, 384)   # beyond OUT_SIZES: multiples of 32 px


def test_geometry_is_chosen_from_the_cells_and_logged(tmp_path, capsys):
    big = tmp_path / "big"
    big.mkdir()
    for i in range(3):   # 28 um cells (adherent cells): they do not fit the default 32 um window
        np.save(big / f"c{i}.npy", disc_field((100, 100), [(25.0, 25.0)], px=PX, radius_um=14.0, seed=i))
    out = tmp_path / "ds.h5"
    status, err = load([big, "--label", "PC3", "--out", out, *NM], capsys)
    assert status == 0, err
    assert "output geometry 192 px at 0.25 um/px (48 um window) (chosen from the data)" in err
    assert re.search(r"widest of 3 cells measured spans (29|30|31)\.\d um", err), err   # 28 um + mask margin
    with open_dataset(out) as ds:
        assert (ds.out_size, ds.pixel_size_um, len(ds)) == (192, 0.25, 3)
    config, why = output_geometry([(big / "c0.npy", IngestOptions(units="nm", pixel_size_um=PX))],
                                  pixel_size_um=0.5)
    assert (config.out_pixel_size_um, config.out_size) == (0.5, 128) and "--out-size chosen" in why


def test_a_window_too_small_for_the_cells_is_refused_with_the_numbers(tmp_path, capsys):
    path = tmp_path / "cell.npy"
    np.save(path, disc_field((64, 64), [(16.0, 16.0)], px=PX, radius_um=8.0))
    argv = [path, "--label", "SW480", "--out", tmp_path / "ds.h5", *NM, "--out-size", "48",
            "--out-pixel-size-um", "0.25", "-q"]
    status, err = load(argv, capsys)
    assert status == 2 and err.count("\n") == 1 and str(path) in err, err
    assert "1 of 1 cells measured do not fit: the widest spans 18." in err, err
    assert "48 px at 0.25 um/px (12 um)" in err and "needs at least 75 px" in err


def test_objects_segmentation_drops_are_reported_with_their_reason(field_file, caplog):
    dropped = []
    options = IngestOptions(units="nm", pixel_size_um=PX, fields=True)
    with caplog.at_level(logging.INFO, logger="opdcells"):
        kept = list(iter_processed(field_file, options, on_error=lambda exc: None, on_drop=dropped.append))
    assert len(kept) == 3
    [cut] = dropped
    assert cut.reason == "segmentation: touches the border" and cut.bbox[0] == 0 and cut.index == 0
    assert cut.label not in {p.position.label for _, p, _ in kept}


# ------------------------------------------------------------------------------------ real data


def test_shipped_real_data_loads_without_false_refusals(real_qpi):
    """Single-cell exports load as cells; the red blood cell fields only as fields."""
    def first(path, n=5, **options):
        return list(itertools.islice(iter_processed(path, IngestOptions(**options)), n))

    assert len(first(real_qpi / "hl60_qlsi_series" / "series.h5")) == 5
    assert len(first(real_qpi / "hl60_hologram" / "hologram_cell.npz", hologram=True, pixel_size_um=0.107,
                     wavelength_nm=633.0)) == 1
    assert len(first(real_qpi / "phasics_opd" / "single_phasics.tif", pixel_size_um=0.3)) == 1
    rbc = real_qpi / "rbc_phase_fields" / "gt_phase1.mat"
    rbc_options = {"units": "rad", "wavelength_nm": 532.0, "pixel_size_um": 0.38}
    cells = first(rbc, 100, fields=True, **rbc_options)
    assert len(cells) >= 20 and len({p.position.cell for _, p, _ in cells}) == len(cells)
    with pytest.raises(ExportError, match="give --fields"):
        first(rbc, **rbc_options)
