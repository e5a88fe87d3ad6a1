"""Safety of the data side against hostile or odd inputs (issue 11): no hangs on FIFOs and devices, one
line per bad file whatever the reader raises, names printed safely, manifests naming the bad row,
symbolic-link folders followed without looping, one export never under two labels."""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest

from load_data import main
from opdcells import readers
from opdcells.dataset import open_dataset
from opdcells.errors import ExportError, safe_text
from opdcells.ingest import IngestOptions, discover, iter_processed, read_manifest, sha256_file

PX = 0.25
NM = ["--units", "nm", "--pixel-size-um", str(PX)]
SECONDS = 10   # far more than any of these needs; a regression that blocks fails instead of hanging


class Blocked(Exception):
    """Raised by the alarm in a test that blocks (not an OSError, which the code under test may catch)."""


@pytest.fixture(autouse=True)
def no_hang():
    """Fail a test that blocks (reading a FIFO, hashing /dev/zero) instead of hanging the run: the alarm
    fires after SECONDS, then every second, so each later block is interrupted too."""
    def timeout(signum, frame):
        raise Blocked(f"blocked for more than {SECONDS} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, SECONDS, 1.0)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def cell(seed=0, size=64):
    """A noisy disc-shaped cell (OPD in nm) near the centre of the map."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] * PX
    centre = size * PX / 2 + rng.uniform(-1, 1, 2)
    disc = np.clip(1 - ((x - centre[1]) ** 2 + (y - centre[0]) ** 2) / 25.0, 0, None)
    return (20.0 + rng.normal(0, 2, (size, size)) + 300.0 * np.sqrt(disc)).astype(np.float32)


def save(path, array):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path


def load(argv, capsys):
    """Run load_data.main(argv) in-process; return (exit status, stderr lines)."""
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err.splitlines()


def lines_with(lines, text):
    return [line for line in lines if text in line]


@pytest.fixture
def hostile(tmp_path):
    """SRC/SW480 with one good export, a FIFO and a link to /dev/zero that both have export names."""
    src = tmp_path / "SRC"
    save(src / "SW480" / "good.npy", cell(1))
    os.mkfifo(src / "SW480" / "pipe.npy")
    (src / "SW480" / "zero.npy").symlink_to("/dev/zero")
    return src


def test_fifo_and_device_in_source_folder_are_refused_in_one_line(hostile, tmp_path, capsys):
    status, err = load([hostile, "--out", tmp_path / "ds.h5", *NM], capsys)
    assert status == 1
    assert len(lines_with(err, "pipe.npy: not a regular file (a FIFO)")) == 1
    assert len(lines_with(err, "zero.npy: not a regular file (a character device)")) == 1
    assert lines_with(err, "added 1 map from 1 file")
    with open_dataset(tmp_path / "ds.h5") as ds:
        assert len(ds) == 1


def test_fifo_and_device_in_manifest_are_refused(hostile, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nSRC/SW480/pipe.npy,SW480\nSRC/SW480/zero.npy,SW480\n"
                        "SRC/SW480/good.npy,SW480\n")
    status, err = load(["--manifest", manifest, "--out", tmp_path / "ds.h5", *NM], capsys)
    assert status == 1
    assert lines_with(err, "pipe.npy: not a regular file (a FIFO)")
    assert lines_with(err, "zero.npy: not a regular file (a character device)")
    assert lines_with(err, "added 1 map from 1 file")


def test_hash_and_readers_refuse_non_regular_files_without_opening_them(hostile, tmp_path):
    for name, kind in (("pipe.npy", "FIFO"), ("zero.npy", "character device"), ("", "folder")):
        with pytest.raises(ExportError, match=f"not a regular file \\(a {kind}\\)"):
            sha256_file(hostile / "SW480" / name)
    loop = tmp_path / "loop.npy"
    loop.symlink_to(loop)
    with pytest.raises(ExportError, match="loop.npy: cannot open"):
        sha256_file(loop)
    with pytest.raises(ExportError, match="not a regular file"):
        list(iter_processed(hostile / "SW480" / "pipe.npy", IngestOptions(units="nm", pixel_size_um=PX)))


@pytest.mark.parametrize("where", ["external raw data", "external link"])
def test_hdf5_data_outside_the_file_is_refused(tmp_path, where):
    """A v7.3 .mat / qpimage file whose data lives in a FIFO would block h5py forever."""
    fifo = tmp_path / "raw.bin"
    os.mkfifo(fifo)
    path = tmp_path / "cells.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["qpimage version"] = "0.9.1"
        if where == "external link":
            h5["qpi_0"] = h5py.ExternalLink(str(fifo), "/phase")
        else:
            h5.create_dataset("phase", shape=(64, 64), dtype="f8", external=[(str(fifo), 0, 64 * 64 * 8)])
    with pytest.raises(ExportError, match="cells.h5: HDF5 .* not read \\(exports must be self-contained\\)"):
        readers.open_export(path)


def test_newline_and_escape_in_a_file_name_cannot_forge_a_line(tmp_path, capsys):
    src = tmp_path / "SRC"
    save(src / "SW480" / "good.npy", cell(1))
    save(src / "SW480" / "x.npy\nerror: \x1b[2Jforged.npy", np.zeros((64, 64)))
    status, err = load([src, "--out", tmp_path / "ds.h5", *NM], capsys)
    assert status == 1
    assert not [line for line in err if line.startswith("error: ")]      # no forged line
    assert not [line for line in err if "\x1b" in line]
    skipped = lines_with(err, "x.npy\\nerror: \\x1b[2Jforged.npy: ")
    assert len(skipped) == 1 and "all zeros" in skipped[0]


def test_non_utf8_file_names_are_loaded_and_named(tmp_path, capsys):
    src = tmp_path / "SRC"
    folder = os.fsencode(src / "SW480")
    save(os.fsdecode(folder + b"/caf\xe9.npy"), cell(1))            # Latin-1 name: not UTF-8
    save(os.fsdecode(folder + b"/bad\xff.npy"), np.zeros((64, 64)))
    save(src / "SW480" / "plain.npy", cell(2))
    status, err = load([src, "--out", tmp_path / "ds.h5", *NM], capsys)
    assert status == 1, err
    assert len(lines_with(err, "bad\\xff.npy: ")) == 1
    assert lines_with(err, "added 2 maps from 2 files")
    with open_dataset(tmp_path / "ds.h5") as ds:
        names = sorted(Path(p).name for p in ds.source_file)
    assert names == ["caf\\xe9.npy", "plain.npy"]


def test_manifest_nul_byte_and_bad_bytes_name_the_row(tmp_path, capsys):
    save(tmp_path / "a.npy", cell(1))
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"path,label\na.npy,SW480\n\"multi\nline.npy\",SW480\nb\x00.npy,SW480\n")
    with pytest.raises(ExportError, match=r"m\.csv: line 5: column 'path' holds a NUL byte"):
        read_manifest(manifest)
    status, err = load(["--manifest", manifest, "--out", tmp_path / "ds.h5", *NM], capsys)
    assert status == 2 and lines_with(err, "line 5: column 'path' holds a NUL byte")
    manifest.write_bytes(b"path,label\na.npy,SW480\na.npy,SW\xff480\n")
    with pytest.raises(ExportError, match=r"line 3: column 'label' .* not UTF-8 \(SW\\xff480\)"):
        read_manifest(manifest)


def test_manifest_path_may_be_a_non_utf8_file_name(tmp_path):
    name = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.npy")
    save(name, cell(1))
    (tmp_path / "m.csv").write_bytes(b"path,label\ncaf\xe9.npy,SW480\n")
    [(found, _)] = read_manifest(tmp_path / "m.csv")
    assert str(found.path) == name and found.path.is_file()


def test_symlinked_class_and_session_folders_are_followed(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    save(elsewhere / "SW480" / "a.npy", cell(1))
    save(elsewhere / "session" / "b.npy", cell(2))
    src = tmp_path / "SRC"
    (src / "PBMCs").mkdir(parents=True)
    (src / "SW480").symlink_to(elsewhere / "SW480")
    (src / "PBMCs" / "session").symlink_to(elsewhere / "session")
    (src / "PBMCs" / "session_loop").symlink_to(src)               # a loop back to the top
    (src / "PBMCs" / "self.npy").symlink_to(src / "PBMCs" / "self.npy")   # a file-name link loop
    found = discover([src])
    assert [(f.label, f.path.name) for f in found] == [("PBMCs", "self.npy"), ("PBMCs", "b.npy"),
                                                        ("SW480", "a.npy")]
    status, err = load([src, "--out", tmp_path / "ds.h5", *NM], capsys)
    assert status == 1 and lines_with(err, "added 2 maps from 2 files")
    assert lines_with(err, "self.npy: cannot open (Too many levels of symbolic links)")
    assert len(lines_with(err, "session_loop links back to a folder above it")) == 1


def test_one_export_under_two_labels_is_an_error_naming_both(tmp_path, capsys):
    src = tmp_path / "SRC"
    save(src / "SW480" / "a.npy", cell(1))
    save(src / "SW480" / "b.npy", cell(2))
    (src / "PBMCs").mkdir()
    (src / "PBMCs" / "a_again.npy").symlink_to(src / "SW480" / "a.npy")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nSRC/SW480/b.npy,monocytes\n")
    status, err = load([src, "--manifest", manifest, "--out", tmp_path / "ds.h5", *NM], capsys)
    assert status == 2, err    # every file was refused
    both = lines_with(err, "given two labels: ")
    assert len(both) == 4 and all("'SW480'" in line for line in both)
    assert len(lines_with(both, "'PBMCs'")) == 2 and len(lines_with(both, "'monocytes'")) == 2
    assert not (tmp_path / "ds.h5").exists() or len(open_dataset(tmp_path / "ds.h5")) == 0


def test_same_content_under_two_labels_is_a_warning_naming_both(tmp_path, capsys):
    src = tmp_path / "SRC"
    save(src / "SW480" / "a.npy", cell(1))
    save(src / "PBMCs" / "copy.npy", cell(1))
    status, err = load([src, "--out", tmp_path / "ds.h5", *NM], capsys)
    warned = lines_with(err, "has the same content as")
    assert len(warned) == 1 and "'PBMCs'" in warned[0] and "'SW480'" in warned[0]
    assert "copy.npy" in warned[0] and "a.npy" in warned[0]


class QpformatStyleError(BaseException):
    """qpformat's errors derive from BaseException, so ``except Exception`` lets them through."""


def test_any_reader_exception_is_a_one_line_skip(tmp_path, capsys, monkeypatch):
    src = tmp_path / "SRC"
    save(src / "SW480" / "a.npy", cell(1))
    save(src / "SW480" / "b.npy", cell(2))
    real_open = readers.NpyReader._open_array

    def failing(self):
        if self.path.name == "b.npy":
            raise QpformatStyleError("line one\nline two")
        return real_open(self)

    monkeypatch.setattr(readers.NpyReader, "_open_array", failing)
    status, err = load([src, "--out", tmp_path / "ds.h5", *NM], capsys)
    assert status == 1
    [skipped] = lines_with(err, "b.npy: ")
    assert skipped.endswith("QpformatStyleError: line one line two")
    assert lines_with(err, "added 1 map from 1 file")


def test_interrupts_are_not_turned_into_skips(tmp_path, monkeypatch):
    save(tmp_path / "a.npy", cell(1))

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(readers.NpyReader, "_open_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        list(iter_processed(tmp_path / "a.npy", IngestOptions(units="nm", pixel_size_um=PX)))


def test_safe_text_escapes_only_what_can_forge_or_hide_output():
    name = os.fsdecode(b"caf\xc3\xa9 \\ \xff\n\x1b\xe2\x80\xae.npy")       # é, backslash, bad byte, ...
    assert safe_text(name) == "café \\ \\xff\\n\\x1b\\u202e.npy"
    assert safe_text(safe_text(name)) == safe_text(name)
    with contextlib.suppress(ExportError):
        raise ExportError(name, "two\nlines")
    assert str(ExportError(name, "two\nlines")) == "café \\ \\xff\\n\\x1b\\u202e.npy: two lines"


def test_an_export_relabelled_in_a_later_run_is_an_error_naming_both(tmp_path, capsys):
    """A re-run that meets a stored export under another class says so instead of skipping it silently."""
    save(tmp_path / "a.npy", cell(1))
    out = tmp_path / "ds.h5"
    status, err = load([tmp_path / "a.npy", "--label", "SW480", "--out", out, *NM], capsys)
    assert status == 0, err
    status, err = load([tmp_path / "a.npy", "--label", "PBMCs", "--out", out, *NM], capsys)
    assert status == 2
    line = lines_with(err, "one export cannot have two labels")
    assert len(line) == 1 and "'SW480'" in line[0] and "'PBMCs'" in line[0] and "a.npy" in line[0]
    status, err = load([tmp_path / "a.npy", "--label", "SW480", "--out", out, *NM], capsys)
    assert status == 0 and len(open_dataset(out)) == 1, err
