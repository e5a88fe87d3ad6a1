"""What keeps ``make demo`` within its budget: quick-profile values, and work that is not done twice."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny_dataset

from opdcells.config import TrainConfig
from opdcells.dataset import open_dataset
from opdcells.study import transfer


@pytest.mark.parametrize("model", ["resnet50", "vgg16"])
def test_quick_heavy_backbones_see_48_px_and_predict_each_map_once_unless_told(model):
    quick = TrainConfig.from_profile(model, "quick")
    assert not quick.tta and quick.input_size == 48
    told = TrainConfig.from_profile(model, "quick", tta=True, input_size=64)
    assert told.tta and told.input_size == 64, "explicit settings win"
    full = TrainConfig.from_profile(model, "full")
    assert full.tta and full.input_size == 128


@pytest.mark.parametrize("model", ["mobilenetv2", "opd_mobilenetv2", "dinov2"])
def test_the_demo_s_other_networks_keep_their_size_and_test_time_augmentation(model):
    quick = TrainConfig.from_profile(model, "quick")
    assert quick.tta and quick.input_size == {"mobilenetv2": 64, "opd_mobilenetv2": 128, "dinov2": 56}[model]


def test_label_efficiency_probes_the_same_labelled_maps_once(tmp_path_factory, tmp_path, monkeypatch):
    from opdcells.splits import subsample_labelled
    from opdcells.tasks import get_task, task_labels

    fitted = []
    real = transfer._probe

    def counting(train_emb, *args):
        fitted.append(len(train_emb))
        return real(train_emb, *args)

    monkeypatch.setattr(transfer, "_probe", counting)
    with open_dataset(tiny_dataset(tmp_path_factory)) as ds:
        encoders = transfer.Encoders(ds)
        probes = transfer.frozen_probes(encoders, ["five_class"], ["features"], saved_models=tmp_path,
                                        results=tmp_path, n_boot=0)
        split = probes.splits["five_class"][0]
        assert fitted == [len(split.train)] * 2   # the linear probe and the k-NN on all training maps
        fitted.clear()
        seeds = [0, 1, 2]
        table, _ = transfer.label_efficiency(encoders, ["five_class"], ["features"], fractions=[0.5, 1.0],
                                             seeds=seeds, splits=probes.splits, results=tmp_path,
                                             saved_models=tmp_path)
        y = task_labels(ds, get_task("five_class"))
    halves = {tuple(subsample_labelled(split.train, y, 0.5, seed=s)) for s in seeds}
    assert len(fitted) == len(halves), "100% of the labels: the frozen probe's maps, not fitted again"
    full = table[table["fraction"] == 1.0]
    assert len(full) == len(seeds) and full["accuracy"].nunique() == 1
    linear = probes.table[(probes.table["model"] == "features")
                          & (probes.table["method"] == "frozen linear probe")]
    assert np.isclose(full["accuracy"].iloc[0], linear["accuracy"].iloc[0])
