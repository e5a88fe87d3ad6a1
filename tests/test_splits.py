"""Group-aware splits: no acquisition group in two parts, determinism, stratification, clear errors."""
from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import pytest

from opdcells.errors import SplitError
from opdcells.splits import (
    PARTS,
    Split,
    check_group_layout,
    group_split,
    groups_from_pattern,
    map_split,
    subsample_labelled,
)


def random_layout(seed: int, n_groups: int = 30, n_classes: int = 4):
    """Maps in acquisition groups of random size; each group holds one class (as in real sessions)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 60, n_groups)
    group_class = np.r_[np.arange(n_classes), rng.integers(0, n_classes, n_groups - n_classes)]
    groups = np.repeat([f"s{seed}_{i}" for i in range(n_groups)], sizes)
    y = np.repeat(group_class, sizes)
    return y, groups


def part_groups(split: Split, groups) -> dict[str, set]:
    return {name: set(np.asarray(groups)[getattr(split, name)]) for name in PARTS}


@pytest.mark.filterwarnings("ignore:class .* has no maps in")  # small layouts: single-group classes
@pytest.mark.parametrize("layout_seed", range(6))
@pytest.mark.parametrize("split_seed", [0, 7])
def test_no_group_in_two_parts_and_every_map_once(layout_seed, split_seed):
    y, groups = random_layout(layout_seed, n_groups=12 + 5 * layout_seed)
    split = group_split(y, groups, seed=split_seed)
    pg = part_groups(split, groups)
    assert not (pg["train"] & pg["val"] or pg["train"] & pg["test"] or pg["val"] & pg["test"])
    assert np.array_equal(np.sort(np.concatenate([split.train, split.val, split.test])), np.arange(y.size))
    for name in PARTS:  # sorted int index arrays, group names recorded
        idx = getattr(split, name)
        assert idx.dtype.kind == "i" and np.all(np.diff(idx) > 0)
        assert split.groups[name] == sorted(pg[name])
    split.check_disjoint(groups)


def test_every_class_in_train_and_test_when_it_has_two_groups():
    y, groups = random_layout(3, n_groups=40, n_classes=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough groups per class: no coverage warning expected
        split = group_split(y, groups, seed=3)
    for name in PARTS:
        assert set(y[getattr(split, name)]) == set(range(5))


def test_mixed_class_groups_supported():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 40, 2000)
    y = rng.integers(0, 3, 2000)
    split = group_split(y, groups, seed=0)
    split.check_disjoint(groups)
    assert split.sizes["train"] > split.sizes["test"] > 0


def test_same_seed_same_split_other_seed_differs():
    y, groups = random_layout(1, n_groups=30)
    a, b, c = group_split(y, groups, seed=5), group_split(y, groups, seed=5), group_split(y, groups, seed=6)
    assert all(np.array_equal(getattr(a, n), getattr(b, n)) for n in PARTS)
    assert not all(np.array_equal(getattr(a, n), getattr(c, n)) for n in PARTS)


def test_sizes_and_stratification_roughly_kept():
    # 60 groups of 20 maps, 3 classes in proportions 1/2, 1/3, 1/6
    group_class = np.repeat([0, 1, 2], [30, 20, 10])
    groups = np.repeat(np.arange(60), 20)
    y = np.repeat(group_class, 20)
    split = group_split(y, groups, test_size=0.2, val_size=0.15, seed=0)
    assert split.sizes["test"] / y.size == pytest.approx(0.2, abs=0.05)
    assert split.sizes["val"] / y.size == pytest.approx(0.15, abs=0.05)
    overall = np.bincount(y) / y.size
    for name in PARTS:
        part = y[getattr(split, name)]
        assert np.abs(np.bincount(part, minlength=3) / part.size - overall).max() < 0.1


@pytest.mark.filterwarnings("ignore:class .* has no maps in")
def test_val_size_zero_gives_empty_val():
    y, groups = random_layout(2, n_groups=10)
    split = group_split(y, groups, val_size=0, seed=0)
    assert split.val.size == 0 and split.groups["val"] == []
    assert split.train.size + split.test.size == y.size


def test_json_round_trip(tmp_path):
    y, groups = random_layout(4)
    split = group_split(y, groups, seed=2)
    path = tmp_path / "split.json"
    text = split.to_json(path)
    for source in (text, path, str(path)):
        back = Split.from_json(source)
        assert all(np.array_equal(getattr(back, n), getattr(split, n)) for n in PARTS)
        assert back.seed == 2 and back.groups == split.groups and back.sizes == split.sizes
    assert '"sizes"' in text and '"groups"' in text


def test_single_group_class_warns_and_stays_in_train(caplog):
    y = np.array([0] * 10 + [1] * 30)
    groups = np.array(["only"] * 10 + [f"g{i // 10}" for i in range(30)])
    with caplog.at_level(logging.WARNING, logger="opdcells.splits"):
        split = group_split(y, groups, val_size=0, seed=0)
    assert re.search(r"class 0 .*only one acquisition group \('only'\)", caplog.text)
    assert np.all(y[split.train][:10] == 0) and not np.any(y[split.test] == 0)


def test_check_disjoint_detects_leak():
    groups = np.array(["a", "a", "b", "c"])
    with pytest.raises(ValueError, match="groups in both train and test"):
        Split(train=[0, 2], val=[], test=[1, 3]).check_disjoint(groups)
    with pytest.raises(ValueError, match="map indices in both"):
        Split(train=[0, 1], val=[1], test=[3]).check_disjoint(groups)
    Split(train=[0, 1], val=[2], test=[3]).check_disjoint(groups)


@pytest.mark.parametrize("kwargs, match", [
    (dict(y=[0, 0, 1, 1], groups=["a", "b", "a", "b"]), "at least 3 acquisition groups"),
    (dict(y=[0, 1, 0], groups=["a", "b", "a"]), "each class is one acquisition group"),
    (dict(y=[0, 1, 0], groups=["a", "a", "a"], val_size=0), "at least 2 acquisition groups"),
    (dict(y=[], groups=[]), "empty"),
    (dict(y=[0, 1], groups=["a"]), "equal length"),
    (dict(y=[0, 1, 1], groups=["a", "b", "c"], test_size=0), "test_size"),
    (dict(y=[0, 1, 1], groups=["a", "b", "c"], test_size=0.5, val_size=0.5), "val_size"),
    (dict(y=[0, 1, 1], groups=["a", "b", "c"], seed=-1), "seed"),
])
def test_degenerate_inputs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_split(**kwargs)


def test_subsample_stratified_nested_and_keeps_every_class():
    y = np.repeat([0, 1, 2], [200, 100, 3])
    train = np.arange(0, 303, 1)[::-1]  # order of train_idx must not matter
    small = subsample_labelled(train, y, 0.05, seed=1)
    large = subsample_labelled(train, y, 0.5, seed=1)
    assert np.bincount(y[small], minlength=3).tolist() == [10, 5, 1]
    assert np.bincount(y[large], minlength=3).tolist() == [100, 50, 2]
    assert np.all(np.isin(small, large)) and np.all(np.diff(small) > 0)
    assert np.array_equal(subsample_labelled(train, y, 1.0, seed=0), np.arange(303))
    assert not np.array_equal(small, subsample_labelled(train, y, 0.05, seed=2))


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_subsample_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        subsample_labelled(np.arange(4), np.zeros(4, int), fraction)


# ---------------------------------------------------------------- one folder per class (issue 16)


def test_one_group_per_class_is_one_line_naming_the_ways_forward():
    y = np.repeat([0, 1, 2], 10)
    groups = np.repeat(["SW480", "SW620", "PBMCs"], 10)
    with pytest.raises(SplitError) as info:
        group_split(y, groups, seed=0)
    message = str(info.value)
    assert "\n" not in message and "'SW480', 'SW620', 'PBMCs'" in message
    assert "--group-pattern" in message and "--split-by map" in message and "manifest" in message
    check_group_layout(np.repeat([0, 1], 4), np.array(["a"] * 4 + ["b", "b", "c", "c"]))   # b, c: fine


def test_groups_from_a_file_name_pattern():
    names = ["/lab/SW480/day1_cell3.mat", "/lab/SW480/day2_cell1.mat", "/lab/PBMCs/day1_cell9.mat"]
    assert groups_from_pattern(names, r"day\d+").tolist() == ["day1", "day2", "day1"]
    assert groups_from_pattern(names, r"/(\w+)/day").tolist() == ["SW480", "SW480", "PBMCs"]
    assert groups_from_pattern(names, r"(?P<cls>\w+)/(?P<group>day\d)").tolist() == ["day1", "day2", "day1"]
    with pytest.raises(SplitError, match=r"does not match 1 source file names, e.g. '/lab/PBMCs/day1_"):
        groups_from_pattern(names, r"SW480/day\d")
    with pytest.raises(SplitError, match="is not a regular expression"):
        groups_from_pattern(names, r"day(\d")


def test_map_split_is_stratified_disjoint_and_says_what_it_does_not_test(tmp_path, caplog):
    y = np.repeat([0, 1], [60, 40])
    with caplog.at_level(logging.WARNING, logger="opdcells.splits"):
        split = map_split(y, test_size=0.2, val_size=0.2, seed=3)
    parts = [split.train, split.val, split.test]
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    assert split.sizes == {"train": 60, "val": 20, "test": 20}
    assert [int(np.sum(y[p] == 1)) for p in parts] == [24, 8, 8]
    assert split.by == "map" and "session effects are not tested" in split.warning
    assert "session effects are not tested" in caplog.text
    back = Split.from_json(split.to_json(tmp_path / "split.json"))
    assert back.by == "map" and back.warning == split.warning
