"""Screening runs: outputs, operating point, out-of-distribution veto, shards merged, the report page.

The model here is a transparent stand-in whose probability of SW480 rises with a map's dry mass (SW480
cells are two to three times heavier than blood cells in the simulator), so what the screening code does
with scores can be checked exactly; screening with a trained model is covered in test_train.
"""
import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from scipy import special

from opdcells.calibration import OperatingPoint, np_order_statistic, save_validation_scores
from opdcells.errors import ScreenError
from opdcells.ingest import IngestOptions
from opdcells.preprocess import PreprocessConfig
from opdcells.screen import merge_screens, screen_files, screen_settings, shard_files
from opdcells.spikein import simulate_sample

CONFIG = PreprocessConfig(out_pixel_size_um=0.5, out_size=48)
CLASSES = ["SW480", "granulocytes", "PBMCs"]


class MassModel:
    """p(SW480) = expit((dry mass - 130 pg) / 10 pg); the rest split evenly."""

    tta = False
    name = "mass-model"
    class_names = CLASSES

    def __init__(self, folder: Path, calibration: dict | None):
        self.folder = folder
        self.config = {"calibration": calibration} if calibration else {}

    def predict_proba(self, maps, batch_size=64, *, tta=None):
        mass = np.asarray(maps, float).sum(axis=(1, 2)) * 1e-3 * 0.5 ** 2 / 0.19
        p = special.expit((mass - 130.0) / 10.0)
        return np.stack([p, (1 - p) / 2, (1 - p) / 2], axis=1)


def point(threshold: float) -> dict:
    return OperatingPoint(fpr=1e-3, threshold=threshold, threshold_ci=(threshold, threshold), sensitivity=0.9,
                          sensitivity_ci=(0.8, 0.95), n_negative=5000, n_positive=300, extrapolated=False,
                          basis="test").as_dict()


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sample")
    simulate_sample(folder, 40, {"SW480": 4}, seed=2, maps_per_file=11, progress=False)
    return folder


@pytest.fixture
def model(tmp_path):
    return MassModel(tmp_path, {"temperature": 1.0, "targets": ["SW480"], "operating_point": point(0.5)})


def run(model, paths, out, **kw):
    settings = screen_settings(model, **kw)
    return screen_files(model, paths, out, settings, options=IngestOptions(config=CONFIG))


