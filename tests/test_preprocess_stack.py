"""The batched preprocessing path (``preprocess_stack``) against the per-map one (``preprocess_map``): the
same maps within rounding, the same refusals with the same reasons, and ``load`` datasets alike either way."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from helpers import CAMERA_PIXEL_UM, disc_field, simulated_opd
from scipy import ndimage as ndi

from load_data import main as load_main
from opdcells import ingest
from opdcells.dataset import open_dataset
from opdcells.errors import ExportError
from opdcells.ingest import IngestOptions, iter_processed
from opdcells.metadata import Meta
from opdcells.preprocess import (
    PreprocessConfig,
    dilate,
    dilate_stack,
    preprocess_map,
    preprocess_stack,
    stack_chunk,
)
from opdcells.readers import open_export

#: Tolerance of the batched path (preprocess_stack's docstring): its float64 sums run in another order, so a
#: float32 output pixel may round the other way (one float32 step: 6e-5 nm at 1,000 nm).
OPD_ATOL_NM = 1e-3
MEASURE_RTOL = 1e-12
NM_META = Meta(units="nm", pixel_size_um=0.5)


def per_map(stack, meta, config, paths, **kwargs) -> list:
    """``preprocess_map`` of each map, its ExportError in place of a refused map's output."""
    out = []
    for data, path in zip(stack, paths, strict=True):
        try:
            out.append(preprocess_map(data, meta, config, path=path, **kwargs))
        except ExportError as exc:
            out.append(exc)
    return out


def assert_alike(expected: list, got: list) -> None:
    """Same accepted maps (OPD within OPD_ATOL_NM, same cell support, same measures) and same refusals."""
    assert len(expected) == len(got)
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        if isinstance(a, ExportError) or isinstance(b, ExportError):
            assert type(a) is type(b) and str(a) == str(b), f"map {i}: {a!r} vs {b!r}"
            continue
        assert b.opd.dtype == np.float32 and b.opd.shape == a.opd.shape
        np.testing.assert_allclose(b.opd, a.opd, rtol=0, atol=OPD_ATOL_NM, err_msg=f"map {i}")
        assert np.array_equal(a.opd != 0, b.opd != 0), f"map {i}: another cell support"
        np.testing.assert_allclose([b.dry_mass_pg, b.extent_um], [a.dry_mass_pg, a.extent_um],
                                   rtol=MEASURE_RTOL)
        assert b.area_um2 == a.area_um2


def test_real_hl60_series_agrees(real_qpi):
    """Every 10th of the 140 measured HL60 phase maps (rad, 0.139 um/px, resampled to 0.25 um/px)."""
    with open_export(real_qpi / "hl60_qlsi_series" / "series.h5") as reader:
        raws = [raw for raw in reader if raw.index % 10 == 0]
        meta = raws[0].meta.over(reader.file_meta)
    stack, paths = np.stack([raw.data for raw in raws]), [f"hl60 [map {raw.index}]" for raw in raws]
    config = PreprocessConfig()
    expected = per_map(stack, meta, config, paths)
    assert not any(isinstance(e, ExportError) for e in expected)
    assert_alike(expected, preprocess_stack(stack, meta, config, paths))


@pytest.mark.parametrize("out_pixel_um", [1.0, CAMERA_PIXEL_UM], ids=["resampled", "same-pixel-size"])
@pytest.mark.parametrize("order", [1, 2])
def test_simulated_cells_agree(out_pixel_um, order):
    """Simulated cells of three classes, resampled or not (identity skipped), background plane or quadric."""
    stack = np.stack([simulated_opd(name, 0, i)[0] for name in ("SW480", "granulocytes", "PBMCs")
                      for i in range(3)])
    config = PreprocessConfig(out_pixel_size_um=out_pixel_um, out_size=32 if out_pixel_um == 1.0 else 64,
                              background_order=order)
    meta = Meta(units="nm", pixel_size_um=CAMERA_PIXEL_UM)
    paths = [f"sim [map {i}]" for i in range(len(stack))]
    expected = per_map(stack, meta, config, paths)
    assert sum(isinstance(e, ExportError) for e in expected) == 0
    assert_alike(expected, preprocess_stack(stack, meta, config, paths))


