"""Tasks: class-name matching and task targets."""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from opdcells.errors import OPDCellsError
from opdcells.tasks import (
    CANONICAL_CLASSES,
    TASKS,
    Task,
    TaskError,
    canonical_class,
    class_key,
    default_tasks,
    get_task,
    resolve_task,
    task_targets,
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("SW480", "SW480"),
        ("sw480", "SW480"),
        ("SW-480", "SW480"),
        ("sw_480", "SW480"),
        ("SW480 cells", "SW480"),
        (" SW 620 cell line ", "SW620"),
        ("SW620s", "SW620"),
        ("granulocytes", "granulocytes"),
        ("Granulocyte", "granulocytes"),
        ("neutrophils", "granulocytes"),
        ("PMN", "granulocytes"),
        ("PMNs", "granulocytes"),
        ("polymorphonuclear leukocytes", "granulocytes"),
        ("Monocyte", "monocytes"),
        ("monocytes", "monocytes"),
        ("PBMC", "PBMCs"),
        ("pbmcs", "PBMCs"),
        ("Peripheral blood mononuclear cells", "PBMCs"),
        ("lymphocytes", "PBMCs"),
        ("HT-29", None),
        ("debris", None),
        ("cells", None),
        ("", None),
    ],
)
def test_canonical_class_matches_robustly(name, expected):
    assert canonical_class(name) == expected


def test_tasks_are_defined_once_over_canonical_classes():
    assert set(TASKS) == {"five_class", "cancer_vs_blood", "sw480_vs_sw620", "blood_subtypes"}
    for task in TASKS.values():
        assert set(task.members) == set(task.classes)
        assert set(task.canonical) <= set(CANONICAL_CLASSES)
        assert len(set(task.canonical)) == len(task.canonical)  # no class in two task classes
    assert TASKS["cancer_vs_blood"].members["cancer"] == ("SW480", "SW620")
    assert get_task("five_class").classes == CANONICAL_CLASSES
    assert get_task(TASKS["blood_subtypes"]) is TASKS["blood_subtypes"]


def test_unknown_task_is_a_task_error():
    with pytest.raises(TaskError, match="known tasks: five_class"):
        get_task("three_class")


# A dataset whose class names are spelled the way exports spell them, in an unusual order.
NAMES = ["PBMC", "sw-620 cells", "Neutrophils", "SW480", "Monocyte", "debris"]
LABELS = np.array([0, 1, 2, 3, 4, 5, 3, 1, 0, 2, 4, 5])


@pytest.mark.parametrize(
    ("task", "expected_idx", "expected_y"),
    [
        ("five_class", [0, 1, 2, 3, 4, 6, 7, 8, 9, 10], [4, 1, 2, 0, 3, 0, 1, 4, 2, 3]),
        ("cancer_vs_blood", [0, 1, 2, 3, 4, 6, 7, 8, 9, 10], [1, 0, 1, 0, 1, 0, 0, 1, 1, 1]),
        ("sw480_vs_sw620", [1, 3, 6, 7], [1, 0, 0, 1]),
        ("blood_subtypes", [0, 2, 4, 8, 9, 10], [2, 0, 1, 2, 0, 1]),
    ],
)
def test_task_targets_select_maps_and_relabel(task, expected_idx, expected_y):
    idx, y = task_targets(NAMES, LABELS, task)
    np.testing.assert_array_equal(idx, expected_idx)
    np.testing.assert_array_equal(y, expected_y)
    assert idx.dtype == np.int64 and y.dtype == np.int64
    # every selected map's dataset class really is a member of its task class
    t = get_task(task)
    for i, label in zip(idx, y, strict=True):
        assert canonical_class(NAMES[LABELS[i]]) in t.members[t.classes[label]]


def test_missing_task_classes_name_missing_and_present():
    with pytest.raises(TaskError) as err:
        task_targets(["SW480", "granulocytes"], [0, 0, 1], "sw480_vs_sw620")
    msg = str(err.value)
    assert "SW620" in msg and "sw480_vs_sw620" in msg
    assert "SW480 (2 maps)" in msg and "granulocytes (1 maps)" in msg
    assert isinstance(err.value, ValueError) and isinstance(err.value, OPDCellsError)


def test_class_listed_without_maps_counts_as_missing():
    with pytest.raises(TaskError, match="blood = granulocytes or monocytes or PBMCs"):
        task_targets(["SW480", "PBMCs"], [0, 0], "cancer_vs_blood")


