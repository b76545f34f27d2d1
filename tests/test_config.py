from __future__ import annotations

import pytest

from medsynth.config import CONFIG_DIR, apply_overrides, load_config
from medsynth.errors import BadInputError, MedsynthError
from medsynth.recipes import RECIPES, get_recipe


def test_overrides_parse_yaml_values():
    data = apply_overrides({}, ["train.max_epochs=3", "train.lr=1e-4", "model.channels=[8, 16]", "train.ema_decay=null"])
    assert data == {"train": {"max_epochs": 3, "lr": 1e-4, "ema_decay": None}, "model": {"channels": [8, 16]}}


def test_unknown_key_is_named():
    with pytest.raises(MedsynthError, match="unknown config key 'train.max_epoch'"):
        load_config(get_recipe("cvae").config_class, overrides=["train.max_epoch=3"])


def test_ill_typed_value_is_named():
    with pytest.raises(MedsynthError, match="train.max_epochs"):
        load_config(get_recipe("cvae").config_class, overrides=["train.max_epochs=many"])


def test_bad_override_syntax():
    with pytest.raises(MedsynthError, match="expected key=value"):
        apply_overrides({}, ["train.max_epochs"])


def test_unknown_recipe():
    with pytest.raises(MedsynthError, match="unknown recipe 'gan'"):
        get_recipe("gan")


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_validate(path):
    recipe = path.stem.split("-")[0]
    config = load_config(RECIPES[recipe].config_class, path)
    assert config.recipe == recipe


def test_missing_config_file_lists_shipped(tmp_path):
    with pytest.raises(BadInputError, match="cvae-tiny"):
        load_config(get_recipe("cvae").config_class, tmp_path / "nope.yaml")
