from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from medsynth.config import CONFIG_DIR, apply_overrides, dump_config, format_validation_error, load_config, read_yaml
from medsynth.errors import BadInputError, MedsynthError
from medsynth.recipes import RECIPES, get_recipe
from medsynth.runs import read_structured


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
    from medsynth.motion.registration import RegistrationConfig

    recipe = read_yaml(path).get("recipe")  # a recipe name may hold a dash (flow-cvae)
    if recipe is None:  # registration settings (register-demo)
        assert load_config(RegistrationConfig, path).iterations_per_level()
        return
    config = load_config(RECIPES[recipe].config_class, path)
    assert config.recipe == recipe


def test_missing_config_file_lists_shipped(tmp_path):
    with pytest.raises(BadInputError, match="cvae-tiny"):
        load_config(get_recipe("cvae").config_class, tmp_path / "nope.yaml")


# -- one structured-file reader and one pydantic-error formatter ------------------------------


def test_read_structured_reads_json_and_yaml_by_suffix(tmp_path):
    (tmp_path / "a.json").write_text('{"a": [1, 2]}')
    (tmp_path / "a.yaml").write_text("a: [1, 2]\n")
    (tmp_path / "empty.yml").write_text("")
    assert read_structured(tmp_path / "a.json") == read_structured(tmp_path / "a.yaml") == {"a": [1, 2]}
    assert read_structured(tmp_path / "empty.yml") == {}


@pytest.mark.parametrize(("name", "text", "problem"), [
    ("bad.json", '{"a": 1,\n', r"bad\.json: settings is not valid JSON at line 2"),
    ("bad.yaml", "a: [1, 2\nb: 3\n", r"bad\.yaml: settings is not valid YAML at line \d"),
    ("list.json", "[1, 2]", r"list\.json: expected a JSON mapping \(settings\), got list"),
    ("missing.yaml", None, r"missing\.yaml: settings not found"),
])
def test_read_structured_fails_with_one_line(tmp_path, name, text, problem):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(BadInputError, match=problem) as caught:
        read_structured(tmp_path / name, "settings")
    assert "\n" not in str(caught.value)


def test_validation_errors_are_one_line_naming_source_and_key():
    config_class = get_recipe("cvae").config_class
    with pytest.raises(ValidationError) as caught:
        config_class.model_validate({"train": {"max_epochs": 0, "lr": -1}})
    line = format_validation_error(caught.value, "my.yaml")
    assert line.startswith("my.yaml: train.max_epochs: Input should be greater than or equal to 1 (got 0)")
    assert line.endswith("(and 1 more error(s))") and "\n" not in line


@pytest.mark.parametrize("value", ["nan", "inf", "-.inf"])
def test_configs_refuse_non_finite_floats(value):
    with pytest.raises(MedsynthError, match=rf"^--set train\.lr={re.escape(value)}: train\.lr: Input should be a finite number"):
        load_config(get_recipe("cvae").config_class, overrides=[f"train.lr={value}"])


def test_a_bad_override_is_named_not_the_config_file():
    with pytest.raises(MedsynthError, match=r"^--set train\.max_epochs=0: train\.max_epochs: Input should be greater"):
        load_config(get_recipe("cvae").config_class, "cvae-tiny", overrides=["train.batch_size=4", "train.max_epochs=0"])
    with pytest.raises(MedsynthError, match=r"cvae-tiny\.yaml: unknown config key 'model\.chanels'"):
        load_config(get_recipe("cvae").config_class, "cvae-tiny", overrides=["train.batch_size=4"], base={"model": {"chanels": 1}})


def test_dump_config_is_atomic_and_round_trips(tmp_path):
    config = load_config(get_recipe("cvae").config_class, "cvae-tiny")
    path = dump_config(config, tmp_path / "run" / "config.yaml")
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]
    assert load_config(get_recipe("cvae").config_class, path) == config