def refused_stack() -> tuple[np.ndarray, list[str]]:
    """A stack of 64 x 64 maps (nm, 0.5 um/px) with good cells between maps refused for each reason."""
    good = disc_field((64, 64), [(16, 16)], seed=1)
    noise = np.random.default_rng(2).normal(20, 2, (64, 64)).astype(np.float32)
    nans = good.copy()
    nans[:20] = np.nan
    few_nans = good.copy()
    few_nans[0, :5] = np.nan                               # filled, then accepted
    maps = {"good": good, "empty": noise, "field": disc_field((64, 64), [(6, 6), (6, 24), (24, 8), (24, 24)]),
            "cut": disc_field((64, 64), [(16, 1)], seed=3), "too high": good * 100.0,
            "constant": np.ones((64, 64)),
            "zeros": np.zeros((64, 64)), "nans": nans, "few nans": few_nans, "inverted": -good,
            "two cells": disc_field((64, 64), [(10, 10), (22, 22)], radius_um=3.0, seed=4),
            "good too": disc_field((64, 64), [(15, 17)], seed=5)}
    return np.stack(list(maps.values())).astype(np.float64), list(maps)


def test_refused_maps_get_the_per_map_reasons():
    stack, names = refused_stack()
    config = PreprocessConfig(out_pixel_size_um=1.0, out_size=32)
    expected = per_map(stack, NM_META, config, names)
    refused = {name for name, e in zip(names, expected, strict=True) if isinstance(e, ExportError)}
    assert refused == {"empty", "field", "cut", "too high", "constant", "zeros", "nans", "inverted"}
    assert_alike(expected, preprocess_stack(stack, NM_META, config, names))


def test_a_stack_of_refused_maps_gives_each_its_reason():
    """Every map refused at each stage (checks, inversion, background): each its per-map reason, no crash."""
    stack, names = refused_stack()
    config = PreprocessConfig(out_pixel_size_um=1.0, out_size=32)
    expected = per_map(stack, NM_META, config, names)
    for stage in (["constant", "zeros", "nans"], ["inverted"], ["empty"]):
        picked = [names.index(name) for name in stage]
        got = preprocess_stack(stack[picked], NM_META, config, stage)
        assert all(isinstance(result, ExportError) for result in got)
        assert_alike([expected[i] for i in picked], got)


def test_wrapped_phase_refused_like_per_map():
    """Phase (rad): an unwrapped cell, the same cell wrapped into (-pi, pi], and a cell under pi."""
    phase = disc_field((64, 64), [(16, 16)], peak_nm=12.0).astype(np.float64) - 20.0
    maps = np.stack([phase, np.angle(np.exp(1j * phase)), phase / 6])
    meta, config = Meta(units="rad", wavelength_nm=633.0, pixel_size_um=0.5), PreprocessConfig(1.0, 32)
    paths = ["unwrapped", "wrapped", "shallow"]
    expected = per_map(maps, meta, config, paths)
    assert "wrapped phase" in str(expected[1]) and not isinstance(expected[0], ExportError)
    assert_alike(expected, preprocess_stack(maps, meta, config, paths))


@pytest.mark.parametrize("radius", [0.0, 1.0, 2.0, 2.5, 5 ** 0.5, 6.2])
def test_dilate_stack_is_dilate(radius):
    masks = np.random.default_rng(0).random((5, 40, 37)) > 0.995
    masks[1] = False
    masks[2, 0, 0] = masks[3, -1, 20] = True                  # at the edges
    expected = np.stack([ndi.distance_transform_edt(~m) <= radius if m.any() and radius > 0 else m
                         for m in masks])
    assert np.array_equal(dilate_stack(masks, radius), expected)
    assert np.array_equal(np.stack([dilate(m, radius) for m in masks]), expected)


def test_stack_chunk_bounds_memory():
    assert stack_chunk((140, 140)) == 3 and stack_chunk((32, 32)) == 64 and stack_chunk((241, 246)) == 1


def test_bad_stack_arguments():
    with pytest.raises(ValueError, match="stack of 2-D maps"):
        preprocess_stack(np.zeros((8, 8)), NM_META)
    with pytest.raises(ValueError, match="2 paths for 3 maps"):
        preprocess_stack(np.zeros((3, 8, 8)), NM_META, paths=["a", "b"])
    assert preprocess_stack(np.zeros((0, 8, 8)), NM_META) == []


