"""Train / validation / test splits that never put one acquisition group in two parts.

Maps from one acquisition (session, dish, donor, slide) share optics, background and biology, so a
random map-level split leaks: the model learns the session, not the cell. :func:`group_split` keeps
every group whole and stratifies by class as far as the groups allow.

How a part is carved out of a pool of maps: candidate group partitions come from scikit-learn
(``StratifiedGroupKFold`` folds over several seeded shuffles, plus ``GroupShuffleSplit`` draws); each
candidate is scored, first by class-coverage violations (a class with >= 2 groups in the pool must
appear on both sides; every class must keep maps on the training side), then by how far its size and
class mix are from the target. The best candidate wins; ties go to the first, so the result is a pure
function of the seed.

Where groups come from: the dataset's ``group`` column (the session folder of single-map files, the
file itself for stacks and fields, or a load manifest's ``group`` column), or, at training time,
:func:`groups_from_pattern` on the stored source file names (``train --group-pattern REGEX``). When
every class has a single acquisition group (one folder per class with the cells' files directly
inside) no group split can test on unseen sessions: :func:`check_group_layout` says so in one line,
with the ways forward; :func:`map_split` (``train --split-by map``) then splits maps instead, with a
loud warning recorded in the split (``Split.by``, ``Split.warning``).
"""
from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold, train_test_split

from .errors import SplitError

log = logging.getLogger(__name__)

PARTS = ("train", "val", "test")
N_SHUFFLES = 3  # seeded StratifiedGroupKFold shuffles tried per carve and fold count
N_DRAWS = 24  # GroupShuffleSplit draws tried per carve
NEAR_BEST = 0.25  # candidates within NEAR_BEST * fraction of the best size/mix error are equally good
SPLIT_BY = ("group", "map")
#: What to do when no group split exists (the end of :func:`check_group_layout`'s message).
WAYS_FORWARD = ("name the sessions: train --group-pattern REGEX (groups from the file names, e.g. "
                "'day\\d+' or '(?P<group>[^/]+)_cell'), or a 'group' column in a load manifest; or train "
                "--split-by map (train and test then share sessions: session effects are not tested)")
MAP_SPLIT_WARNING = ("split by map, not by acquisition group: maps of one session are in training and test "
                     "parts, so the test figures do not show how the model does on a new session (session "
                     "effects are not tested)")


