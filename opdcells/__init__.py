"""opdcells: tell cancer cells from blood cells in label-free optical path delay (OPD) maps.

The data side (readers, preprocessing, dataset, simulator) imports no deep-learning library;
``load_model`` imports Keras only when called.
"""
from __future__ import annotations

from .console import tensorflow_environment as _tensorflow_environment

# Before anything imports TensorFlow: its C++ start-up chatter (CUDA probing, oneDNN notes) kept out of
# the log, and oneDNN's CPU kernels on where TensorFlow leaves them off (console.TENSORFLOW_ENVIRONMENT);
# variables the user has set win.
_tensorflow_environment()

__version__ = "0.1.0"

__all__ = ["__version__", "open_dataset", "load_model"]


def open_dataset(path):
    """Open an opdcells HDF5 dataset lazily (see :func:`opdcells.dataset.open_dataset`).

    Parameters
    ----------
    path : str or os.PathLike
        The dataset (``DATASET.h5``).

    Returns
    -------
    OPDDataset
        The open dataset (a context manager; maps are read on demand).
    """
    from .dataset import open_dataset as _open

    return _open(path)


def load_model(path, **kwargs):
    """Load a saved model folder (see :func:`opdcells.modelfolder.load_model`); imports Keras when called.

    Parameters
    ----------
    path : str or os.PathLike
        A model folder, or a run name in the saved_models folder.
    **kwargs
        ``dataset`` and ``saved_models`` as :func:`opdcells.modelfolder.load_model` takes them.

    Returns
    -------
    SavedModel
        The loaded model.
    """
    from .modelfolder import load_model as _load

    return _load(path, **kwargs)
