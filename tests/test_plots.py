"""Each plot writes a non-empty PNG, returns its path and leaves no figure open."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from opdcells import plots
from opdcells.evaluate import classification_report, comparison_table

NAMES = ["SW480", "SW620", "granulocytes"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def predictions():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    logits = rng.normal(size=(60, 3))
    logits[np.arange(60), y] += 1.5
    proba = np.exp(logits)
    return y, proba / proba.sum(axis=1, keepdims=True)


@pytest.fixture
def maps():
    yy, xx = np.mgrid[:24, :24]
    disc = np.clip(1 - ((yy - 12) ** 2 + (xx - 12) ** 2) / 64.0, 0, None) ** 0.5
    return np.stack([(100 + 5 * i) * disc for i in range(60)])[..., None]  # (N, S, S, 1) as the model sees


def check_png(returned, path):
    assert returned == path
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000
    assert plt.get_fignums() == []


def test_training_curves_dict_and_dataframe(tmp_path):
    history = {"loss": [1.0, 0.7, 0.5], "val_loss": [1.1, 0.8, 0.9],
               "accuracy": [0.5, 0.7, 0.8], "val_accuracy": [0.4, 0.6, 0.6]}
    check_png(plots.training_curves(history, tmp_path / "a.png", "run"), tmp_path / "a.png")
    path = tmp_path / "sub" / "b.png"  # parent folder created
    check_png(plots.training_curves(pd.DataFrame(history)[["loss"]], path, "loss only"), path)
    with pytest.raises(ValueError, match="no loss/accuracy"):
        plots.training_curves({"lr": [0.1]}, tmp_path / "c.png")


@pytest.mark.parametrize("normalise", [True, False])
def test_confusion_matrix(tmp_path, normalise):
    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]])  # empty row must not break normalisation
    path = tmp_path / "cm.png"
    check_png(plots.confusion_matrix(cm, NAMES, path, "cm", normalise=normalise), path)


def test_accuracy_bars_grouped_by_task_and_single(tmp_path, predictions):
    y, proba = predictions
    report = classification_report(y, proba, NAMES, n_boot=50)
    rows = [{"task": t, "model": m, "report": report} for t in ("five_class", "blood_subtypes")
            for m in ("mobilenetv2", "resnet50")]
    df = comparison_table(rows)
    check_png(plots.accuracy_bars(df, tmp_path / "bars.png"), tmp_path / "bars.png")
    single = df[df.task == "five_class"].drop(columns="task")
    check_png(plots.accuracy_bars(single, tmp_path / "f1.png", metric="macro_f1"), tmp_path / "f1.png")


def test_roc_curves_multiclass_and_binary(tmp_path, predictions):
    y, proba = predictions
    check_png(plots.roc_curves(y, proba, NAMES, tmp_path / "roc.png"), tmp_path / "roc.png")
    rng = np.random.default_rng(1)
    y2 = np.r_[np.zeros(300, int), np.ones(1200, int)]
    score = np.r_[rng.normal(2, 1, 300), rng.normal(0, 1, 1200)]
    p_cancer = 1 / (1 + np.exp(-score))
    proba2 = np.c_[p_cancer, 1 - p_cancer]
    path = tmp_path / "roc2.png"
    returned = plots.roc_curves(y2, proba2, ["cancer", "blood"], path, positive_class="cancer", log_x=True)
    check_png(returned, path)


def test_gallery_and_grids(tmp_path, maps, predictions):
    y, proba = predictions
    path = tmp_path / "gallery.png"
    check_png(plots.gallery(maps, y, proba.argmax(1), NAMES, path, per_class=2), path)
    heat = [np.random.default_rng(i).random((6, 6)) for i in range(4)]
    path = tmp_path / "overlay.png"
    check_png(plots.overlay_grid(maps[:4], heat, [f"m{i}" for i in range(4)], path), path)
    path = tmp_path / "grid.png"
    check_png(plots.image_grid([maps[0, ..., 0], None, maps[1, ..., 0]], ["a", "", "b"], path, "magma"), path)
    with pytest.raises(ValueError, match="2 maps but 1 heatmaps"):
        plots.overlay_grid(maps[:2], heat[:1], ["a", "b"], tmp_path / "bad.png")


def test_label_efficiency(tmp_path):
    rows = [{"task": t, "model": m, "fraction": f, "seed": s, "accuracy": 0.5 + 0.1 * f + 0.01 * s}
            for t in ("five_class", "cancer_vs_blood") for m in ("mobilenetv2", "dinov2")
            for f in (0.05, 0.2, 1.0) for s in range(3)]
    path = tmp_path / "le.png"
    check_png(plots.label_efficiency(pd.DataFrame(rows), path), path)


def test_mean_band_is_t_interval():
    rows = pd.DataFrame({"fraction": [0.1] * 3 + [1.0], "accuracy": [0.5, 0.6, 0.7, 0.9]})
    mean, low, high = plots.mean_band(rows, "fraction", "accuracy")
    half = 4.302653 * 0.1 / np.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert mean[0.1] == pytest.approx(0.6) and high[0.1] - mean[0.1] == pytest.approx(half, rel=1e-5)
    assert low[1.0] == high[1.0] == 0.9  # one seed: no band


def test_embedding_scatter_with_overlay(tmp_path, predictions):
    y, _ = predictions
    emb = np.random.default_rng(2).normal(size=(60, 2))
    path = tmp_path / "emb.png"
    extra = [(np.zeros((3, 2)), "real cells", "*")]
    check_png(plots.embedding_scatter(emb, y, NAMES, path, extra=extra), path)


def test_class_colours_fixed_and_stable():
    assert plots.class_colour("SW480") == plots.class_colour("sw480") == plots.CLASS_COLOURS["sw480"]
    assert plots.class_colour("new class") == plots.class_colour("new class")
    assert len({plots.class_colour(n) for n in ("SW480", "SW620", "granulocytes", "monocytes", "PBMCs")}) == 5


# --- figures that do not mislead (issue 16) ----------------------------------------------------------


def test_colour_limits_cover_the_data_unless_fixed():
    from opdcells.plots import colour_limits

    maps = [np.full((8, 8), 120.0), np.pad(np.full((4, 4), 700.0), 2)]   # a 700 nm SW480 peak
    limits = colour_limits(maps)
    assert limits.vmin <= 0 and limits.vmax >= 700 and limits.extend == "neither" and limits.note == ""
    clipped = colour_limits(maps, vmax=460)
    assert clipped.vmax == 460 and clipped.extend == "max" and "700" in clipped.note


def test_gallery_colour_bar_reaches_the_brightest_cell(tmp_path):
    from matplotlib.image import imread

    from opdcells.plots import colour_limits, gallery

    maps = np.zeros((6, 16, 16))
    maps[:, 4:12, 4:12] = np.linspace(100, 700, 6)[:, None, None]
    gallery(maps, np.array([0, 0, 0, 1, 1, 1]), np.array([0, 1, 0, 1, 1, 0]), ["SW480", "PBMCs"],
            tmp_path / "g.png", per_class=2)
    assert imread(tmp_path / "g.png").ndim == 3
    assert colour_limits(list(maps)).vmax == 700


def test_label_efficiency_band_stays_in_unit_range_and_has_width_where_seeds_agree():
    from opdcells.plots import mean_band

    rows = pd.DataFrame({"fraction": [0.1, 0.1, 0.1, 1.0, 1.0, 1.0],
                         "accuracy": [0.98, 0.9, 1.0, 0.95, 0.95, 0.95],
                         "accuracy_ci_low": [0.9, 0.85, 0.97, 0.9, 0.9, 0.9],
                         "accuracy_ci_high": [1.0, 0.95, 1.0, 0.99, 0.99, 0.99]})
    mean, low, high = mean_band(rows, "fraction", "accuracy")
    assert (high <= 1.0).all() and (low >= 0.0).all()
    assert high[1.0] - low[1.0] > 0.05          # the test sample's uncertainty, though the seeds agree


def test_twelve_series_get_twelve_colours_or_patterns(tmp_path):
    from opdcells.plots import series_colours

    models = ["opd_mobilenetv2", "dinov2", "features", "logistic", "knn", "probe_a"]
    colours = series_colours(models)
    assert len(set(colours.values())) == len(models)
    table = pd.DataFrame([{"task": "five_class", "bar": f"{m} | {v}", "accuracy": 0.5}
                          for m in models for v in ("frozen", "fine-tuned")])
    from matplotlib.image import imread

    from opdcells.plots import accuracy_bars

    path = accuracy_bars(table, tmp_path / "bars.png", bar="bar")
    assert imread(path).shape[1] < 2000


def test_comparison_bars_take_the_backbone_colour_and_the_initialisation_hatching(tmp_path):
    from matplotlib.image import imread

    from opdcells.plots import INIT_HATCHES, accuracy_bars, backbone_of, comparison_styles

    # Final_Project's order, in which the OPD ResNet50 bar once took VGG16's colour by its position
    table = pd.DataFrame([("features", "none (hand-crafted features)", "none"),
                          ("opd_mobilenetv2", "opd:a@1", "none"),
                          ("resnet50 + features", "random", "deep weight 0.5"),
                          ("resnet50", "random", "deep part alone"), ("opd_resnet50", "opd:b@2", "none"),
                          ("imagenet_resnet50", "imagenet", "none"), ("vgg16", "random", "none"),
                          ("majority class", "baseline", None)], columns=["model", "init", "fusion"])
    table = table.assign(task="five_class", accuracy=0.8)
    styles = comparison_styles(table)
    resnets = [styles[m] for m in ("resnet50 + features", "resnet50", "opd_resnet50", "imagenet_resnet50")]
    named = ("resnet50 (deep part)", "imagenet_resnet50", "opd_resnet50 (v2)")
    assert {backbone_of(m) for m in named} == {"resnet50"}
    assert len({s.colour for s in resnets}) == 1                       # one backbone, one colour
    assert styles["opd_resnet50"].colour not in {styles["vgg16"].colour, styles["opd_mobilenetv2"].colour}
    assert styles["opd_resnet50"] != styles["resnet50 + features"] != styles["imagenet_resnet50"]
    assert [s.hatch for s in resnets[::2]] == [INIT_HATCHES["from scratch"], INIT_HATCHES["OPD-pretrained"]]
    assert styles["resnet50"].alpha < styles["resnet50 + features"].alpha == 1      # the part alone: pale
    assert len(set(styles)) == len(table) and len({s.colour for s in styles.values()}) == 5
    assert imread(accuracy_bars(table, tmp_path / "bars.png", styles=styles)).shape[1] > 0


def test_label_efficiency_band_without_ci_columns_uses_the_test_size():
    from opdcells.plots import mean_band

    rows = pd.DataFrame({"fraction": [1.0, 1.0], "accuracy": [0.9, 0.9], "n_test": [400, 400]})
    _, low, high = mean_band(rows, "fraction", "accuracy")
    assert (high - low)[1.0] == pytest.approx(2 * 1.96 * np.sqrt(0.9 * 0.1 / 400), rel=1e-6)
