"""``simulate --workers``: sessions simulated in worker processes give the same exports as one process."""
from __future__ import annotations

import h5py
import numpy as np
import scipy.io

from opdcells.simulate import simulate_dataset


def _contents(folder):
    """Relative path -> phase array of every export under ``folder`` (MATLAB v5 maps and v7.3 stacks)."""
    out = {}
    for path in sorted(folder.rglob("*.mat")):
        if path.name == "stack.mat":
            with h5py.File(path, "r") as f:
                out[path.relative_to(folder).as_posix()] = f["phase"][()]
        else:
            out[path.relative_to(folder).as_posix()] = scipy.io.loadmat(path)["phase"]
    return out


def test_two_worker_processes_write_the_same_exports_and_truth_as_one(tmp_path):
    one = simulate_dataset(tmp_path / "one", n_per_class=3, seed=5, sessions_per_class=2, progress=False)
    two = simulate_dataset(tmp_path / "two", n_per_class=3, seed=5, sessions_per_class=2, progress=False,
                           workers=2)
    assert one.read_text() == two.read_text(), "truth.csv: same rows in the same order"
    a, b = _contents(tmp_path / "one"), _contents(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(a) == 5 * 3   # per class: 2 single-map files and one stack
    for name in a:
        assert np.array_equal(a[name], b[name]), name