def test_partial_task_class_is_used_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="opdcells.tasks"):
        idx, y = task_targets(["SW620", "PBMCs"], [0, 1, 1], "cancer_vs_blood")
    np.testing.assert_array_equal(y, [0, 1, 1])
    assert "SW480" in caplog.text and "granulocytes" in caplog.text


def test_two_names_for_one_class_are_refused():
    with pytest.raises(TaskError, match="'lymphocytes' and 'PBMCs' both mean 'PBMCs'"):
        task_targets(["lymphocytes", "PBMCs", "SW480"], [0, 1, 2], "five_class")


def test_labels_out_of_range_are_refused():
    with pytest.raises(TaskError, match="labels must lie in"):
        task_targets(["SW480", "SW620"], [0, 2], "sw480_vs_sw620")


def test_custom_task_object_is_accepted():
    task = Task("big_vs_small", ("big", "small"), {"big": ("SW480", "SW620"), "small": ("PBMCs",)})
    idx, y = task_targets(["PBMCs", "SW480"], [1, 0, 1], task)
    np.testing.assert_array_equal(idx, [0, 1, 2])
    np.testing.assert_array_equal(y, [0, 1, 0])


# ---------------------------------------------------------------------- tasks from the data (issue 15)


def test_resolve_task_reads_presets_all_class_lists_and_groupings():
    assert resolve_task("cancer_vs_blood") is TASKS["cancer_vs_blood"]
    grouped = resolve_task("tumour=PC-3,DU145 normal=PNT1A")
    assert grouped.name == "tumour_vs_normal" and grouped.classes == ("tumour", "normal")
    assert grouped.members == {"tumour": ("PC-3", "DU145"), "normal": ("PNT1A",)}
    assert resolve_task("a b=X,Y; c=Z").members == {"a b": ("X", "Y"), "c": ("Z",)}   # names with spaces
    pair = resolve_task(classes="PC3, PNT1A")
    assert pair.name == "PC3_vs_PNT1A" and pair.members == {"PC3": ("PC3",), "PNT1A": ("PNT1A",)}
    assert resolve_task("PC3,PNT1A") == pair
    everything = resolve_task("all", ["PC3", "PNT1A", "empty"], [0, 1, 1])
    assert everything.classes == ("PC3", "PNT1A")   # a class without maps is left out
    assert Task.from_dict(grouped.to_dict()) == grouped
    assert grouped.to_dict()["label_ids"] == {"tumour": 0, "normal": 1}


def test_default_task_is_five_class_only_when_the_reference_classes_are_there():
    assert resolve_task(None, list(CANONICAL_CLASSES), range(5)).name == "five_class"
    assert resolve_task(None, ["SW-480", "SW620", "PMN", "Monocyte", "PBMC"], range(5)).name == "five_class"
    assert resolve_task(None, ["PC3", "PNT1A"], [0, 1]).classes == ("PC3", "PNT1A")
    assert default_tasks(["PC3", "PNT1A"], [0, 1]) == ["all"]
    assert default_tasks(["SW480", "SW620", "PBMCs"], [0, 1, 2]) == ["cancer_vs_blood", "sw480_vs_sw620"]


def test_lab_class_names_match_by_spelling():
    task = resolve_task(classes="PC3,PNT1A")
    idx, y = task_targets(["pc-3 cells", "PNT1A", "DU145"], [2, 0, 1, 0, 2], task)
    np.testing.assert_array_equal(idx, [1, 2, 3])
    np.testing.assert_array_equal(y, [0, 1, 0])
    assert class_key("PC-3 cells") == class_key("pc3") and class_key("PMN") == "granulocytes"


@pytest.mark.parametrize(("spec", "words"), [
    ("three_class", "unknown task 'three_class'"),
    ("tumour=PC3 normal", "cannot read 'normal'"),
    ("a=PC3 b=PC3,PNT1A", "'PC3' is in two task classes"),
    ("a=PC3 a=PNT1A", "defined twice"),
    ("PC3", "unknown task 'PC3'"),
    ("PC3,", "at least two distinct classes"),
])
def test_malformed_tasks_say_what_is_wrong(spec, words):
    with pytest.raises(TaskError, match=re.escape(words)):
        resolve_task(spec)


def test_missing_lab_class_is_named_plainly():
    with pytest.raises(TaskError) as err:
        task_targets(["PC3", "debris"], [0, 1], resolve_task(classes="PC3,PNT1A"))
    message = str(err.value)
    assert "needs classes missing from the dataset" in message and ": PNT1A." in message
    assert "Classes present: PC3 (1 maps), debris (1 maps)" in message and "--classes" in message