def read(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_screen_finds_the_spiked_cells_and_writes_every_output(sample, model, tmp_path):
    result = run(model, [sample], tmp_path / "out")
    scores, candidates = read(tmp_path / "out/scores.csv"), read(tmp_path / "out/candidates.csv")
    truth = {(f"{sample}/{r['path']}", r["index"]): r for r in read(sample / "truth.csv")}
    assert result.n_maps == len(scores) == 44 - len(result.skipped_maps)
    flagged = {(r["file"], r["index"]) for r in candidates}
    assert flagged == {(r["file"], r["index"]) for r in scores if float(r["p_target"]) >= 0.5}
    assert sum(truth[k]["spiked"] == "1" for k in flagged) >= 3        # of the 4 spiked SW480 cells
    assert all(float(truth[k]["dry_mass_pg"]) > 100 for k in flagged)  # no ordinary blood cell
    assert [float(r["p_target"]) for r in candidates] == sorted((float(r["p_target"]) for r in candidates),
                                                                reverse=True)
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["flagged"] == len(candidates) and summary["maps_read"] == len(scores)
    assert summary["expected_false_positives"] == pytest.approx((len(scores) * (1 - 1e-5)) * 1e-3)
    assert summary["maps_per_second"] > 0


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.captions, self._in_caption = [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        self._in_caption = tag == "figcaption" or self._in_caption

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self._in_caption = False

    def handle_data(self, data):
        if self._in_caption:
            self.captions.append(data)


def test_report_is_self_contained_and_lists_the_candidates(sample, model, tmp_path):
    run(model, [sample], tmp_path / "out")
    page = Page()
    page.feed((tmp_path / "out/report.html").read_text(encoding="utf-8"))
    candidates = read(tmp_path / "out/candidates.csv")
    thumbs = [i for i in page.images if i["alt"].startswith("candidate")]
    assert len(thumbs) == len(candidates) > 0
    assert all(i["src"].startswith("data:image/png;base64,") for i in page.images)
    assert any(i["alt"] == "score histogram" for i in page.images)
    text = " ".join(page.captions)
    assert all(f"p={float(r['p_target']):.3f}" in text for r in candidates)


def test_report_picture_shows_the_first_candidates_and_the_threshold(sample, model, tmp_path):
    from matplotlib.image import imread

    from opdcells.report import report_figure

    run(model, [sample], tmp_path / "out")
    assert imread(tmp_path / "out/report.png").shape[:2] == (840, 1300)      # 13 x 8.4 in at 100 dpi
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    candidates, scores = read(tmp_path / "out/candidates.csv"), read(tmp_path / "out/scores.csv")
    assert len(candidates) > 2                                             # so n_shown=2 leaves some out
    maps = np.random.default_rng(0).uniform(0, 300, (len(candidates), 48, 48))
    fig = report_figure(summary, candidates, maps, scores, n_shown=2)
    titles = [ax.get_title() for sub in fig.subfigs[1:] for ax in sub.axes if ax.get_title()]
    assert titles == [f"#{i + 1} p={float(r['p_target']):.3f}\n{float(r['dry_mass_pg']):.0f} pg"
                      for i, r in enumerate(candidates[:2])]
    hist_ax = fig.subfigs[0].axes[1]
    assert [line.get_xdata()[0] for line in hist_ax.lines] == [summary["threshold"]]
    assert sum(p.get_height() > 0 for p in hist_ax.patches) > 1


def test_out_of_distribution_maps_are_never_flagged(sample, model, tmp_path):
    settings = screen_settings(model)
    veto = lambda maps: (np.full(len(maps), 9.0), np.ones(len(maps), bool))  # noqa: E731
    result = screen_files(model, [sample], tmp_path / "out", settings, options=IngestOptions(config=CONFIG),
                          ood=veto)
    assert result.n_flagged == 0 and result.n_ood == result.n_maps
    assert all(r["ood_flag"] == "True" for r in read(tmp_path / "out/scores.csv"))


def test_shards_merge_into_the_single_run(sample, model, tmp_path):
    run(model, [sample], tmp_path / "all")
    for k in (1, 2, 3):
        run(model, [sample], tmp_path / f"s{k}", shard=(k, 3))
    merged = merge_screens([tmp_path / f"s{k}" for k in (1, 2, 3)], tmp_path / "merged")
    for name in ("scores.csv", "candidates.csv"):
        assert (tmp_path / "merged" / name).read_text() == (tmp_path / "all" / name).read_text()
    whole = json.loads((tmp_path / "all/summary.json").read_text())
    joined = json.loads((tmp_path / "merged/summary.json").read_text())
    for key in ("maps_read", "files_read", "flagged", "expected_false_positives", "operating_point"):
        assert joined[key] == whole[key]
    assert merged.n_maps == whole["maps_read"]


def test_shard_files_cover_every_file_once():
    files = [Path(f"f{i}") for i in range(10)]
    shards = [shard_files(files, (k, 4)) for k in range(1, 5)]
    assert sorted(sum(shards, []), key=str) == sorted(files, key=str)


def test_shards_of_other_models_do_not_merge(sample, model, tmp_path):
    run(model, [sample], tmp_path / "a", shard=(1, 2))
    other = MassModel(tmp_path, {"temperature": 1.0, "targets": ["SW480"], "operating_point": point(0.7)})
    run(other, [sample], tmp_path / "b", shard=(2, 2))
    with pytest.raises(ScreenError, match="operating point"):
        merge_screens([tmp_path / "a", tmp_path / "b"], tmp_path / "m")


def test_a_bad_export_is_skipped_and_reported(sample, model, tmp_path):
    bad = tmp_path / "broken.npy"
    bad.write_bytes(b"not an array")
    result = run(model, [sample, bad], tmp_path / "out")
    assert result.status == 1 and "broken.npy" in result.skipped_files[0]
    assert result.n_files == 4


def test_settings_refuse_models_without_calibration_and_unknown_targets(tmp_path):
    with pytest.raises(ScreenError, match="no calibration"):
        screen_settings(MassModel(tmp_path, None))
    model = MassModel(tmp_path, {"temperature": 1.0, "targets": ["SW480"], "operating_point": point(0.5)})
    with pytest.raises(ScreenError, match="HeLa"):
        screen_settings(model, targets=["HeLa"])
    with pytest.raises(ScreenError, match="validation scores"):
        screen_settings(model, fpr=0.01)
    with pytest.raises(ScreenError, match="shard"):
        screen_settings(model, shard=(3, 2))


def test_another_rate_is_set_on_the_stored_validation_scores(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 4000)
    p0 = special.expit(np.where(labels == 0, 2.0, -3.0) + rng.normal(0, 1, 4000))
    proba = np.stack([p0, (1 - p0) / 2, (1 - p0) / 2], axis=1)
    save_validation_scores(tmp_path, proba, labels, np.array([f"g{i % 10}" for i in range(4000)]))
    model = MassModel(tmp_path, {"temperature": 1.0, "targets": ["SW480"], "operating_point": point(0.5)})
    loose, strict = screen_settings(model, fpr=0.05), screen_settings(model, fpr=0.005)
    negatives = p0[labels != 0]
    assert np.mean(negatives >= loose.point.threshold) == pytest.approx(0.05, abs=0.01)
    assert strict.point.threshold > loose.point.threshold
    assert loose.point.rate_at_threshold["order_statistic"] == np_order_statistic(len(negatives), 0.05)
    stored = screen_settings(model).point
    assert stored.threshold == 0.5     # the stored point when nothing changes, with what its maps support
    rate = stored.rate_at_threshold      # (stored before rates were bounded: set from the kept scores)
    assert rate["n_above"] == int(np.sum(negatives >= 0.5)) and rate["n"] == len(negatives)
    assert rate["expected"] == pytest.approx((rate["n_above"] + 1) / (len(negatives) + 1))


def test_scores_carry_the_predict_identity_and_dropped_maps_are_listed(sample, model, tmp_path):
    from opdcells.predict import DROPPED_COLUMNS, ID_COLUMNS, POSITION_COLUMNS

    bad = tmp_path / "broken.npy"
    bad.write_bytes(b"not an array")
    run(model, [sample, bad], tmp_path / "out")
    scores = read(tmp_path / "out/scores.csv")
    assert list(scores[0])[:len(ID_COLUMNS) + len(POSITION_COLUMNS)] == [*ID_COLUMNS, *POSITION_COLUMNS]
    dropped = read(tmp_path / "out/scores.dropped.csv")
    assert list(dropped[0]) == list(DROPPED_COLUMNS)
    assert any(r["file"].endswith("broken.npy") and r["index"] == "" for r in dropped)


def test_reading_processes_give_the_same_outputs_as_one(sample, model, tmp_path):
    bad = tmp_path / "broken.npy"
    bad.write_bytes(b"not an array")
    outputs = {}
    for workers in (1, 2):
        settings = screen_settings(model)
        result = screen_files(model, [sample, bad], tmp_path / f"w{workers}", settings,
                              options=IngestOptions(config=CONFIG), workers=workers)
        assert result.status == 1 and result.n_files == 4
        outputs[workers] = [(tmp_path / f"w{workers}" / name).read_bytes()
                            for name in ("scores.csv", "candidates.csv", "scores.dropped.csv")]
    assert outputs[1] == outputs[2]
    rows = read(tmp_path / "w2/scores.csv")
    assert [(r["file"], int(r["index"])) for r in rows] == sorted((r["file"], int(r["index"])) for r in rows)


def test_a_threshold_that_flags_too_much_of_the_sample_is_raised_and_shards_agree(sample, tmp_path):
    loose = {**point(1e-4), "fpr": 0.2}      # nearly every blood cell scores above 1e-4
    model = MassModel(tmp_path, {"temperature": 1.0, "targets": ["SW480"], "operating_point": loose})
    run(model, [sample], tmp_path / "kept", prevalence=0.1)           # reported, not applied
    kept = json.loads((tmp_path / "kept/summary.json").read_text())
    assert kept["threshold"] == 1e-4 and kept["threshold_check"]["source"].startswith("validation (sample")
    run(model, [sample], tmp_path / "all", prevalence=0.1, sample_check=True)
    summary = json.loads((tmp_path / "all/summary.json").read_text())
    check = summary["threshold_check"]
    assert check["source"] == "sample" and check["above_validation_threshold"] > check["allowed"]
    assert summary["threshold"] > 1e-4 and 0 < summary["flagged"] <= check["allowed"]
    scores = read(tmp_path / "all/scores.csv")
    assert sum(float(r["p_target"]) >= summary["threshold"] for r in scores) == summary["flagged"]
    low, high = summary["expected_false_positives_ci"]      # in-sample: at most the maps flagged
    assert high == summary["flagged"] and low == max(summary["flagged"] - 0.1 * len(scores), 0)
    assert summary["expected_false_positives_basis"].startswith("in-sample")
    for k in (1, 2):
        run(model, [sample], tmp_path / f"s{k}", shard=(k, 2), prevalence=0.1, sample_check=True)
    merge_screens([tmp_path / "s1", tmp_path / "s2"], tmp_path / "merged")
    for name in ("scores.csv", "candidates.csv"):
        assert (tmp_path / "merged" / name).read_text() == (tmp_path / "all" / name).read_text()
    with np.load(tmp_path / "all/candidates.npz") as whole, \
            np.load(tmp_path / "merged/candidates.npz") as joined:
        np.testing.assert_array_equal(whole["maps"], joined["maps"])


def test_predict_reads_with_processes_into_the_same_csv_in_file_order(sample, model, tmp_path):
    from opdcells.predict import predict_files

    bad = tmp_path / "broken.npy"
    bad.write_bytes(b"not an array")
    for workers in (1, 2):
        predict_files(model, [sample, bad], tmp_path / f"w{workers}.csv",
                      options=IngestOptions(config=CONFIG), workers=workers)
    assert (tmp_path / "w1.csv").read_bytes() == (tmp_path / "w2.csv").read_bytes()
    assert (tmp_path / "w1.dropped.csv").read_bytes() == (tmp_path / "w2.dropped.csv").read_bytes()
    rows = read(tmp_path / "w2.csv")
    order = [(r["file"], int(r["index"])) for r in rows]
    dropped_maps = [r for r in read(tmp_path / "w2.dropped.csv") if r["index"] != ""]
    assert order == sorted(order) and len(order) == 44 - len(dropped_maps)


def test_morphology_measured_near_the_threshold_or_for_a_called_target_gives_the_same_candidates_and_calls(
        sample, tmp_path, monkeypatch):
    from opdcells import ood, screen
    from opdcells.features import feature_matrix

    def embed(maps):   # a stand-in embedding: total OPD and area of each map
        maps = np.asarray(maps, float)
        return np.stack([maps.sum(axis=(1, 2)) * 1e-4, (maps > 50).sum(axis=(1, 2)) * 1e-2], axis=1)

    model = MassModel(tmp_path, {"temperature": 1.0, "targets": ["SW480"], "operating_point": point(0.95)})
    model.config["pixel_size_um"], model.learner = CONFIG.out_pixel_size_um, object()
    reads = screen.read_exports(sorted(sample.glob("*.mat")), IngestOptions(config=CONFIG))
    maps = np.stack([m.opd for r in reads for _, m in r.maps])
    inputs = {"embedding": embed(maps), "morphology": feature_matrix(maps, CONFIG.out_pixel_size_um)[0]}
    detector = ood.OODDetector.fit(inputs, np.zeros(len(maps)))
    detector.calibrate(inputs)
    detector.save(tmp_path)
    forward = lambda m, batch_size: (model.predict_proba(m), embed(m))  # noqa: E731  (encoder + head)
    monkeypatch.setattr(screen, "encoder_pass", lambda model: forward)
    monkeypatch.setattr(screen._Scorer, "first_pass", lambda self, m: self.forward(m, 64))
    measured = []
    real = feature_matrix
    monkeypatch.setattr("opdcells.features.feature_matrix",
                        lambda m, px: measured.append(len(m)) or real(m, px))
    rows, counts = {}, {}
    for how in ("near", "all"):
        measured.clear()
        settings = screen_settings(model, ood_morphology=how)
        screen_files(model, [sample], tmp_path / how, settings, options=IngestOptions(config=CONFIG),
                     ood=screen.ood_check(model))
        rows[how], counts[how] = read(tmp_path / how / "scores.csv"), sum(measured)
    logit = special.logit(np.clip([float(r["p_target"]) for r in rows["all"]], 1e-9, 1 - 1e-9))
    near = logit >= special.logit(0.95) - screen.REFINE_MARGIN_LOGIT
    called = np.array([r["predicted"] == "SW480" for r in rows["all"]])
    assert (called & ~near).any() and (near | called).sum() < len(near)  # calls far below it; maps neither
    checked = near | called
    assert 0 < counts["near"] == checked.sum() < counts["all"] == len(near)  # "near": only those measured
    for a, b, full in zip(rows["near"], rows["all"], checked, strict=True):
        assert (a["file"], a["index"], a["p_target"], a["flagged"]) == (b["file"], b["index"], b["p_target"],
                                                                        b["flagged"])
        if full:
            assert (a["ood_score"], a["ood_flag"]) == (b["ood_score"], b["ood_flag"])
        else:   # the embedding block alone: never above the score of both blocks
            assert float(a["ood_score"]) <= float(b["ood_score"])
    assert (tmp_path / "near/candidates.csv").read_bytes() == (tmp_path / "all/candidates.csv").read_bytes()
    with pytest.raises(ScreenError, match="ood_morphology"):
        screen_settings(model, ood_morphology="some")


def test_only_maps_near_or_above_the_threshold_are_predicted_again_with_tta(sample, tmp_path):
    from opdcells.screen import REFINE_MARGIN_LOGIT

    class TTAModel(MassModel):
        tta = True
        augmented: list = []

        def predict_proba(self, maps, batch_size=64, *, tta=None):
            if tta:
                self.augmented.append(len(maps))
            return super().predict_proba(maps, batch_size)

    model = TTAModel(tmp_path, {"temperature": 1.0, "targets": ["SW480"], "operating_point": point(0.9)})
    run(model, [sample], tmp_path / "out")
    logits = special.logit(np.clip([float(r["p_target"]) for r in read(tmp_path / "out/scores.csv")], 1e-9,
                                   1 - 1e-9))
    near = int((logits >= special.logit(0.9) - REFINE_MARGIN_LOGIT).sum())
    assert 0 < sum(model.augmented) == near < len(logits)
