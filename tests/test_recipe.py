"""The training recipe (opdcells.recipe): schedule, optimizer, label-smoothed loss, and its config fields."""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from opdcells import recipe
from opdcells.config import PRE_RECIPE, TrainConfig
from opdcells.errors import ConfigError


def rate_at(schedule, step: int) -> float:
    return float(schedule(step)) if callable(schedule) else float(schedule)


def test_warmup_then_cosine_to_zero():
    schedule = recipe.learning_rate_schedule(1e-3, "cosine", total_steps=100, warmup_steps=10)
    rates = [rate_at(schedule, s) for s in range(101)]
    assert rates[0] == pytest.approx(0.0, abs=1e-12)
    assert rates[5] == pytest.approx(5e-4, rel=1e-5)          # linear warm-up
    assert max(rates) == pytest.approx(1e-3, rel=1e-6) and int(np.argmax(rates)) == 10
    assert rates[55] == pytest.approx(5e-4, rel=1e-4)         # half-way through the cosine
    assert rates[100] == pytest.approx(0.0, abs=1e-9)
    assert all(b <= a + 1e-12 for a, b in zip(rates[10:], rates[11:], strict=False))


def test_constant_schedule_and_warmup_longer_than_the_run():
    assert recipe.learning_rate_schedule(3e-4, "constant", total_steps=50, warmup_steps=10) == 3e-4
    short = recipe.learning_rate_schedule(1e-3, "cosine", total_steps=5, warmup_steps=50)
    assert rate_at(short, 4) == pytest.approx(1e-3)           # warm-up clipped to leave one decay step
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        recipe.learning_rate_schedule(1e-3, "step", total_steps=5)


def test_adamw_decays_kernels_but_not_biases_or_batchnorm():
    settings = TrainConfig(optimizer="adamw", weight_decay=0.5, learning_rate=0.1, lr_schedule="constant")
    optimizer = recipe.build_optimizer(settings, epochs=1, steps_per_epoch=1)
    assert isinstance(optimizer, keras.optimizers.AdamW)
    layer = keras.layers.Dense(2, kernel_initializer="ones", bias_initializer="ones")
    layer.build((None, 2))
    norm = keras.layers.BatchNormalization()
    norm.build((None, 2))
    variables = [layer.kernel, layer.bias, norm.gamma, norm.beta]
    optimizer.apply_gradients([(keras.ops.zeros_like(v), v) for v in variables])   # decay only
    assert np.allclose(layer.kernel.numpy(), 1 - 0.1 * 0.5)
    assert np.allclose(layer.bias.numpy(), 1) and np.allclose(norm.gamma.numpy(), 1)
    assert isinstance(recipe.build_optimizer(settings.replace(optimizer="adam"), epochs=1, steps_per_epoch=1),
                      keras.optimizers.Adam)


def test_build_optimizer_warms_up_over_warmup_epochs():
    settings = TrainConfig(learning_rate=2e-3, lr_schedule="cosine", warmup_epochs=2)
    optimizer = recipe.build_optimizer(settings, epochs=10, steps_per_epoch=5)
    schedule = optimizer.learning_rate if callable(optimizer.learning_rate) else optimizer._learning_rate
    assert rate_at(schedule, 5) == pytest.approx(1e-3, rel=1e-5)
    assert rate_at(schedule, 10) == pytest.approx(2e-3)
    head = recipe.build_optimizer(settings, epochs=2, steps_per_epoch=5, schedule="constant")
    assert float(keras.ops.convert_to_numpy(head.learning_rate)) == pytest.approx(2e-3)


