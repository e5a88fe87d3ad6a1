"""What every command shares: the exit codes, the common options, the logging set-up and a quiet TensorFlow
whose freed memory glibc keeps.

Exit status of every command (``python -m opdcells COMMAND`` and ``load_data.py``):

==== ===========================================================================================
0    success: everything loaded / trained / evaluated / predicted (or nothing new to load)
1    some inputs skipped: some export files or maps could not be read (``load``, ``predict``)
2    a usage error, an opdcells error (bad dataset, model, export or task: one line on stderr),
     nothing could be done, or a ``--strict`` stop (the dataset is then unchanged)
130  interrupted (Ctrl-C); written data are left as they were before the run
==== ===========================================================================================

This module never imports TensorFlow at import time: :func:`import_tensorflow` does, for the commands
that need it, after setting the environment that silences its start-up lines.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable

from .errors import safe_text

EXIT_OK, EXIT_SKIPPED, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 130

#: TensorFlow's environment, set before it is imported; values the user has set win.
#:
#: - ``TF_CPP_MIN_LOG_LEVEL=2`` keeps its C++ INFO and WARNING lines (oneDNN notices, CPU feature notes,
#:   CUDA probing) out of the terminal; C++ errors still show.
#: - ``TF_ENABLE_ONEDNN_OPTS=1`` runs convolutions and matrix products on the CPU with oneDNN's kernels.
#:   TensorFlow (since 2.9) turns them on by itself only on CPUs with AVX-512 VNNI / BF16, AVX-VNNI or AMX
#:   (``tensorflow/core/util/port.cc``, ``IsMklEnabled``); elsewhere, e.g. an AMD EPYC with AVX2, its Eigen
#:   kernels train ResNet50 2.6-4x and VGG16 1.8x slower per step and MobileNetV2 no faster
#:   (``benchmarks/bench_onednn.py``). ``TF_ENABLE_ONEDNN_OPTS=0`` keeps Eigen's.
TENSORFLOW_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "1"}

#: glibc ``malloc`` settings for TensorFlow on the CPU (the names glibc reads from the environment at
#: process start): one arena, no chunks of their own mapping, no trimming of the heap below 1 GiB free.
#: A training step frees and re-allocates its activation buffers; with glibc's defaults the large ones go
#: back to the system (chunks above the mmap threshold, at most 32 MB, are mapped and unmapped, heap
#: tops are trimmed) and the next step faults every page in again, in the kernel's time. Kept, the
#: memory is reused: ``benchmarks/bench_allocator.py`` measures the training step with both.
ALLOCATOR_ENVIRONMENT = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                         "MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_TOP_PAD_": str(1 << 26)}

#: ``mallopt`` parameter of each :data:`ALLOCATOR_ENVIRONMENT` name (glibc's malloc.h: M_ARENA_MAX,
#: M_MMAP_MAX, M_TRIM_THRESHOLD, M_TOP_PAD).
_MALLOPT_PARAMETER = {"MALLOC_ARENA_MAX": -8, "MALLOC_MMAP_MAX_": -4, "MALLOC_TRIM_THRESHOLD_": -1,
                      "MALLOC_TOP_PAD_": -2}

#: ``OPDCELLS_ALLOCATOR=default`` leaves glibc's allocator as it is.
ALLOCATOR_SWITCH = "OPDCELLS_ALLOCATOR"

#: TensorFlow start-up lines that say nothing about the run: written before absl's logging is set up
#: (so TF_CPP_MIN_LOG_LEVEL cannot hold them back), or the CUDA probe failing on a machine without a GPU.
TENSORFLOW_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|"
    r"Could not find cuda drivers|cpu_feature_guard|^To enable the following instructions|"
    r"failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation placer already registered|TF-TRT Warning|oneDNN supports DT_INT32 only")


def common_options() -> argparse.ArgumentParser:
    """The parent parser of the options every command takes (``-q/--quiet``, ``-v/--verbose``).

    Returns
    -------
    argparse.ArgumentParser
        A parser without help, for ``parents=[common_options()]``.
    """
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages (and tracebacks)")
    return p


# --------------------------------------------------------------------------------------- logging


class LogFormat(logging.Formatter):
    """One line per record: INFO as the bare message, other levels prefixed (``warning: ...``).

    Every message goes through :func:`opdcells.errors.safe_text`, so a file name cannot forge or hide a line.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return safe_text(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}"