@contextlib.contextmanager
def per_map_ingest(monkeypatch):
    """``ingest`` with its batched call replaced by preprocess_map map by map (the path before stacks)."""
    with monkeypatch.context() as patch:
        patch.setattr(ingest, "preprocess_stack", lambda data, meta, config, paths, ranges: per_map(
            data, meta, config, paths, ranges=ranges))
        yield


def test_ingest_batches_stack_like_per_map(tmp_path, monkeypatch):
    """A stack file with refused maps between good ones: the same maps, indices and reasons, in order."""
    stack, _ = refused_stack()
    path = tmp_path / "stack.npy"
    np.save(path, np.concatenate([stack] * 2))   # more maps than one chunk holds
    options = IngestOptions(units="nm", pixel_size_um=0.5, stack_axis=0, config=PreprocessConfig(1.0, 32))

    def run():
        errors = []
        maps = list(iter_processed(path, options, on_error=lambda e: errors.append(str(e))))
        return [i for i, _, _ in maps], [m for _, m, _ in maps], errors

    with monkeypatch.context() as patch:
        patch.setattr(ingest, "stack_chunk", lambda shape: 5)
        batched = run()
        with per_map_ingest(monkeypatch):
            expected = run()
    assert batched[0] == expected[0] and batched[2] == expected[2] and len(expected[2]) == 16
    assert expected[2][0].startswith(f"{path} [map 1]: ")   # the noise-only map, named with its index
    assert_alike(expected[1], batched[1])


def test_load_dataset_same_either_way(tmp_path, monkeypatch):
    """``load`` of class folders holding stacks writes the same dataset through either path."""
    for name, seed in (("SW480", 0), ("granulocytes", 1)):
        folder = tmp_path / "src" / name
        folder.mkdir(parents=True)
        np.save(folder / "stack.npy", np.stack([disc_field((64, 64), [(16, 15 + i)], seed=seed + 10 * i)
                                                for i in range(6)]))

    def load(out):
        with contextlib.redirect_stderr(io.StringIO()):
            status = load_main([str(tmp_path / "src"), "--out", str(out), "--units", "nm", "--pixel-size-um",
                                "0.5", "--stack-axis", "0", "--out-size", "32", "--out-pixel-size-um", "1.0"])
        assert status == 0
        with open_dataset(out) as ds:
            return {"opd": np.asarray(ds.opd[:]), "labels": np.asarray(ds.labels),
                    "dry_mass_pg": np.asarray(ds.dry_mass_pg)}

    batched = load(tmp_path / "batched.h5")
    with per_map_ingest(monkeypatch):
        expected = load(tmp_path / "per_map.h5")
    assert len(batched["opd"]) == 12
    np.testing.assert_allclose(batched["opd"], expected["opd"], rtol=0, atol=OPD_ATOL_NM)
    assert np.array_equal(batched["labels"], expected["labels"])
    np.testing.assert_allclose(batched["dry_mass_pg"], expected["dry_mass_pg"], rtol=1e-6)   # stored float32


def test_traced_encoder_pass_matches_the_model_and_pads_the_last_call():
    """screen's encoder pass (a traced graph, its last call padded) against the Keras model's own output;
    a map scores the same in a call of 70 maps (64 + 6 padded to 64) as in one of 5 (a shard's last)."""
    import keras

    from opdcells.screen import encoder_pass

    inputs = keras.Input((16, 16, 1))
    encoder = keras.Sequential([keras.layers.Conv2D(4, 3, activation="relu"),
                                keras.layers.GlobalAveragePooling2D()], name="encoder")
    head = keras.layers.Dense(3, activation="softmax", name="classifier")
    model = keras.Model(inputs, head(encoder(inputs)))
    saved = type("Saved", (), {"learner": type("Learner", (), {"model": model})})()
    maps = np.random.default_rng(0).normal(0, 1, (70, 16, 16)).astype(np.float32)
    proba, embedding = encoder_pass(saved)(maps, 256)
    assert proba.shape == (70, 3) and embedding.shape == (70, 4)
    np.testing.assert_allclose(proba, keras.ops.convert_to_numpy(model(maps[..., None])), atol=1e-6)
    np.testing.assert_allclose(encoder_pass(saved)(maps[64:69], 256)[0], proba[64:69], rtol=0, atol=1e-7)
