"""Classification tasks, defined once, and robust matching of dataset class names to them.

A task groups dataset classes into task classes. The four reference tasks (``TASKS``: ``five_class``,
``cancer_vs_blood``, ``sw480_vs_sw620``, ``blood_subtypes``) are named presets over the reference study's
five classes (``CANONICAL_CLASSES``); any other set of classes is a task too (:func:`resolve_task`):

* ``"all"``: every class of the dataset (the default when the dataset lacks a reference class);
* ``"PC3,PNT1A"`` (or ``classes=``): these classes, one task class each;
* ``"cancer=SW480,SW620 blood=granulocytes,monocytes,PBMCs"``: groupings ``NAME=CLASS,CLASS,...``
  separated by spaces (or by ``;`` when class names hold spaces).

Dataset class names are matched by :func:`class_key`: a reference class under any of its spellings
("SW-480", "sw_480 cells", "Neutrophils", "PBMC", ...; :func:`canonical_class`), any other name by its
normalised spelling (case, separators and a trailing "cells" ignored: "PC-3 cells" is "PC3").
:func:`task_targets` then selects the maps a task uses and gives their task label ids.

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

from .errors import TaskError

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


@dataclass(frozen=True)
class Task:
    """A classification task: ``classes`` (label order) and the dataset classes each one groups.

    Members are class names as :func:`class_key` matches them (a reference class under any spelling,
    any other name up to case and separators).

    Attributes
    ----------
    name : str
        The task's name (a reference task's, or made of its class names).
    classes : tuple of str
        The task classes in label order.
    members : dict of str to tuple of str
        Task class -> the class names it groups.
    """

    name: str
    classes: tuple[str, ...]
    members: dict[str, tuple[str, ...]]

    @property
    def canonical(self) -> tuple[str, ...]:
        """All member classes the task uses, in task-class order."""
        return tuple(c for cls in self.classes for c in self.members[cls])

    def to_dict(self) -> dict:
        """JSON form stored in a model's config.json: name, classes, members and label ids."""
        return {"name": self.name, "classes": list(self.classes),
                "members": {cls: list(self.members[cls]) for cls in self.classes},
                "label_ids": {cls: i for i, cls in enumerate(self.classes)}}

    @classmethod
    def from_dict(cls, data: dict) -> Task:
        """The task :meth:`to_dict` stored (label ids are the order of ``classes``)."""
        classes = tuple(str(c) for c in data["classes"])
        return _checked(cls(str(data["name"]), classes,
                            {c: tuple(str(m) for m in data["members"][c]) for c in classes}))


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


ALL = "all"
#: How to write a task, for error messages and the CLI's help.
TASK_SYNTAX = (f"a reference task ({', '.join(TASKS)}), {ALL!r} (every class of the dataset), classes "
               "'A,B,...' or groupings 'NAME=A,B NAME=C,...'")


def get_task(name: str | Task) -> Task:
    """The reference task called ``name`` (a :class:`Task` is returned as is); TaskError if unknown.

    Parameters
    ----------
    name : str or Task
        A reference task name.

    Returns
    -------
    Task
        The task.
    """
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}; for other classes "
                        f"write {TASK_SYNTAX}") from None


def resolve_task(spec: str | Task | None = None, class_names: Sequence[str] | None = None,
                 labels: Sequence[int] | np.ndarray | None = None, *,
                 classes: str | Sequence[str] | None = None) -> Task:
    """The task meant by ``spec`` (or by ``classes``) on a dataset with ``class_names``.

    Parameters
    ----------
    spec : str, Task or None
        A reference task name, ``"all"``, ``"A,B,..."`` or ``"NAME=A,B NAME=C,..."`` (see the module
        docstring); None: ``five_class`` when the dataset has maps of all five reference classes (or no
        dataset is given), else ``"all"``.
    class_names, labels : optional
        The dataset's class names and per-map label ids; needed for ``"all"`` (classes without maps are
        left out when ``labels`` is given).
    classes : str or sequence of str, optional
        The task's classes, one task class each (instead of ``spec``).

    Returns
    -------
    Task

    Raises
    ------
    TaskError
        Unknown or malformed task, fewer than two classes, a class in two groups, or both ``spec`` and
        ``classes`` given.
    """
    if classes is not None:
        if spec is not None:
            raise TaskError("give either a task or its classes, not both")
        return _class_list_task(_split_names(classes) if isinstance(classes, str) else list(classes))
    if isinstance(spec, Task):
        return _checked(spec)
    present = _present_names(class_names, labels)
    if spec is None or not str(spec).strip():
        fits = present is None or all(any(class_key(n) == c for n in present) for c in CANONICAL_CLASSES)
        spec = "five_class" if fits else ALL
        log.info("task: %s (%s)", spec, "the reference classes are present" if fits else
                 "the dataset lacks some reference classes")
    spec = str(spec).strip()
    if spec in TASKS:
        return TASKS[spec]
    if spec == ALL:
        if present is None:
            raise TaskError(f"task {ALL!r} needs the dataset's class names")
        return _checked(Task(ALL, tuple(present), {c: (c,) for c in present}))
    if "=" in spec:
        return _grouping_task(spec)
    if "," in spec:
        return _class_list_task(_split_names(spec))
    raise TaskError(f"unknown task {spec!r}; write {TASK_SYNTAX}")