def test_label_smoothed_loss_matches_the_formula():
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    labels = np.array([0, 1])
    eps = 0.1
    target = (1 - eps) * np.eye(3)[labels] + eps / 3
    expected = float(np.mean(-(target * np.log(proba)).sum(axis=1)))
    loss = recipe.classification_loss(eps)
    assert float(loss(labels, proba)) == pytest.approx(expected, rel=1e-5)
    assert float(loss(labels[:, None], proba)) == pytest.approx(expected, rel=1e-5)   # (B, 1) labels too
    plain = float(recipe.classification_loss(0.0)(labels, proba))
    assert plain == pytest.approx(float(np.mean(-np.log(proba[[0, 1], labels]))), rel=1e-5)
    clone = recipe.SmoothedSparseCrossentropy.from_config(loss.get_config())
    assert clone.label_smoothing == eps
    with pytest.raises(ValueError, match="label_smoothing"):
        recipe.SmoothedSparseCrossentropy(1.0)


def test_recipe_fields_validated_and_old_configs_read_as_trained(tmp_path):
    bad_fields = ({"optimizer": "sgd"}, {"weight_decay": -1.0}, {"warmup_epochs": -1},
                  {"label_smoothing": 1.0})
    for bad in bad_fields:
        with pytest.raises(ConfigError):
            TrainConfig(**bad)
    fresh = TrainConfig()
    assert (fresh.optimizer, fresh.lr_schedule) == ("adamw", "cosine") and fresh.label_smoothing > 0
    old = {k: v for k, v in fresh.to_dict().items() if k not in PRE_RECIPE}   # saved before the recipe
    old["lr_schedule"] = "constant"
    folder_config = tmp_path / "config.json"
    folder_config.write_text(json.dumps({"format": "opdcells-model", "train_config": old}))
    read = TrainConfig.from_json(folder_config)
    assert {k: getattr(read, k) for k in PRE_RECIPE} == PRE_RECIPE


def test_profiles_give_scratch_models_the_recipe_and_pretrained_ones_their_measured_settings():
    for family in ("mobilenetv2", "resnet50", "vgg16"):
        scratch = TrainConfig.from_profile(family, "quick")
        assert (scratch.optimizer, scratch.lr_schedule, scratch.warmup_epochs) == ("adamw", "cosine", 1)
        assert scratch.label_smoothing == 0.1 and scratch.weight_decay > 0
    assert TrainConfig.from_profile("mobilenetv2", "quick").epochs == 20
    tuned = TrainConfig.from_profile("opd_mobilenetv2", "quick")
    assert {k: getattr(tuned, k) for k in PRE_RECIPE} == PRE_RECIPE and tuned.lr_schedule == "constant"
    assert (tuned.epochs, tuned.patience) == (8, 3)
    # measured on the demo's validation groups: neither raised the OPD encoder (docs/recipe.md)
    assert tuned.fusion == "none" and tuned.physical_quantities is False
    assert TrainConfig.from_profile("opd_mobilenetv2", "quick", optimizer="adamw").optimizer == "adamw"


def test_physical_quantities_default_on_from_scratch_and_old_configs_read_them_off(tmp_path):
    from opdcells.config import DEFAULT_PHYSICAL_QUANTITIES

    fresh = TrainConfig.from_profile("resnet50", "quick")
    assert fresh.physical_quantities is True and fresh.quantity_names == DEFAULT_PHYSICAL_QUANTITIES
    assert TrainConfig.from_profile("features", "quick").quantity_names == ()
    assert TrainConfig(physical_quantities=["dry_mass_pg"]).quantity_names == ("dry_mass_pg",)
    for bad in (["dry_mass_pg", "colour"], [], "yes"):
        with pytest.raises(ConfigError, match="physical_quantities"):
            TrainConfig(physical_quantities=bad)
    written = TrainConfig(physical_quantities=["area_um2", "dry_mass_pg"]).to_json(tmp_path / "c.json")
    assert TrainConfig.from_json(written).quantity_names == ("area_um2", "dry_mass_pg")
    old = {k: v for k, v in fresh.to_dict().items() if k != "physical_quantities"}   # saved before it
    folder_config = tmp_path / "config.json"
    folder_config.write_text(json.dumps({"format": "opdcells-model", "train_config": old}))
    assert TrainConfig.from_json(folder_config).physical_quantities is False
