"""Cost of appending one small export to datasets of growing size (the sharded store).

For each size N (default 200, 2,000 and 20,000 maps of 128 x 128 float32, written fast with
``DatasetWriter`` from synthetic maps, 100 maps per export file), appends one export of ``--add``
maps (already processed: only the store is timed) and measures

* bytes written: the sizes of every file of the dataset that is new or changed after the append;
* time: ``DatasetWriter`` open + ``add_file`` + commit (lock, shard, index, fsyncs, rename);

against a bare baseline: the same maps written with h5py to a fresh file (same chunking) and fsynced.

Goals (issue 11): appending to a 20,000-map dataset writes < 1% of the dataset's bytes, and an append
takes < 1 s beyond the file's own processing. What is written is the new shard (what the export adds)
plus the rewritten index (~300 B per map of the dataset: the per-map columns); the copy-based store
it replaces wrote the whole dataset on every append.

    .venv/bin/python benchmarks/bench_append.py [--sizes 200 2000 20000] [--add 5] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opdcells.dataset import DatasetWriter, open_dataset  # noqa: E402
from opdcells.metadata import Meta  # noqa: E402
from opdcells.preprocess import PreprocessConfig, ProcessedMap  # noqa: E402

SIZE = 128
CONFIG = PreprocessConfig(out_size=SIZE)
META = Meta(units="rad", wavelength_nm=633.0, pixel_size_um=0.12, medium_index=1.337)
MAPS_PER_FILE = 100
GOAL_FRACTION, GOAL_SECONDS, GOAL_N = 0.01, 1.0, 20000  # the byte goal is set for N >= 20,000


def synthetic(n: int, seed: int):
    """``n`` (index, ProcessedMap, Meta) of random 128 x 128 float32 maps."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        opd = rng.normal(0, 50, (SIZE, SIZE)).astype(np.float32)
        yield i, ProcessedMap(opd=opd, dry_mass_pg=20.0 + i % 7, area_um2=80.0), META


def add_export(writer: DatasetWriter, k: int, n: int) -> None:
    name = f"/data/lab/2026-11-{k % 28 + 1:02d}/session_{k:05d}/stack_{k:05d}.mat"
    writer.add_file(f"{k:064x}+opts", path=name, sha256=f"{k:064x}", label=f"class{k % 5}",
                    group=f"class{k % 5}/session_{k:05d}", maps=synthetic(n, k))


def build(path: Path, n: int) -> None:
    with DatasetWriter(path, CONFIG) as writer:
        for k in range(0, n // MAPS_PER_FILE):
            add_export(writer, k, MAPS_PER_FILE)


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """{path: (inode, size, mtime_ns)} of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.join(root, f)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def dataset_bytes(folder: Path) -> int:
    return sum(size for _, size, _ in snapshot(folder).values())


def append_one(path: Path, n_add: int, k: int) -> tuple[int, float]:
    """Bytes written and seconds taken by appending one export of ``n_add`` maps."""
    before = snapshot(path.parent)
    maps = list(synthetic(n_add, k))  # processed beforehand: only the store is timed
    t0 = time.perf_counter()
    with DatasetWriter(path, CONFIG) as writer:
        writer.add_file(f"{k:064x}+opts", path=f"/data/new/{k}.mat", sha256=f"{k:064x}", label="class0",
                        group="class0/new", maps=iter(maps))
    seconds = time.perf_counter() - t0
    after = snapshot(path.parent)
    written = sum(stat[1] for name, stat in after.items() if before.get(name) != stat)
    return written, seconds


def bare_write(path: Path, n_add: int, k: int) -> tuple[int, float]:
    """The same maps written with h5py alone to a fresh file, fsynced: bytes and seconds."""
    maps = np.stack([m.opd for _, m, _ in synthetic(n_add, k)])
    t0 = time.perf_counter()
    with h5py.File(path, "w") as h5:
        h5.create_dataset("opd", data=maps, chunks=(1, SIZE, SIZE))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return path.stat().st_size, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 2000, 20000])
    p.add_argument("--add", type=int, default=5, help="maps in the appended export")
    p.add_argument("--keep", type=Path, help="folder to keep the datasets in (default: a temporary one)")
    args = p.parse_args(argv)
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="bench_append_")
    root = args.keep or Path(tmp.name)
    rows, ok = [], True
    for n in args.sizes:
        folder = root / f"n{n}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "ds.h5"
        t0 = time.perf_counter()
        if not path.exists():
            build(path, n)
        build_s = time.perf_counter() - t0
        total = dataset_bytes(folder)
        written, seconds = append_one(path, args.add, 10**6 + n)
        bare_bytes, bare_s = bare_write(root / f"bare{n}.h5", args.add, 10**6 + n)
        with open_dataset(path) as ds:
            assert len(ds) == n + args.add and np.isfinite(ds.read(n + args.add - 1)).all()
        fraction = written / total
        ok &= seconds < GOAL_SECONDS and (fraction < GOAL_FRACTION or n < GOAL_N)
        rows.append((n, total, build_s, written, fraction, seconds, bare_bytes, bare_s))
    print(f"append one export of {args.add} maps ({SIZE}x{SIZE} float32) to a dataset of N maps")
    print(f"{'N':>7} {'dataset MB':>10} {'build s':>8} {'written KB':>10} {'% dataset':>9} {'append s':>8} "
          f"{'bare KB':>8} {'bare s':>7} {'bytes x bare':>12} {'time x bare':>11}")
    for n, total, build_s, written, fraction, seconds, bare_bytes, bare_s in rows:
        print(f"{n:>7} {total / 1e6:>10.1f} {build_s:>8.1f} {written / 1e3:>10.1f} {100 * fraction:>8.3f}% "
              f"{seconds:>8.3f} {bare_bytes / 1e3:>8.1f} {bare_s:>7.3f} {written / bare_bytes:>12.2f} "
              f"{seconds / bare_s:>11.2f}")
    print(f"goal: append < {GOAL_SECONDS:g} s, and written < {100 * GOAL_FRACTION:g}% of the dataset "
          f"from N = {GOAL_N:,} (the index costs ~300 B per map, a shard what it adds): "
          f"{'met' if ok else 'NOT met'} (the copy-based store wrote 100% on every append)")
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
