"""Model folders are data (issue 11 item 1): no pickle is ever loaded, the features model is a skops file
with an explicit list of trusted types, Keras loads in safe_mode, run names never come from the current
directory by surprise."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import pandas as pd
import pytest
from helpers import tiny_run, write_exports

pytest.importorskip("tensorflow")

import skops.io  # noqa: E402

from opdcells.errors import ModelError  # noqa: E402
from opdcells.learners import FEATURES_TRUSTED_TYPES  # noqa: E402
from opdcells.modelfolder import FORMAT_VERSION, SAVED_MODELS_ENV, load_model, saved_models_root  # noqa: E402
from opdcells.predict import predict_files  # noqa: E402


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return tiny_run(tmp_path_factory, "features", "cancer_vs_blood")


@pytest.fixture
def folder(features, tmp_path):
    """A copy of the trained features model folder, free to tamper with."""
    return Path(shutil.copytree(features.model_dir, tmp_path / "model"))


class MakesAFile:
    """Unpickling this runs ``Path.touch(marker)``: what a hostile pickle could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)

    def __setstate__(self, state):   # what skops would call while building an object of this type
        Path(state["marker"]).touch()


def set_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_features_model_is_a_skops_file_with_only_trusted_types(features):
    folder = features.model_dir
    assert (folder / "model.skops").is_file() and not (folder / "model.joblib").exists()
    assert features.config["format_version"] == FORMAT_VERSION >= 3
    assert features.config["model_file"] == "model.skops"
    assert set(skops.io.get_untrusted_types(file=folder / "model.skops")) <= set(FEATURES_TRUSTED_TYPES)


@pytest.mark.parametrize("version", [2, FORMAT_VERSION])
def test_a_pickle_in_a_model_folder_is_refused_and_never_run(folder, tmp_path, version):
    marker = tmp_path / "pickle_ran"
    (folder / "model.joblib").write_bytes(pickle.dumps(MakesAFile(marker)))
    if version < 3:   # an old folder: the pickle is its only model file
        (folder / "model.skops").unlink()
        set_config(folder, format_version=version, model_file="model.joblib")
    with pytest.raises(ModelError, match="model.joblib is a pickle, which runs code when loaded; .* retrain"):
        load_model(folder)
    assert not marker.exists()


def test_old_features_folder_without_pickle_file_is_refused_by_its_format(folder):
    set_config(folder, format_version=2)
    with pytest.raises(ModelError, match="model format 2 is a pickle.*python -m opdcells train --model feat"):
        load_model(folder)


def test_a_skops_file_with_untrusted_types_is_refused_before_building_them(folder, tmp_path):
    marker = tmp_path / "object_built"
    skops.io.dump({"estimator": MakesAFile(marker), "feature_names": [], "pixel_size_um": 1.0},
                  folder / "model.skops")
    with pytest.raises(ModelError, match="model.skops: holds types opdcells does not trust.*MakesAFile"):
        load_model(folder)
    assert not marker.exists()


def test_run_names_come_only_from_the_configured_saved_models(features, tmp_path, monkeypatch):
    planted = tmp_path / "cwd" / "saved_models"
    shutil.copytree(features.model_dir, planted / "features_cancer_vs_blood")
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delenv(SAVED_MODELS_ENV, raising=False)
    assert saved_models_root().resolve() != planted.resolve()
    with pytest.raises(ModelError, match="no such run in .*saved_models"):
        load_model("features_cancer_vs_blood")       # the current directory's saved_models/ is not looked at
    run = planted / "features_cancer_vs_blood"
    assert load_model(run.name, saved_models=planted).folder == run
    monkeypatch.setenv(SAVED_MODELS_ENV, str(planted))
    assert load_model(run.name).folder == run
    monkeypatch.delenv(SAVED_MODELS_ENV)
    shutil.copytree(planted / "features_cancer_vs_blood", tmp_path / "cwd" / "here")
    with pytest.raises(ModelError, match="write ./here"):
        load_model("here")
    assert load_model("./here").name == "features_cancer_vs_blood"


def test_keras_models_load_in_safe_mode(folder, tmp_path):
    import keras

    marker = tmp_path / "lambda_ran"
    where = str(marker)   # a closure Keras can serialise: the lambda's code travels in the file
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Lambda(lambda x: x + len(str(open(where, "w").close())))])
    model.save(folder / "model.keras")
    marker.unlink()   # building the model here ran the lambda once
    set_config(folder, model="mobilenetv2", model_file="model.keras")
    with pytest.raises(ModelError, match="model.keras.*safe_mode"):
        load_model(folder)
    assert not marker.exists()


def test_predict_skips_fifos_and_devices_and_keeps_odd_names(features, tmp_path):
    good = write_exports(tmp_path / "in", classes=("SW480",), per_class=1)[0]
    odd = Path(os.fsdecode(os.fsencode(tmp_path / "in") + b"/caf\xe9\nx.mat"))
    shutil.copy(good, odd)
    os.mkfifo(tmp_path / "in" / "pipe.mat")
    (tmp_path / "in" / "zero.mat").symlink_to("/dev/zero")
    signal.alarm(30)   # a regression blocks on the FIFO: fail instead of hanging
    try:
        result = predict_files(features.model, [tmp_path / "in"], tmp_path / "preds.csv")
    finally:
        signal.alarm(0)
    assert result.status == 1 and result.n_files == 2
    assert sorted(line.split(": ", 1)[1].split(" (")[0] for line in result.skipped_files) == [
        "not a regular file", "not a regular file"]
    files = sorted(pd.read_csv(result.out)["file"])
    assert files == sorted([str(good), str(tmp_path / "in" / "caf\\xe9\nx.mat")])
