"""opdcells.predict: new exports -> the same ingest path as load_data.py -> batched predictions CSV."""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import scipy.io
from helpers import disc_field, simulated_opd, tiny_run, write_exports

pytest.importorskip("tensorflow")

from opdcells import cli  # noqa: E402
from opdcells.ingest import iter_processed  # noqa: E402
from opdcells.predict import DROPPED_COLUMNS, csv_columns, dropped_path, ingest_options, predict_files  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_run(tmp_path_factory, "mobilenetv2", "five_class").model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return write_exports(tmp_path_factory.mktemp("exports"), per_class=2)


class CountingModel:
    """A SavedModel whose predict_proba calls are recorded."""

    def __init__(self, model):
        self._model, self.calls, self.tta = model, [], []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def predict_proba(self, maps, batch_size=64, tta=None):
        self.calls.append(len(maps))
        self.tta.append(tta)
        return self._model.predict_proba(maps, batch_size=batch_size, tta=tta)


def test_csv_has_one_row_per_map_and_probabilities_summing_to_one(model, exports, tmp_path):
    result = predict_files(model, [exports[0].parent], tmp_path / "preds.csv")
    table = pd.read_csv(result.out)
    assert list(table.columns) == csv_columns(model.class_names, ["ood_score", "ood_flag"])
    assert [f"p_{c}" for c in model.class_names] == [c for c in table.columns if c.startswith("p_")]
    assert sorted(table["file"]) == sorted(str(p) for p in exports)
    assert (table["index"] == 0).all()
    whole_maps = ["cell", "object", "centroid_row_px", "centroid_col_um", "bbox_row0", "bbox_col1"]
    assert table[whole_maps].isna().all().all()   # no position: these exports are single-cell maps
    measured = {str(path): p for path in exports for _, p, _ in iter_processed(path, ingest_options(model))}
    for column in ("dry_mass_pg", "area_um2"):   # as preprocessing measured them
        np.testing.assert_allclose(table[column], [getattr(measured[f], column) for f in table["file"]],
                                   rtol=1e-5)
    assert pd.read_csv(result.dropped_out).empty and result.dropped_out.name == "preds.dropped.csv"
    proba = table[[f"p_{c}" for c in model.class_names]].to_numpy()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert list(table["predicted"]) == [model.class_names[k] for k in proba.argmax(axis=1)]
    assert (result.n_maps, result.n_files, result.status) == (len(exports), len(exports), 0)


def test_predictions_use_the_ingest_path_at_the_models_pixel_size(model, exports, tmp_path):
    options = ingest_options(model)
    assert options.config.out_pixel_size_um == model.config["pixel_size_um"]
    assert options.config.out_size == model.config["out_size"]
    maps = np.stack([p.opd for path in exports for _, p, _ in iter_processed(path, options)])
    expected = model.predict_proba(maps)
    table = pd.read_csv(predict_files(model, exports, tmp_path / "preds.csv").out)
    np.testing.assert_allclose(table[[f"p_{c}" for c in model.class_names]].to_numpy(), expected,
                               rtol=1e-4, atol=1e-6)


def test_maps_of_several_files_share_batches(model, exports, tmp_path):
    counting = CountingModel(model)
    result = predict_files(counting, exports, tmp_path / "preds.csv", batch_size=3)
    assert counting.calls == [3, len(exports) - 3]
    assert result.n_maps == len(exports)
    assert counting.tta == [None, None]   # None: the model's own test-time augmentation setting


def test_test_time_augmentation_can_be_turned_off(model, exports, tmp_path):
    counting = CountingModel(model)
    table = pd.read_csv(predict_files(counting, exports, tmp_path / "preds.csv", tta=False).out)
    assert counting.tta == [False]
    maps = np.stack([p.opd for path in exports for _, p, _ in iter_processed(path, ingest_options(model))])
    np.testing.assert_allclose(table[[f"p_{c}" for c in model.class_names]].to_numpy(),
                               model.predict_proba(maps, tta=False), rtol=1e-4, atol=1e-6)