@dataclass(frozen=True, eq=False)
class Split:
    """Sorted index arrays of the three parts, the seed, and the group names in each part.

    Attributes
    ----------
    train, val, test : numpy.ndarray of int
        Map indices of the parts (sorted).
    seed : int, optional
        The seed the split was made with.
    groups : dict of str to list of str
        Part -> the acquisition groups in it.
    by : {"group", "map"}
        Whole acquisition groups per part, or single maps (``MAP_SPLIT_WARNING``).
    warning : str, optional
        What the split cannot show (map splits).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int | None = None
    groups: dict[str, list[str]] = field(default_factory=dict)
    by: str = "group"                 # "group" (whole acquisition groups) or "map" (MAP_SPLIT_WARNING)
    warning: str | None = None

    def __post_init__(self):
        for name in PARTS:
            object.__setattr__(self, name, np.sort(np.asarray(getattr(self, name), dtype=np.int64)))

    @property
    def sizes(self) -> dict[str, int]:
        """Number of maps in each part."""
        return {name: int(getattr(self, name).size) for name in PARTS}

    def to_dict(self) -> dict:
        """Plain-Python form (index lists, seed, sizes, groups per part)."""
        out = {name: getattr(self, name).tolist() for name in PARTS}
        out.update(seed=self.seed, sizes=self.sizes, groups={k: list(v) for k, v in self.groups.items()},
                   by=self.by, warning=self.warning)
        return out

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """JSON text of :meth:`to_dict`; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> Split:
        """Rebuild a split from JSON text or from a file path holding it."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            with open(source, encoding="utf-8") as fh:
                text = fh.read()
        data = json.loads(text)
        return cls(*(data[name] for name in PARTS), seed=data.get("seed"), groups=data.get("groups") or {},
                   by=data.get("by", "group"), warning=data.get("warning"))

    def check_disjoint(self, groups) -> None:
        """Raise ValueError if an index or an acquisition group appears in two parts."""
        groups = np.asarray(groups).astype(str)
        for a, b in _pairs(PARTS):
            ia, ib = getattr(self, a), getattr(self, b)
            for idx in (ia, ib):
                if idx.size and (idx.min() < 0 or idx.max() >= groups.size):
                    raise ValueError(f"split indices out of range for {groups.size} maps")
            shared_idx = np.intersect1d(ia, ib)
            if shared_idx.size:
                raise ValueError(f"{shared_idx.size} map indices in both {a} and {b}: "
                                 f"{shared_idx[:5].tolist()}")
            shared = np.intersect1d(groups[ia], groups[ib])
            if shared.size:
                raise ValueError(f"acquisition groups in both {a} and {b}: {shared[:5].tolist()}")


def group_split(y, groups, *, test_size: float = 0.2, val_size: float = 0.15, seed: int = 0) -> Split:
    """Split maps into train/val/test by whole acquisition groups, stratified by class.

    ``test_size`` and ``val_size`` are fractions of all maps (reached as closely as whole groups
    allow); ``val_size=0`` gives an empty validation part. Logs a warning when a class cannot
    appear in every part; SplitError (:func:`check_group_layout`) when every class is one group.
    Raises ValueError on unusable input (too few groups, bad fractions).

    Parameters
    ----------
    y : array of int, shape (N,)
        Class of every map.
    groups : array of str, shape (N,)
        Acquisition group of every map.
    test_size, val_size : float
        Fractions of all maps for testing and validation.
    seed : int
        Seed of the split.

    Returns
    -------
    Split
        Indices into ``y``.
    """
    check_group_layout(y, groups)
    y, groups = _check_inputs(y, groups, test_size, val_size, seed)
    y_codes = np.unique(y, return_inverse=True)[1]
    g_codes = np.unique(groups, return_inverse=True)[1]
    seeds = np.random.SeedSequence(seed).generate_state(2)
    test, pool = _carve(y_codes, g_codes, np.arange(y.size), test_size, int(seeds[0]),
                        rest_groups_needed=2 if val_size > 0 else 1)
    if val_size > 0:
        val, train = _carve(y_codes, g_codes, pool, val_size / (1.0 - test_size), int(seeds[1]))
    else:
        val, train = np.array([], dtype=np.int64), pool
    parts = {"train": train, "val": val, "test": test}
    split = Split(**parts, seed=seed, groups={k: sorted(set(groups[v].tolist())) for k, v in parts.items()})
    split.check_disjoint(groups)
    _warn_coverage(y, groups, split, want_val=val_size > 0)
    log.info("group split (seed %d): %s maps, %s groups", seed, split.sizes,
             {k: len(v) for k, v in split.groups.items()})
    return split


def named_split(y, groups, test_groups, val_groups=(), *, val_size: float = 0.15, seed: int = 0) -> Split:
    """Split with the acquisition groups the user names in the test (and validation) part.

    Parameters
    ----------
    y, groups : array-like
        Class label and acquisition group of every map.
    test_groups : sequence of str
        Groups that form the test part.
    val_groups : sequence of str, optional
        Groups that form the validation part; when empty, whole groups holding about ``val_size`` of
        all maps are carved from the remaining groups (seeded), or none if ``val_size`` is 0.
    val_size : float
        Fraction of all maps for an automatic validation part.
    seed : int
        Seed of the automatic validation carve.

    Returns
    -------
    Split
        Every other group is training.

    Raises
    ------
    ValueError
        A named group is unknown or named twice, or no training group is left.
    """
    y, groups = np.asarray(y), np.asarray(groups).astype(str)
    known = sorted(set(groups.tolist()))
    test_groups, val_groups = [str(g) for g in test_groups], [str(g) for g in val_groups]
    unknown = [g for g in test_groups + val_groups if g not in known]
    if unknown:
        raise ValueError(f"unknown acquisition groups {unknown}; the groups are: {', '.join(known[:20])}"
                         + (" ..." if len(known) > 20 else ""))
    both = sorted(set(test_groups) & set(val_groups))
    if both:
        raise ValueError(f"groups named for both test and validation: {both}")
    test = np.flatnonzero(np.isin(groups, test_groups))
    val = np.flatnonzero(np.isin(groups, val_groups))
    pool = np.flatnonzero(~np.isin(groups, test_groups + val_groups))
    if pool.size == 0:
        raise ValueError("the named test and validation groups leave no group for training")
    if not val_groups and val_size > 0:
        if np.unique(groups[pool]).size < 2:
            log.warning("one training group left: no validation part")
        else:
            y_codes = np.unique(y, return_inverse=True)[1]
            g_codes = np.unique(groups, return_inverse=True)[1]
            val, pool = _carve(y_codes, g_codes, pool, min(0.9, val_size * y.size / pool.size), seed)
    parts = {"train": pool, "val": val, "test": test}
    split = Split(**parts, seed=seed, groups={k: sorted(set(groups[v].tolist())) for k, v in parts.items()})
    split.check_disjoint(groups)
    _warn_coverage(y, groups, split, want_val=val.size > 0 and not val_groups)
    return split


def check_group_layout(y, groups) -> None:
    """Raise :class:`~opdcells.errors.SplitError` when no group split exists: every class has a single
    acquisition group (and there are at least two classes and two groups), so any test group holds a
    class that training never saw.

    Parameters
    ----------
    y, groups : array-like, (N,)
        Class label and acquisition group of every map.

    Raises
    ------
    SplitError
        One line: what is wrong (classes and their one group) and :data:`WAYS_FORWARD`.
    """
    y, groups = np.asarray(y), np.asarray(groups).astype(str)
    if y.ndim != 1 or y.shape != groups.shape:
        return   # reported by the input checks
    classes = np.unique(y)
    per_class = {c: np.unique(groups[y == c]) for c in classes.tolist()}
    if len(classes) < 2 or np.unique(groups).size < 2 or any(len(g) > 1 for g in per_class.values()):
        return
    shown = ", ".join(repr(str(g[0])) for g in list(per_class.values())[:4])
    more = ", ..." if len(per_class) > 4 else ""
    raise SplitError(f"each class is one acquisition group ({shown}{more}: the files lie directly in one "
                     f"folder per class), so no split can test on sessions the model has not seen; "
                     f"{WAYS_FORWARD}")


def groups_from_pattern(names, pattern: str) -> np.ndarray:
    """Acquisition group of each map from its source file name and a regular expression.

    Parameters
    ----------
    names : array-like of str, (N,)
        Source file names (``dataset.source_file``).
    pattern : str
        Python regular expression searched in each name; the group is its named group ``group``, else
        its first group, else the whole match (``'day\\d+'``, ``'(?P<group>[^/]+)_cell\\d+'``).

    Returns
    -------
    np.ndarray of str, (N,)

    Raises
    ------
    SplitError
        The pattern is not a valid regular expression, or does not match a name (the first is named).
    """
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise SplitError(f"--group-pattern {pattern!r} is not a regular expression ({exc})") from None
    out = []
    for name in np.asarray(names).astype(str):
        match = regex.search(name)
        if match is None:
            n_bad = sum(regex.search(str(n)) is None for n in np.asarray(names).astype(str))
            raise SplitError(f"--group-pattern {pattern!r} does not match {n_bad} source file names, e.g. "
                             f"{str(name)!r}")
        key = "group" if "group" in regex.groupindex else (1 if regex.groups else 0)
        out.append(match.group(key) or "")
    return np.asarray(out, dtype=str)


def dataset_groups(dataset, group_pattern: str | None = None) -> np.ndarray:
    """Acquisition group of every map of an opened dataset: its ``group`` column, or with
    ``group_pattern`` :func:`groups_from_pattern` of its source file names (SplitError naming the dataset
    if the pattern does not fit).

    Parameters
    ----------
    dataset : OPDDataset
        The open dataset.
    group_pattern : str, optional
        A regular expression over the source file names (named groups joined).

    Returns
    -------
    numpy.ndarray of str, shape (N_maps,)
        The groups.
    """
    if group_pattern is None:
        return dataset.groups
    try:
        return groups_from_pattern(dataset.source_file, group_pattern)
    except SplitError as exc:
        raise SplitError(exc.reason, dataset.path) from None


def map_split(y, *, test_size: float = 0.2, val_size: float = 0.15, seed: int = 0) -> Split:
    """Stratified random split of single maps (``train --split-by map``), with a loud warning.

    Maps of one session land in several parts, so the test figures say nothing about new sessions;
    :data:`MAP_SPLIT_WARNING` is logged and kept in ``Split.warning`` (config.json, metrics.json).

    Parameters
    ----------
    y : array-like, (N,)
        Class label of every map.
    test_size, val_size : float
        Fractions of all maps for the test and validation parts (``val_size`` may be 0).
    seed : int
        Seed of the draw.

    Returns
    -------
    Split
        ``by="map"``, no group lists.
    """
    y = np.asarray(y)
    _check_inputs(y, np.arange(y.size), test_size, val_size, seed)
    idx = np.arange(y.size)
    stratify = y if np.bincount(np.unique(y, return_inverse=True)[1]).min() >= 3 else None
    rest, test = train_test_split(idx, test_size=test_size, stratify=stratify, random_state=seed)
    val = np.array([], dtype=np.int64)
    if val_size > 0:
        sub = y[rest] if stratify is not None else None
        rest, val = train_test_split(rest, test_size=val_size / (1.0 - test_size), stratify=sub,
                                     random_state=seed + 1)
    log.warning("%s", MAP_SPLIT_WARNING)
    return Split(rest, val, test, seed=seed, by="map", warning=MAP_SPLIT_WARNING)


def subsample_labelled(train_idx, y, fraction: float, seed: int = 0) -> np.ndarray:
    """Stratified subset of ``train_idx`` with ~``fraction`` of each class (at least one map per class).

    ``y`` is the label array of ALL maps (indexed by ``train_idx``). Subsets drawn with the same seed
    are nested (a smaller fraction is contained in a larger one), as label-efficiency curves need.
    scikit-learn's stratified samplers may drop a rare class entirely, hence the per-class draw.

    Parameters
    ----------
    train_idx : array of int
        The training maps.
    y : array of int, shape (N_maps,)
        Label of every map.
    fraction : float
        Fraction of each class kept, in (0, 1].
    seed : int
        Seed of the draw.

    Returns
    -------
    numpy.ndarray of int
        The subset (sorted).
    """
    train_idx = np.asarray(train_idx, dtype=np.int64)
    y = np.asarray(y)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if train_idx.size == 0:
        raise ValueError("train_idx is empty: nothing to subsample")
    labels = y[train_idx]
    rng = np.random.default_rng(seed)
    keep = []
    for cls in np.unique(labels):
        members = rng.permutation(train_idx[labels == cls])
        keep.append(members[: max(1, round(fraction * members.size))])
    return np.sort(np.concatenate(keep))


def _check_inputs(y, groups, test_size, val_size, seed) -> tuple[np.ndarray, np.ndarray]:
    """Validate arguments; return ``y`` and ``groups`` (as str) as 1-D arrays."""
    y, groups = np.asarray(y), np.asarray(groups)
    if y.ndim != 1 or groups.shape != y.shape:
        raise ValueError(f"y and groups must be 1-D of equal length, got shapes {y.shape} and {groups.shape}")
    if y.size == 0:
        raise ValueError("cannot split an empty set of maps")
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    if not 0.0 <= val_size < 1.0 or test_size + val_size >= 1.0:
        raise ValueError(f"val_size must be in [0, 1) with test_size + val_size < 1, got {val_size}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    groups = groups.astype(str)
    n_groups, needed = np.unique(groups).size, 3 if val_size > 0 else 2
    if n_groups < needed:
        parts, hint = ("train/val/test", " or set val_size=0") if val_size > 0 else ("train/test", "")
        raise ValueError(f"a {parts} split needs at least {needed} acquisition groups; got {n_groups} "
                         f"({sorted(set(groups.tolist()))[:5]}). Acquire more sessions{hint}.")
    return y, groups


def _carve(y, g, pool, fraction, seed, *, rest_groups_needed=1) -> tuple[np.ndarray, np.ndarray]:
    """Take whole groups holding ~``fraction`` of ``pool``'s maps; return (part, rest) indices.

    The rest keeps at least ``rest_groups_needed`` groups (room for a later carve), per class where
    the class has enough groups. Among the candidates with the fewest coverage violations, one whose
    size/mix error is within ``NEAR_BEST * fraction`` of the best is drawn with the seed, so different
    seeds give different (equally good) splits.
    """
    yp = y[pool]
    local = np.unique(g[pool], return_inverse=True)[1]
    counts = np.zeros((local.max() + 1, y.max() + 1))
    np.add.at(counts, (local, yp), 1)
    masks, scores = [], []
    for tier in _candidate_tiers(yp, local, fraction, seed, rest_groups_needed):
        tier = [m for m in tier if m.any() and (~m).sum() >= rest_groups_needed]
        masks += tier
        scores += [_score(counts, m, fraction, rest_groups_needed) for m in tier]
        if scores and min(scores)[0] == 0:
            break
    scores = np.array(scores)
    ok = scores[:, 0] == scores[:, 0].min()
    ok &= scores[:, 1] <= scores[ok, 1].min() + NEAR_BEST * fraction
    in_part = masks[np.random.default_rng(seed).choice(np.flatnonzero(ok))][local]
    return pool[in_part], pool[~in_part]


def _candidate_tiers(yp, local, fraction, seed, rest_groups_needed) -> Iterator[list[np.ndarray]]:
    """Lists of boolean masks over groups (True = in the part) from scikit-learn group splitters.

    First tier: GroupShuffleSplit draws and StratifiedGroupKFold folds of about ``fraction``; later
    tiers use fewer, larger folds (tried only when rare classes are not covered yet).
    """
    n_groups = local.max() + 1
    max_splits = min(n_groups, int(np.bincount(yp).max()), max(2, round(1.0 / fraction)))
    n_test = min(n_groups - rest_groups_needed, max(1, round(fraction * n_groups)))
    x = np.zeros(yp.size)
    shuffles = np.random.SeedSequence(seed).generate_state(N_SHUFFLES).tolist()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        parts = [part for _, part in
                 GroupShuffleSplit(N_DRAWS, test_size=n_test, random_state=shuffles[0]).split(x, yp, local)]
        for n_splits in [*range(max_splits, 1, -1), None]:
            if n_splits is not None:
                parts += [part for s in shuffles for _, part in
                          StratifiedGroupKFold(n_splits, shuffle=True, random_state=s).split(x, yp, local)]
            yield [m for part in parts for m in _group_masks(local, part)]
            parts = []


def _group_masks(local, part) -> tuple[np.ndarray, np.ndarray]:
    """Mask of the groups holding the maps ``part``, and its complement."""
    mask = np.zeros(local.max() + 1, dtype=bool)
    mask[local[part]] = True
    return mask, ~mask


def _score(counts, mask, fraction, rest_groups_needed) -> tuple[int, float]:
    """(coverage violations, size error + class-mix error) of putting the ``mask`` groups in the part.

    ``counts`` is (groups, classes) map counts. Violations: a class with >= 2 groups missing from the
    part, or a class keeping fewer groups in the rest than it needs (1, or ``rest_groups_needed``
    where it has enough groups).
    """
    present = counts > 0
    n_class_groups = present.sum(axis=0)
    keep = np.minimum(np.maximum(n_class_groups - 1, 1), rest_groups_needed) * (n_class_groups > 0)
    violations = int(np.sum(present[~mask].sum(axis=0) < keep)
                     + np.sum((n_class_groups >= 2) & (present[mask].sum(axis=0) == 0)))
    part, total = counts[mask].sum(axis=0), counts.sum(axis=0)
    size_error = abs(part.sum() / total.sum() - fraction)
    mix_error = 0.5 * np.abs(part / max(part.sum(), 1) - total / total.sum()).sum()
    return violations, size_error + mix_error


def _warn_coverage(y, groups, split: Split, *, want_val: bool) -> None:
    """Warn about classes missing from a part, saying why (too few acquisition groups)."""
    for cls in np.unique(y).tolist():
        cls_groups = np.unique(groups[y == cls]).tolist()
        missing = [name for name in PARTS
                   if (name != "val" or want_val) and not np.any(y[getattr(split, name)] == cls)]
        if not missing:
            continue
        if len(cls_groups) == 1:
            reason = f"it has only one acquisition group ({cls_groups[0]!r}), which cannot be in two parts"
        else:
            reason = f"its {len(cls_groups)} acquisition groups cannot cover every part"
        log.warning("class %r has no maps in %s: %s", cls, "/".join(missing), reason)


def _pairs(items):
    """All unordered pairs of ``items``."""
    return [(a, b) for i, a in enumerate(items) for b in items[i + 1:]]