def task_slug(spec: str | Task) -> str:
    """File-name-safe name of a task as written (``"PC3,PNT1A"`` -> ``PC3_vs_PNT1A``; a reference task name
    or ``"all"`` as it is): what run folders of a task are called.

    Parameters
    ----------
    spec : str or Task
        The task as written.

    Returns
    -------
    str
        The folder name.
    """
    if isinstance(spec, Task):
        return spec.name
    spec = str(spec).strip()
    return spec if re.fullmatch(r"[A-Za-z0-9_.+-]+", spec) else resolve_task(spec).name


def default_tasks(class_names: Sequence[str], labels=None) -> list[str]:
    """The reference tasks whose classes all have maps in a dataset, or ``["all"]`` when none fits.

    Parameters
    ----------
    class_names : sequence of str
        The dataset's class names.
    labels : array of int, optional
        Every map's label id (default: every class counts as present).

    Returns
    -------
    list of str
        Task names.
    """
    fits = []
    for name, task in TASKS.items():
        try:
            task_targets(class_names, np.arange(len(class_names)) if labels is None else labels, task)
        except TaskError:
            continue
        fits.append(name)
    return fits or [ALL]


def task_name(classes: Sequence[str]) -> str:
    """File-name-safe task name made of its class names: ``PC3_vs_PNT1A``.

    Parameters
    ----------
    classes : sequence of str
        The task's classes.

    Returns
    -------
    str
        The name.
    """
    return "_vs_".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", str(c)).strip("-") or "class" for c in classes)


def _split_names(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def _class_list_task(classes: Sequence[str]) -> Task:
    classes = tuple(str(c).strip() for c in classes)
    return _checked(Task(task_name(classes), classes, {c: (c,) for c in classes}))


def _grouping_task(spec: str) -> Task:
    """Task of ``"NAME=A,B NAME=C"`` (or ``;``-separated groupings)."""
    parts = [p.strip() for p in (spec.split(";") if ";" in spec else spec.split())]
    members = {}
    for part in filter(None, parts):
        name, sep, names = part.partition("=")
        if not sep or not name.strip() or not _split_names(names):
            raise TaskError(f"cannot read {part!r} in task {spec!r}: write each task class as NAME=A,B "
                            "(no spaces around '=' and ','; separate groupings by ';' if names hold spaces)")
        if name.strip() in members:
            raise TaskError(f"task class {name.strip()!r} is defined twice in {spec!r}")
        members[name.strip()] = tuple(_split_names(names))
    classes = tuple(members)
    return _checked(Task(task_name(classes), classes, members))


def _checked(task: Task) -> Task:
    """``task`` if it has two or more classes, each with members, and no class in two groups."""
    if len(task.classes) < 2 or len(set(task.classes)) != len(task.classes):
        raise TaskError(f"task {task.name!r} needs at least two distinct classes, got {list(task.classes)}")
    seen: dict[str, str] = {}
    for cls in task.classes:
        if not task.members.get(cls):
            raise TaskError(f"task class {cls!r} of task {task.name!r} has no member classes")
        for member in task.members[cls]:
            key = class_key(member)
            if key in seen and seen[key] != cls:
                raise TaskError(f"class {member!r} is in two task classes ({seen[key]!r} and {cls!r}) of "
                                f"task {task.name!r}; put it in one")
            seen[key] = cls
    return task


def _present_names(class_names, labels) -> list[str] | None:
    """Dataset class names that have maps (all names when ``labels`` is None), or None without names."""
    if class_names is None:
        return None
    names = [str(c) for c in class_names]
    if labels is None:
        return names
    counts = np.bincount(np.asarray(labels, dtype=np.int64).reshape(-1), minlength=len(names))
    return [n for n, c in zip(names, counts, strict=False) if c > 0]


def _normalise(name: str) -> str:
    """Lower case, separators and a trailing 'cells'/'cell line' removed: 'SW-480 cells' -> 'sw480'."""
    key = re.sub(r"[\s_\-./]+", "", str(name).strip().lower())
    for suffix in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)]
    return key


