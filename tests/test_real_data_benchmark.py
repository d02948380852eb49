"""benchmarks/real_data.py's settings for its two sides: one device and one seed for both, and
pretraining only where a dataset's overlay asks for it."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def real_data():
    spec = importlib.util.spec_from_file_location("real_data", REPO / "benchmarks" / "real_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_overlay_without_pretraining_gets_no_pretrain_key(real_data):
    """A pretrain.* key is what switches the pipeline's pretraining on (run_pipeline): none may be added."""
    spec = real_data.overlay("trashnet150", REPO.parent / "shared" / "datasets")
    overrides, plain = real_data.both_sides("classification", spec, {}, "cuda", seed=3, plain_extra={"size": 96})
    assert not [k for k in overrides if k.startswith("pretrain.")]
    assert overrides["tasks.classification.train.device"] == "cuda" and plain["device"] == "cuda"
    assert overrides["seed"] == plain["seed"] == 3 and plain["size"] == 96
    assert "budget_minutes" not in overrides and "plain" not in overrides


def test_an_overlay_with_pretraining_pretrains_on_the_same_device(real_data):
    spec = real_data.overlay("coco128_json", REPO.parent / "shared" / "datasets")
    overrides, plain = real_data.both_sides("instance_segmentation", spec, {})
    assert (
        overrides["pretrain.device"]
        == overrides["tasks.instance_segmentation.train.device"]
        == plain["device"]
        == "cpu"
    )
    assert "seed" not in overrides and "seed" not in plain  # params.yaml's seed and the plain script's 0
    overrides, _ = real_data.both_sides("instance_segmentation", spec, {"pretrain.device": "cpu"}, "cuda")
    assert overrides["pretrain.device"] == "cpu"  # --set wins
