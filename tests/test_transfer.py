"""opdcells.study.transfer: frozen probes on a saved run's split, label efficiency, real cells, and the
OPD_Model_and_DinoV2 notebook executed headless on a tiny dataset."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import REPO_ROOT, TINY_TRAINING, tiny_dataset, tiny_run

from opdcells import registry
from opdcells.dataset import open_dataset
from opdcells.splits import Split
from opdcells.study import transfer

MODELS = ["features", "mobilenetv2", "opd_mobilenetv2", "dinov2"]
NAME = "opd_dinov2"


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    with open_dataset(tiny_dataset(tmp_path_factory)) as opened:
        yield opened


@pytest.fixture(scope="module")
def encoders(ds):
    return transfer.Encoders(ds, input_size=32)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, ds):
    """A features run saved where compare_models would put it (``<saved>/<name>_features_five_class``)."""
    from opdcells.train import train

    saved = tmp_path_factory.mktemp("saved")
    train(ds, "features", "five_class", transfer.run_dir(saved, NAME, "features", "five_class"), n_boot=20,
          split_seed=1)   # a split seed other than the probes' seed: the split must come from the run
    return saved


def test_task_split_reads_the_runs_split_json(ds, saved_run):
    split, source = transfer.task_split(ds, "five_class", saved_models=saved_run, name=NAME, models=MODELS)
    stored = Split.from_json(transfer.run_dir(saved_run, NAME, "features", "five_class") / "split.json")
    assert source.endswith("split.json")
    assert np.array_equal(split.train, stored.train) and np.array_equal(split.test, stored.test)
    # no run for this task: the split train() would make with that seed
    from opdcells.tasks import get_task
    from opdcells.train import make_split

    other, source = transfer.task_split(ds, "cancer_vs_blood", saved_models=saved_run, name=NAME,
                                        models=MODELS)
    assert source.startswith("train.make_split")
    assert np.array_equal(other.test, make_split(ds, get_task("cancer_vs_blood"), seed=0).test)


def test_random_init_cnn_embeddings_need_and_get_bn_recalibration(encoders, ds):
    with pytest.raises(ValueError, match="calibration"):
        encoders.embeddings("mobilenetv2")
    emb = encoders.embeddings("mobilenetv2", calibration=np.arange(0, len(ds), 2))
    assert emb.shape[0] == len(ds) and np.isfinite(emb).all()
    assert emb.std(axis=0).max() > 1e-4      # without recalibration they vanish (~1e-12)
    assert encoders.infos["mobilenetv2"]["init"] == "random"
    encoders.encoder("opd_mobilenetv2")
    default = registry.get_entry(registry.DEFAULTS["mobilenetv2"])
    assert encoders.infos["opd_mobilenetv2"]["init"] == default.init
    assert not encoders.needs_calibration("dinov2")


def test_frozen_probes_use_the_saved_runs_split(encoders, saved_run, tmp_path):
    result = transfer.frozen_probes(encoders, ["five_class"], MODELS, saved_models=saved_run, name=NAME,
                                    results=tmp_path, n_boot=20)
    table = result.table
    stored = Split.from_json(transfer.run_dir(saved_run, NAME, "features", "five_class") / "split.json")
    assert set(table["model"]) == set(MODELS) | {"majority class", "logistic (dry mass, area)"}
    assert set(table["method"]) == {"frozen linear probe", "frozen 5-NN", "baseline"}   # baselines beside
    assert (table["n_test"] == len(stored.test)).all() and (table["n_train"] == len(stored.train)).all()
    assert table["split"].str.endswith("split.json").all()
    assert table["accuracy"].between(0, 1).all()
    assert (table["accuracy_ci_low"] <= table["accuracy"]).all()
    assert result.files["table_csv"].is_file() and result.files["table_md"].is_file()
    assert (tmp_path / NAME / "probes_accuracy.png").is_file()


def test_label_efficiency_rows(encoders, tmp_path):
    fractions, seeds = [0.5, 1.0], [0, 1]
    table, files = transfer.label_efficiency(encoders, ["five_class", "cancer_vs_blood"], MODELS,
                                             fractions=fractions, seeds=seeds, results=tmp_path)
    assert len(table) == 2 * len(MODELS) * len(fractions) * len(seeds)
    assert sorted(table["fraction"].unique()) == fractions and sorted(table["seed"].unique()) == seeds
    assert table["accuracy"].between(0, 1).all() and table["balanced_accuracy"].between(0, 1).all()
    assert set(table["curve"]) == {"frozen linear probe"}
    # nested subsets: more labels never fewer maps
    for _, rows in table.groupby(["task", "model", "seed"]):
        assert rows.sort_values("fraction")["n_labelled"].is_monotonic_increasing
    summary = pd.read_csv(files["table_csv"])
    assert {"accuracy_ci_low", "accuracy_ci_high", "seeds"} <= set(summary.columns)
    assert files["figure"].is_file()


def test_label_efficiency_fine_tunes_the_subsets_of_finetune_seeds(encoders, tmp_path, monkeypatch):
    asked = []

    def finetune(ds, model, task, split, sub, **kw):
        asked.append((model, len(sub)))
        return np.zeros(len(split.test), dtype=int)

    monkeypatch.setattr(transfer, "finetune_subset", finetune)
    table, _ = transfer.label_efficiency(encoders, ["five_class"], ["features"], fractions=[0.5, 1.0],
                                         seeds=[0, 1], finetune=["mobilenetv2"], finetune_seeds=[1],
                                         results=tmp_path, saved_models=tmp_path)
    tuned, frozen = table[table["curve"] == "fine-tuned"], table[table["curve"] == "frozen linear probe"]
    assert set(tuned["seed"]) == {1} and len(tuned) == len(asked) == 2      # one subset per fraction
    assert set(frozen["seed"]) == {0, 1} and len(frozen) == 4


def test_finetune_subset_trains_on_the_given_maps_only_and_once(tmp_path_factory, ds, monkeypatch, tmp_path,
                                                               eager):
    from opdcells.splits import subsample_labelled
    from opdcells.tasks import get_task, task_labels

    split, _ = transfer.task_split(ds, "cancer_vs_blood", saved_models=tmp_path_factory.mktemp("none"))
    y = task_labels(ds, get_task("cancer_vs_blood"))
    sub = subsample_labelled(split.train, y, 0.5, seed=0)
    import opdcells.train

    runs = []

    def recording_train(*args, **kwargs):
        runs.append(real_train(*args, **kwargs))
        return runs[-1]

    real_train = opdcells.train.train
    monkeypatch.setattr(opdcells.train, "train", recording_train)
    settings = {"epochs": 1, "input_size": 32, "batch_size": 16}
    cache = transfer.FinetuneCache(tmp_path / "cache")
    pred = transfer.finetune_subset(ds, "mobilenetv2", "cancer_vs_blood", split, sub, cache=cache, **settings)
    (run,) = runs
    assert run.config["split"]["train_subset"] == {"n_labelled": len(sub), "of": len(split.train)}
    np.testing.assert_array_equal(run.evaluation.indices, split.test)
    assert pred.shape == (len(split.test),) and set(pred.tolist()) <= {0, 1}
    np.testing.assert_array_equal(pred, run.evaluation.proba.argmax(axis=1))
    assert not run.model_dir.exists()                      # the fine-tuned model folder was temporary
    # the identical run again: read from the cache, not trained; another setting (here the model: the
    # features baseline trains in a second) is trained
    again = transfer.finetune_subset(ds, "mobilenetv2", "cancer_vs_blood", split, sub, cache=cache,
                                     **settings)
    np.testing.assert_array_equal(again, pred)
    assert len(runs) == 1 and (cache.hits, cache.misses) == (1, 1)
    transfer.finetune_subset(ds, "features", "cancer_vs_blood", split, sub, cache=cache, **settings)
    assert len(runs) == 2 and runs[1].config["model"] == "features"
    # an unreadable entry is trained again, not trusted
    digest = transfer.run_digest(transfer.finetune_config("features", "cancer_vs_blood", **settings),
                                 ds.fingerprint, opdcells.train.labelled_subset(split, sub, ds.groups))
    cache.path(digest).write_text("{not json")
    transfer.finetune_subset(ds, "features", "cancer_vs_blood", split, sub, cache=cache, **settings)
    assert len(runs) == 3 and json.loads(cache.path(digest).read_text())["digest"] == digest


FULL_RUN = {"epochs": 1, "input_size": 32, "batch_size": 16}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, ds):
    """A mobilenetv2 run on every training map of ``ds`` (cancer_vs_blood), as compare_models makes it
    (its steps run eagerly: the traced training is the notebooks' and the shared tiny runs')."""
    from helpers import eager_functions

    from opdcells.train import train

    with eager_functions():
        return train(ds, "mobilenetv2", "cancer_vs_blood", tmp_path_factory.mktemp("full") / "run", n_boot=0,
                     fusion="none", **FULL_RUN)   # the OPD notebook's comparison: the encoders alone


def test_a_full_data_run_is_the_100_percent_point(tmp_path, ds, full_run, monkeypatch):
    """compare_models' run (train with the notebook's settings) and finetune_subset on every training map
    of its split are the same run: the cache answers the second from the first."""
    import opdcells.train

    settings, full = FULL_RUN, full_run
    cache = transfer.FinetuneCache(tmp_path / "cache")
    cache.add_run(full)
    monkeypatch.setattr(opdcells.train, "train", lambda *a, **k: pytest.fail("identical run retrained"))
    split = Split.from_json(full.model_dir / "split.json")
    pred = transfer.finetune_subset(ds, "mobilenetv2", "cancer_vs_blood", split, split.train, cache=cache,
                                    **settings)
    np.testing.assert_array_equal(pred, full.evaluation.proba.argmax(axis=1))


def test_explain_examples_on_fine_tuned_cnn(tmp_path_factory, tmp_path):
    run = tiny_run(tmp_path_factory, "mobilenetv2", "five_class")
    with open_dataset(run.config["dataset"]["path"]) as data:
        idx = transfer.example_indices(data, np.arange(len(data)), per_class=1)
        assert len(idx) == len(data.class_names)
        files = transfer.explain_examples(data, {"mobilenetv2": run.model}, idx, tmp_path)
    assert files["mobilenetv2"].is_file()


def test_real_cells_embedded_with_the_simulated_classes(real_qpi, encoders, ds, full_run, tmp_path, eager):
    config = transfer.preprocess_config_of(ds)
    real = transfer.load_real_cells(real_qpi, config)
    assert real["HL60 (real)"].shape == (14, ds.out_size, ds.out_size)     # every 10th of 140 angles
    assert len(real["RBC (real)"]) >= 5
    for maps in real.values():
        assert np.isfinite(maps).all() and maps.max() > 50                  # nm, a cell in every map
    path = transfer.embedding_view(encoders, "opd_mobilenetv2", np.arange(len(ds)), tmp_path / "e.png",
                                   real=real)
    assert path.is_file()
    assert transfer.load_real_cells(tmp_path / "absent", config) == {}
    # the fine-tuned model on them: what it calls them, and how many maps its OOD detector flags
    table = transfer.real_cell_predictions({"mobilenetv2": full_run.model}, real)
    assert list(table["cells"]) == list(real) and list(table["maps"]) == [len(m) for m in real.values()]
    for _, row in table.iterrows():
        counts = [int(part.rsplit(" ", 1)[1]) for part in row["predicted"].split(", ")]
        assert sum(counts) == row["maps"] and 0 <= row["flagged_ood"] <= row["maps"]
        assert 0.5 <= row["mean_confidence"] <= 1.0
    text = transfer.real_cells_conclusion(table)
    assert f"**{int(table['flagged_ood'].iloc[0])} of 14** flagged out of distribution" in text


#: The notebook's models in its test: the randomly initialised MobileNetV2 is left out (its fine-tuning is
#: the OPD-pretrained one's code path with other weights; its frozen probe, label-efficiency curve and
#: BatchNorm recalibration are tested above on MODELS), which spares a traced training.
NOTEBOOK_MODELS = ["features", "opd_mobilenetv2", "dinov2"]


@pytest.mark.slow
def test_notebook_runs_headless_on_a_tiny_dataset(tmp_path_factory, tmp_path):
    from opdcells.notebooks import execute_notebook

    data = tiny_dataset(tmp_path_factory)
    params = {"EPOCHS": 1, "INPUT_SIZE": TINY_TRAINING["input_size"], "DATA_PATH": str(data),
              "MODELS": NOTEBOOK_MODELS,
              "TASKS": ["five_class", "cancer_vs_blood"], "LABEL_FRACTIONS": [0.5, 1.0], "LABEL_SEEDS": [0],
              "LE_FINETUNE_FRACTIONS": [1.0], "EXAMPLES_PER_CLASS": 1,
              "N_BOOT": 20, "REAL_QPI": str(tmp_path / "no_real_qpi"),
              "SAVED_MODELS": str(tmp_path / "saved"), "RESULTS": str(tmp_path / "results")}
    executed = execute_notebook(REPO_ROOT / "OPD_Model_and_DinoV2.ipynb", params, output_dir=tmp_path,
                                cwd=tmp_path)
    assert executed.is_file()
    out = tmp_path / "results" / NAME
    for name in ("comparison.md", "accuracy.png", "probes.csv", "probes.md", "label_efficiency.csv",
                 "label_efficiency.png", "embedding_opd_mobilenetv2.png", "opd_mobilenetv2_explain.png",
                 "dinov2_explain.png"):
        assert (out / name).is_file(), name
    probes = pd.read_csv(out / "probes.csv")
    assert set(probes["task"]) == {"five_class", "cancer_vs_blood"}
    assert "fine-tuned" in set(probes["method"])
    curves = pd.read_csv(out / "label_efficiency.csv")
    tuned = curves[curves["curve"] == "fine-tuned"]
    assert set(tuned["model"]) == {"opd_mobilenetv2 (fine-tuned)"}
    assert set(tuned["fraction"]) == {1.0} and set(tuned["task"]) == {"five_class"}
    text = executed.read_text()
    assert "real-data check skipped" in text
    # the 100% fine-tuning point is section 1's run, not retrained; the conclusion is written
    assert "0 fine-tuning runs trained, 1 identical ones re-used" in text
    assert "on unseen groups" in text and "Frozen probes:" in text
    dinov2 = json.loads((tmp_path / "saved" / f"{NAME}_dinov2_five_class" / "config.json").read_text())
    assert dinov2["init"] == registry.get_entry("opd_dinov2_pretrained").init   # the shipped one by default
    assert dinov2["model_info"]["weights_source"].endswith("opd_dinov2_pretrained/encoder.weights.h5")
    assert (tmp_path / "saved" / f"{NAME}_dinov2_five_class" / "config.json").is_file()
