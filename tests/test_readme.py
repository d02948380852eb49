"""The README's settings blocks for your own data are valid settings: each, pasted over the same keys of
params.yaml, passes the same checks as the real file (so the front door never shows a block that fails)."""

from __future__ import annotations

import re

import pytest
import yaml

from tasks.config import load_params
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
BLOCKS = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", README, re.S)]


def test_the_readme_stays_a_front_door():
    assert len(README.splitlines()) <= 300


def test_the_readme_has_a_block_for_every_task():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert sorted(name for b in BLOCKS for name in b["tasks"]) == sorted(raw["tasks"])


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: next(iter(b["tasks"])))
def test_a_readme_block_pasted_into_params_yaml_is_valid(block):
    ((name, section),) = block["tasks"].items()
    overrides = {f"tasks.{name}.{key}": value for key, value in section.items()}
    cfg = load_params(REPO / "params.yaml", overrides).task(name)
    assert cfg.data.path == section["data"]["path"]
    for switch in cfg.augment.switch_names():  # the preset is what the task gets: the switches it names, no other
        assert getattr(cfg.augment, switch).enabled == section["augment"].get(switch, {}).get("enabled", False), switch