def test_bad_files_are_reported_and_skipped(model, exports, tmp_path, caplog):
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"not a MATLAB file at all")
    empty = tmp_path / "nan_map.mat"
    scipy.io.savemat(empty, {"phase": np.full((64, 64), np.nan), "units": "rad", "wavelength_nm": 633.0,
                             "pixel_size_um": 0.5})
    missing = tmp_path / "missing.mat"
    with caplog.at_level(logging.WARNING, logger="opdcells"):
        paths = [exports[0], garbage, empty, missing, exports[1]]
        result = predict_files(model, paths, tmp_path / "preds.csv")
    assert result.status == 1 and result.n_files == 2
    assert len(result.skipped_files) == 3
    for bad in (garbage, empty, missing):
        assert any(str(bad) in line for line in result.skipped_files)
        assert any(str(bad) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    table = pd.read_csv(result.out)
    assert list(table["file"]) == [str(exports[0]), str(exports[1])]


def test_user_metadata_fills_what_the_export_lacks(model, tmp_path):
    opd, session = simulated_opd("monocytes", 2, 0, seed=3)
    bare = tmp_path / "bare.mat"
    scipy.io.savemat(bare, {"phase": opd * 2 * math.pi / session.wavelength_nm})
    result = predict_files(model, [bare], tmp_path / "a.csv")
    assert result.status == 2 and "metadata" in result.skipped_files[0]
    options = ingest_options(model, units="rad", wavelength_nm=session.wavelength_nm,
                             pixel_size_um=session.pixel_size_um)
    result = predict_files(model, [bare], tmp_path / "b.csv", options=options)
    assert result.status == 0 and result.n_maps == 1


# ------------------------------------------------------------------------------ fields, refusals, atomicity

PX = 0.5
#: Three whole cells and one cut by the field's top edge, (row, col) in um of a 60 x 60 um field.
WHOLE = [(15.0, 15.0), (15.0, 42.0), (42.0, 30.0)]


@pytest.fixture
def field(tmp_path):
    path = tmp_path / "field.npy"
    np.save(path, disc_field((120, 120), [*WHOLE, (1.0, 50.0)], px=PX))
    return path


def test_fields_give_each_cell_its_position_and_list_dropped_objects(model, field, tmp_path, caplog):
    options = ingest_options(model, units="nm", pixel_size_um=PX, fields=True)
    with caplog.at_level(logging.INFO, logger="opdcells"):
        result = predict_files(model, [field], tmp_path / "preds.csv", options=options)
    table = pd.read_csv(result.out)
    assert table["cell"].tolist() == [0, 1, 2] and (table["index"] == 0).all()
    found = sorted(zip(table["centroid_row_um"].round(), table["centroid_col_um"].round(), strict=True))
    assert found == sorted(WHOLE)
    np.testing.assert_allclose(table["centroid_row_px"] * PX, table["centroid_row_um"], rtol=1e-5)
    assert (table["bbox_row0"] < table["centroid_row_px"]).all()
    assert (table["centroid_row_px"] < table["bbox_row1"]).all()
    np.testing.assert_allclose(table["area_um2"], np.pi * 4.0 ** 2, rtol=0.25)   # 8 um discs
    dropped = pd.read_csv(result.dropped_out)
    assert list(dropped.columns) == list(DROPPED_COLUMNS) and len(dropped) == 1
    row = dropped.iloc[0]
    assert row["reason"] == "segmentation: touches the border" and row["bbox_row0"] == 0
    assert row["file"] == str(field) and row["object"] not in set(table["object"])
    logged = [r.getMessage() for r in caplog.records]
    assert any("1 object dropped (1 segmentation: touches the border); listed in" in m for m in logged)
    assert "exports at 0.5 um/px are resampled to the model's 1 um/px" in "\n".join(logged)   # its geometry


@pytest.mark.parametrize(("shape", "centres", "words"), [
    ((120, 120), [*WHOLE, (1.0, 50.0)], ("field of view", "give --fields")),        # a field read as one cell
    ((48, 48), [(12.0, 1.5)], ("touches the edge", "larger window", "--fields")),   # a cell cut by the edge
])
def test_a_field_or_a_cut_cell_is_refused_through_the_cli(model, shape, centres, words, tmp_path, capsys):
    export = tmp_path / "export.npy"
    np.save(export, disc_field(shape, centres, px=PX))
    out = tmp_path / "preds.csv"
    status = cli.main(["predict", str(model.folder), str(export), "--out", str(out), "--units", "nm",
                       "--pixel-size-um", str(PX), "-q"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and str(export) in err, err
    assert all(word in err for word in words), err
    assert pd.read_csv(out).empty
    assert words[0] in pd.read_csv(dropped_path(out))["reason"][0]


def test_an_interrupted_run_leaves_the_old_csv(model, exports, tmp_path):
    class Interrupted(CountingModel):
        def predict_proba(self, maps, batch_size=64, tta=None):
            raise KeyboardInterrupt

    out = tmp_path / "preds.csv"
    out.write_text("old,predictions\n")
    with pytest.raises(KeyboardInterrupt):
        predict_files(Interrupted(model), exports, out)
    assert out.read_text() == "old,predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]   # no temporary file left