def canonical_class(name: str) -> str | None:
    """Canonical class of a dataset class name, or None when it is not one of the five classes.

    Parameters
    ----------
    name : str
        A class name as a lab writes it.

    Returns
    -------
    str or None
        SW480, SW620, granulocytes, monocytes or PBMCs, or None.
    """
    key = _normalise(name)
    if not key:
        return None
    if key in _ALIASES:
        return _ALIASES[key]
    return _ALIASES.get(key[:-1]) if key.endswith("s") else None


def class_key(name: str) -> str:
    """What a class name is matched by: its reference class if it is one (:func:`canonical_class`), else
    its normalised spelling ('PC-3 cells' -> 'pc3').

    Parameters
    ----------
    name : str
        A class name.

    Returns
    -------
    str
        The key.
    """
    return canonical_class(name) or _normalise(name)


def _class_ids(class_names: Sequence[str]) -> dict[str, int]:
    """Class key -> dataset label id; TaskError if two dataset classes have one key."""
    ids: dict[str, int] = {}
    for i, name in enumerate(class_names):
        canon = class_key(name)
        if not canon:
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

    Parameters
    ----------
    class_names : sequence of str
        The dataset's class names.
    labels : array of int, shape (N_maps,)
        Every map's label id into ``class_names``.
    task : str or Task
        The task (a name is looked up with :func:`get_task`).

    Returns
    -------
    idx : numpy.ndarray, int64
        Indices of the maps of the task's classes.
    y : numpy.ndarray, int64
        Their task label ids.
    """
    task = get_task(task)
    class_names = [str(c) for c in class_names]
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise TaskError(f"labels must lie in [0, {len(class_names)}); got {labels.min()}..{labels.max()}")
    counts = np.bincount(labels, minlength=len(class_names))
    ids = {c: i for c, i in _class_ids(class_names).items() if counts[i] > 0}

    missing = [cls for cls in task.classes if not any(class_key(m) in ids for m in task.members[cls])]
    if missing:
        needs = "; ".join(cls if task.members[cls] == (cls,) else f"{cls} = {' or '.join(task.members[cls])}"
                          for cls in missing)
        raise TaskError(
            f"task {task.name!r} needs classes missing from the dataset (no maps of a class named like "
            f"these): {needs}. Classes present: {_present(class_names, counts)}. Choose classes present "
            f"(--task all, or --classes A,B)"
        )
    partial = [m for m in task.canonical if class_key(m) not in ids]
    if partial:
        log.warning("task %s: no maps of %s; using the classes present", task.name, ", ".join(partial))

    lookup = np.full(len(class_names), -1, dtype=np.int64)
    for y, cls in enumerate(task.classes):
        for member in task.members[cls]:
            if class_key(member) in ids:
                lookup[ids[class_key(member)]] = y
    unused = [class_names[i] for i in range(len(class_names)) if lookup[i] < 0 and counts[i] > 0]
    if unused:
        log.info("task %s leaves out maps of classes: %s", task.name, ", ".join(unused))
    y_all = lookup[labels]
    idx = np.flatnonzero(y_all >= 0)
    return idx, y_all[idx]


def task_labels(dataset, task: Task) -> np.ndarray:
    """Task label id of every map of ``dataset`` (-1 for maps of classes outside the task).

    Parameters
    ----------
    dataset : OPDDataset
        The open dataset (``class_names``, ``labels``).
    task : Task
        The task.

    Returns
    -------
    numpy.ndarray, shape (N_maps,), int64
        Label ids into ``task.classes``, -1 outside the task.

    Raises
    ------
    TaskError
        The dataset lacks a class of the task.
    """
    idx, y = task_targets(dataset.class_names, dataset.labels, task)
    y_all = np.full(len(dataset), -1, dtype=np.int64)
    y_all[idx] = y
    return y_all
