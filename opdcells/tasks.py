"""Classification tasks, defined once, and robust matching of dataset class names to them.

Every task is a grouping of the five canonical classes (``CANONICAL_CLASSES``). A dataset's own class
names ("SW-480", "sw_480 cells", "Neutrophils", "PBMC", ...) are mapped to canonical classes by
:func:`canonical_class`; :func:`task_targets` then selects the maps a task uses and gives their task
label ids.

Alias choices (documented because they are judgement calls):

* neutrophils, PMN(s), polymorphonuclear cells -> ``granulocytes``: neutrophils are 90-95 % of blood
  granulocytes, and an isolated "PMN" fraction is what label-free studies call granulocytes.
* lymphocytes -> ``PBMCs``: PBMCs are lymphocytes (70-90 %) plus monocytes; when monocytes are a class
  of their own, the remaining mononuclear class is the lymphocyte-dominated PBMC class, and no other
  canonical class fits. A dataset holding both "lymphocytes" and "PBMCs" is ambiguous and is refused
  (:class:`TaskError`) rather than merged silently.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import OPDCellsError

log = logging.getLogger(__name__)

CANONICAL_CLASSES = ("SW480", "SW620", "granulocytes", "monocytes", "PBMCs")

# Keys are normalised names (see _normalise); singular forms are tried after stripping a plural "s".
_ALIASES = {
    "sw480": "SW480",
    "sw620": "SW620",
    "granulocyte": "granulocytes",
    "neutrophil": "granulocytes",
    "pmn": "granulocytes",
    "polymorphonuclear": "granulocytes",
    "polymorphonuclearleukocyte": "granulocytes",
    "polymorphonuclearneutrophil": "granulocytes",
    "monocyte": "monocytes",
    "pbmc": "PBMCs",
    "peripheralbloodmononuclear": "PBMCs",
    "mononuclear": "PBMCs",
    "lymphocyte": "PBMCs",
}
_SUFFIXES = ("cellline", "cells", "cell")


class TaskError(OPDCellsError, ValueError):
    """A task cannot be run on a dataset (classes missing or ambiguous, unknown task)."""


@dataclass(frozen=True)
class Task:
    """A classification task: ``classes`` (label order) and the canonical classes each one groups."""

    name: str
    classes: tuple[str, ...]
    members: dict[str, tuple[str, ...]]

    @property
    def canonical(self) -> tuple[str, ...]:
        """All canonical classes the task uses, in task-class order."""
        return tuple(c for cls in self.classes for c in self.members[cls])


def _identity_task(name: str, classes: tuple[str, ...]) -> Task:
    return Task(name, classes, {c: (c,) for c in classes})


TASKS: dict[str, Task] = {
    "five_class": _identity_task("five_class", CANONICAL_CLASSES),
    "cancer_vs_blood": Task(
        "cancer_vs_blood",
        ("cancer", "blood"),
        {"cancer": ("SW480", "SW620"), "blood": ("granulocytes", "monocytes", "PBMCs")},
    ),
    "sw480_vs_sw620": _identity_task("sw480_vs_sw620", ("SW480", "SW620")),
    "blood_subtypes": _identity_task("blood_subtypes", ("granulocytes", "monocytes", "PBMCs")),
}


def get_task(name: str | Task) -> Task:
    """The task called ``name`` (a :class:`Task` is returned as is); TaskError if unknown."""
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def _normalise(name: str) -> str:
    """Lower case, separators and a trailing 'cells'/'cell line' removed: 'SW-480 cells' -> 'sw480'."""
    key = re.sub(r"[\s_\-./]+", "", str(name).strip().lower())
    for suffix in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)]
    return key


def canonical_class(name: str) -> str | None:
    """Canonical class of a dataset class name, or None when it is not one of the five classes."""
    key = _normalise(name)
    if not key:
        return None
    if key in _ALIASES:
        return _ALIASES[key]
    return _ALIASES.get(key[:-1]) if key.endswith("s") else None


def _canonical_ids(class_names: Sequence[str]) -> dict[str, int]:
    """Canonical class -> dataset label id; TaskError if two dataset classes map to one class."""
    ids: dict[str, int] = {}
    for i, name in enumerate(class_names):
        canon = canonical_class(name)
        if canon is None:
            continue
        if canon in ids:
            raise TaskError(
                f"dataset classes {class_names[ids[canon]]!r} and {name!r} both mean {canon!r}; "
                "rename one of them (they are not merged silently)"
            )
        ids[canon] = i
    return ids


def _present(class_names: Sequence[str], counts: np.ndarray) -> str:
    return ", ".join(f"{n} ({c} maps)" for n, c in zip(class_names, counts, strict=True)) or "none"


def task_targets(
    class_names: Sequence[str], labels: Sequence[int] | np.ndarray, task: str | Task
) -> tuple[np.ndarray, np.ndarray]:
    """Maps used by ``task`` and their task label ids.

    ``class_names`` are the dataset's class names and ``labels`` its per-map label ids into them.
    Returns ``(idx, y)``: int64 indices of the maps whose class belongs to the task, and int64 task
    label ids (positions in ``task.classes``). Maps of other classes are left out (logged). A task class
    with no maps at all is a :class:`TaskError` naming the missing classes and the classes present;
    a task class with only some of its members present (e.g. cancer = SW620 only) is logged as a warning.
    """
    task = get_task(task)
    class_names = [str(c) for c in class_names]
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise TaskError(f"labels must lie in [0, {len(class_names)}); got {labels.min()}..{labels.max()}")
    counts = np.bincount(labels, minlength=len(class_names))
    ids = {c: i for c, i in _canonical_ids(class_names).items() if counts[i] > 0}

    missing = [cls for cls in task.classes if not any(m in ids for m in task.members[cls])]
    if missing:
        needs = "; ".join(f"{cls} = {' or '.join(task.members[cls])}" for cls in missing)
        raise TaskError(
            f"task {task.name!r} needs classes missing from the dataset: {needs}. "
            f"Classes present: {_present(class_names, counts)}"
        )
    partial = [m for m in task.canonical if m not in ids]
    if partial:
        log.warning("task %s: no maps of %s; using the classes present", task.name, ", ".join(partial))

    lookup = np.full(len(class_names), -1, dtype=np.int64)
    for y, cls in enumerate(task.classes):
        for member in task.members[cls]:
            if member in ids:
                lookup[ids[member]] = y
    unused = [class_names[i] for i in range(len(class_names)) if lookup[i] < 0 and counts[i] > 0]
    if unused:
        log.info("task %s leaves out maps of classes: %s", task.name, ", ".join(unused))
    y_all = lookup[labels]
    idx = np.flatnonzero(y_all >= 0)
    return idx, y_all[idx]
