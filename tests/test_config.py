import pytest

from tasks.config import ConfigError, load_params
from tests.conftest import REPO, write_params


def test_repo_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert "classification" in params.tasks
    assert params.task("classification").train.epochs >= 1


def test_wrong_type_names_the_key(tmp_path):
    path = write_params(tmp_path, {"tasks.classification.train.epochs": "ten"})
    with pytest.raises(ConfigError, match=r"tasks\.classification\.train\.epochs"):
        load_params(path)


def test_out_of_range_names_the_key(tmp_path):
    path = write_params(tmp_path, {"tasks.classification.augment.hflip.p": 1.5})
    with pytest.raises(ConfigError, match=r"tasks\.classification\.augment\.hflip\.p.*less than or equal to 1"):
        load_params(path)


def test_unknown_key_is_rejected(tmp_path):
    path = write_params(tmp_path, {"tasks.classification.train.epoch": 3})
    with pytest.raises(ConfigError, match=r"train\.epoch.*Extra inputs"):
        load_params(path)


def test_bad_split_fractions(tmp_path):
    path = write_params(tmp_path, {"tasks.classification.data.split_fractions": {"train": 0.9, "val": 0.2, "test": 0.1}})
    with pytest.raises(ConfigError, match="split_fractions"):
        load_params(path)


def test_overrides_apply_dotted_keys():
    params = load_params(REPO / "params.yaml", {"tasks.classification.train.epochs": 2, "seed": 7})
    assert params.seed == 7 and params.task("classification").train.epochs == 2


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")


def test_readme_presets_are_valid_augment_settings():
    """The README's augment preset per kind of data must load as it is written."""
    import re

    import yaml

    from tasks.config import AugmentConfig

    text = (REPO / "README.md").read_text()
    section = text.split("#### Presets per kind of data", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| (natural photos|street scenes|microscopy|documents)[^|]*\| `([^`]+)`", section, re.M)
    assert len(rows) == 4, rows
    for kind, block in rows:
        cfg = AugmentConfig.model_validate(yaml.safe_load(block))
        assert not (kind != "microscopy" and cfg.vflip.enabled), kind
