"""Simulated screening samples: counts, truth, determinism across worker counts, readable exports."""
import csv

import h5py
import numpy as np
import pytest

from opdcells.errors import DatasetError
from opdcells.readers import open_export
from opdcells.simulate import cell_rng, sample_session
from opdcells.spikein import parse_spikes, sample_session_of, simulate_sample


def rows(truth):
    with open(truth, newline="") as fh:
        return list(csv.DictReader(fh))


def test_sample_holds_the_blood_and_spiked_cells_asked_for(tmp_path):
    truth = simulate_sample(tmp_path / "s", 12, {"SW480": 2, "SW620": 1}, seed=3, maps_per_file=5,
                            progress=False)
    table = rows(truth)
    assert len(table) == 15
    assert sorted(r["class"] for r in table if r["spiked"] == "1") == ["SW480", "SW480", "SW620"]
    assert {r["class"] for r in table if r["spiked"] == "0"} <= {"granulocytes", "monocytes", "PBMCs"}
    assert {r["session"] for r in table} == {"sample_3"}
    assert sorted(p.name for p in (tmp_path / "s").glob("stack_*.mat")) == [
        "stack_0000.mat", "stack_0001.mat", "stack_0002.mat"]
    with open_export(tmp_path / "s" / "stack_0002.mat") as reader:
        maps = list(reader)
    assert len(maps) == 5 and maps[0].meta.units == "rad"


def test_sample_is_the_same_with_two_workers(tmp_path):
    one = simulate_sample(tmp_path / "a", 6, {"SW480": 1}, seed=1, maps_per_file=4, progress=False)
    two = simulate_sample(tmp_path / "b", 6, {"SW480": 1}, seed=1, maps_per_file=4, workers=2,
                          progress=False)
    assert rows(one) == rows(two)
    for name in ("stack_0000.mat", "stack_0001.mat"):
        with h5py.File(tmp_path / "a" / name) as fa, h5py.File(tmp_path / "b" / name) as fb:
            assert np.array_equal(fa["phase"][()], fb["phase"][()])


def test_sample_session_is_not_a_training_session():
    sample = sample_session_of(0)
    training = [sample_session(cell_rng(0, c, k), c, k) for c in ("granulocytes", "SW480") for k in (1, 2)]
    assert all(sample.pixel_size_um != s.pixel_size_um or sample.na != s.na for s in training)


def test_an_unrelated_folder_is_not_overwritten(tmp_path):
    (tmp_path / "keep.txt").write_text("data")
    with pytest.raises(DatasetError, match="not empty"):
        simulate_sample(tmp_path, 2, {}, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "data"


@pytest.mark.parametrize("text, message", [("SW480", "CLASS:COUNT"), ("SW480:x", "CLASS:COUNT"),
                                           ("HeLa:3", "not one of")])
def test_parse_spikes_names_the_bad_item(text, message):
    with pytest.raises(ValueError, match=message):
        parse_spikes(text)


def test_parse_spikes_adds_repeated_classes():
    assert parse_spikes("SW480:2, SW620:1,SW480:3") == {"SW480": 5, "SW620": 1}


def test_stacks_hold_the_simulated_phase_losslessly_and_shuffled(tmp_path):
    from opdcells.simulate import simulate_cell
    from opdcells.spikein import cell_classes, sample_rng

    simulate_sample(tmp_path, 2, {"SW480": 1}, seed=4, maps_per_file=3, progress=False)
    session, classes = sample_session_of(4), cell_classes(2, {"SW480": 1}, 4)
    with h5py.File(tmp_path / "stack_0000.mat") as fh:
        assert fh["phase"].shuffle and fh["phase"].compression == "gzip"
        for i, name in enumerate(classes):
            opd_nm = simulate_cell(name, sample_rng(4, 1, i), session)[0]
            expected = (opd_nm * (2 * np.pi / session.wavelength_nm)).T.astype(np.float32)
            assert np.array_equal(fh["phase"][i], expected)