def setup_logging(quiet: bool = False, verbose: bool = False, *, summary: str | None = None
                  ) -> Callable[[], None]:
    """Send opdcells' log records to stderr, one line each (see :class:`LogFormat`).

    Parameters
    ----------
    quiet, verbose : bool
        Only warnings and errors; or debug messages too. The default shows INFO.
    summary : str, optional
        Logger of a command that reports its own summary at INFO (``load``): the rest of the package then
        shows only its problems (WARNING), as ``load_data.py`` always did, unless ``verbose``.

    Returns
    -------
    callable
        Undoes the set-up (a command may run several times in one process, e.g. in tests).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormat("%(message)s"))
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    levels = {"opdcells": level}
    if summary is not None:
        levels = {"opdcells": logging.DEBUG if verbose else logging.WARNING, summary: level}
    if not verbose:  # TensorFlow's and absl's Python-side warnings (retracing notes, compiled metrics ...)
        levels.update({"tensorflow": logging.ERROR, "absl": logging.ERROR})
    levels.setdefault("papermill", logging.WARNING)   # e.g. a parameter the notebook does not define
    handled = ("opdcells", "papermill")
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)
    for name in handled:
        logging.getLogger(name).addHandler(handler)

    def restore() -> None:
        for name in handled:
            logging.getLogger(name).removeHandler(handler)
        for name, value in saved.items():
            logging.getLogger(name).setLevel(value)

    return restore


# --------------------------------------------------------------------------------------- TensorFlow


def tensorflow_environment(environ: dict | None = None) -> dict:
    """Set :data:`TENSORFLOW_ENVIRONMENT` in ``environ`` (default ``os.environ``) where not already set.

    GPUs stay visible: nothing here hides a device, only log lines; oneDNN's kernels are CPU kernels.
    TensorFlow reads the variables when it is imported: ``import opdcells`` sets them in ``os.environ``,
    so child processes (notebook kernels, test workers) inherit them.

    Parameters
    ----------
    environ : dict, optional
        The environment to change (default ``os.environ``).

    Returns
    -------
    dict
        ``environ``.
    """
    environ = os.environ if environ is None else environ
    for name, value in TENSORFLOW_ENVIRONMENT.items():
        environ.setdefault(name, value)
    return environ


def allocator_environment(environ: dict | None = None) -> dict:
    """Set :data:`ALLOCATOR_ENVIRONMENT` in ``environ`` (default ``os.environ``) for child processes.

    Nothing is set where the user has set any of these variables (theirs win, all of them) or
    ``OPDCELLS_ALLOCATOR=default``. The variables act on processes started afterwards (glibc reads them
    at start); :func:`keep_allocated_memory` also applies them to this process.

    Parameters
    ----------
    environ : dict, optional
        The environment to change (default ``os.environ``).

    Returns
    -------
    dict
        ``environ``.
    """
    environ = os.environ if environ is None else environ
    if _allocator_left_to_us(environ):
        environ.update(ALLOCATOR_ENVIRONMENT)
    return environ


def _allocator_left_to_us(environ) -> bool:
    """Neither ``OPDCELLS_ALLOCATOR=default`` nor any :data:`ALLOCATOR_ENVIRONMENT` variable set."""
    return (environ.get(ALLOCATOR_SWITCH) != "default"
            and not any(name in environ for name in ALLOCATOR_ENVIRONMENT))


def keep_allocated_memory() -> dict[str, str]:
    """Apply :data:`ALLOCATOR_ENVIRONMENT` to this process (glibc's ``mallopt``) and to its children.

    Call it before TensorFlow is imported (its threads then share the one arena);
    :func:`import_tensorflow` does. Does nothing on a C library other than glibc, where the user has set
    any of the variables, or with ``OPDCELLS_ALLOCATOR=default``.

    Returns
    -------
    dict
        The settings applied to this process (name -> value); empty when none were.
    """
    import ctypes
    import platform

    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    if not on_glibc or not _allocator_left_to_us(os.environ):
        return {}
    mallopt = ctypes.CDLL(None).mallopt
    applied = {name: value for name, value in ALLOCATOR_ENVIRONMENT.items()
               if mallopt(_MALLOPT_PARAMETER[name], int(value)) == 1}   # 1: accepted
    os.environ.update(applied)
    return applied


def drop_noise(text: str) -> list[str]:
    """The lines of ``text`` worth showing.

    Parameters
    ----------
    text : str
        What a process wrote to its stderr (several lines).

    Returns
    -------
    list of str
        The non-empty lines that do not match :data:`TENSORFLOW_NOISE`, in order.
    """
    return [line for line in text.splitlines() if line.strip() and not TENSORFLOW_NOISE.search(line)]


def import_tensorflow(verbose: bool = False):
    """Import TensorFlow and find its devices without its start-up noise.

    The lines TensorFlow writes to file descriptor 2 while it loads and probes for GPUs are captured;
    those matching :data:`TENSORFLOW_NOISE` are dropped and any other line is written to stderr as it
    came (so a real error still shows). A GPU is used as before. Before the import, glibc's allocator is
    told to keep the memory TensorFlow frees (:func:`keep_allocated_memory`). Does nothing when TensorFlow
    is already imported.

    Parameters
    ----------
    verbose : bool
        Import without capturing: every line shows.

    Returns
    -------
    module
        ``tensorflow``.

    Raises
    ------
    ImportError
        TensorFlow is not installed (its lines, if any, are shown).
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    keep_allocated_memory()
    tensorflow_environment()
    if verbose:
        import tensorflow as tf

        return tf
    with captured_stderr() as lines:
        import tensorflow as tf

        tf.config.list_physical_devices()   # the CUDA probe (cuInit) happens here, inside the capture
    kept = drop_noise("\n".join(lines))
    if kept:
        print("\n".join(kept), file=sys.stderr)
    return tf


@contextlib.contextmanager
def captured_stderr():
    """Capture what is written to file descriptor 2 (C and C++ libraries' lines as well as Python's) while
    the block runs.

    Yields
    ------
    list of str
        Empty inside the block; afterwards (also when it raised) the lines written, in order.
    """
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines += captured.read().decode(errors="replace").splitlines()
