"""Instance segmentation end to end on tiny synthetic scenes: `dvc repro` in a fresh git repo and the
Prefect flow `train-instance-segmentation`, both beating the dummy's mask mAP; the exported COCO
results rescore to the reported mask mAP with pycocotools; MLflow holds the test metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.conftest import REPO
from tests.test_e2e_classification import dvc, make_repo

pytestmark = pytest.mark.e2e
TASK = "instance_segmentation"
# only this task (the "tasks" key replaces the whole section), on scenes big enough to learn from in seconds
SCENES = {
    "num_images": 60,
    "image_size": 64,
    "min_objects": 1,
    "max_objects": 2,
    "scale": [0.3, 0.5],
    "clutter": 0,
    "noise": 4,
}
TINY = {
    "image_size": 64,
    "train": {"epochs": 12, "batch_size": 4, "eval_batch_size": 16, "num_threads": 1},
    "overfit_check": {"steps": 10, "max_loss": 10.0},
    "preview_samples": 4,
    "options": {"report_images": 2},
    "model": {"width": 8, "options": {"anchor_size": 12, "fpn_channels": 32}},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def instance_only() -> dict:
    section = _merge(yaml.safe_load((REPO / "params.yaml").read_text())["tasks"][TASK], TINY)
    return {"tasks": {TASK: section}, "shapes.scenes": SCENES}


def evaluation(folder: Path) -> dict:
    return json.loads((folder / f"outputs/{TASK}/evaluate/metrics.json").read_text())


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("e2e-inst") / "repo", **instance_only())
    # this task's chain only (generate -> ... -> evaluate@instance_segmentation): the repo holds no other task
    result = dvc(repo, "repro", f"evaluate@{TASK}", CV_PIPELINE_RUN_ID="e2e-inst-dvc")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return repo


def test_dvc_repro_beats_the_dummy_mask_map(dvc_repo):
    m = evaluation(dvc_repo)
    assert m["n_test"] == 9
    for model in ("baseline", "augmented"):
        assert m[model]["mask_map50"] > m["dummy"]["mask_map50"] + 0.05, m
        for k in ("box_map", "box_map50", "mask_map", "mask_map50"):
            assert 0 <= m[model][k] <= 1
    details = dvc_repo / f"outputs/{TASK}/evaluate/details"
    gt = json.loads((details / "coco_ground_truth.json").read_text())
    sizes = {im["id"]: [im["height"], im["width"]] for im in gt["images"]}
    assert len(sizes) == 9 and gt["annotations"]
    for model in ("dummy", "baseline", "augmented"):  # masks at each test image's own size, boxes inside it
        rows = json.loads((details / f"coco_results_{model}.json").read_text())
        assert model == "dummy" or rows, model
        for r in rows:
            x, y, w, h = r["bbox"]
            height, width = sizes[r["image_id"]]
            assert r["segmentation"]["size"] == [height, width] and 0 <= r["score"] <= 1, r
            assert r["category_id"] in {c["id"] for c in gt["categories"]}, r
            assert w >= 0 and h >= 0 and -1 <= x <= x + w <= width + 1 and -1 <= y <= y + h <= height + 1, r
    per_class = pd.read_csv(details / "per_class_augmented.csv")
    assert sorted(per_class["class"]) == sorted(c["name"] for c in gt["categories"])
    assert per_class["gt_instances"].sum() == len(gt["annotations"])
    for name, mask_ap50, box_ap50 in zip(per_class["class"], per_class["mask_ap50"], per_class["box_ap50"]):
        assert mask_ap50 == pytest.approx(m["augmented"][f"mask_ap50/{name}"], abs=1e-9)
        assert box_ap50 == pytest.approx(m["augmented"][f"box_ap50/{name}"], abs=1e-9)
    for picture in (details / "predictions_test.png", dvc_repo / f"outputs/{TASK}/augmented/augment_preview.png"):
        with Image.open(picture) as im:
            assert im.width >= 64 and im.height >= 64 and len(set(im.convert("L").getdata())) > 2, picture
    assert (dvc_repo / f"outputs/{TASK}/validate/report.md").read_text().count("| ok |") >= 10


def test_reported_mask_map_equals_pycocotools_on_the_exported_results(dvc_repo):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    details = dvc_repo / f"outputs/{TASK}/evaluate/details"
    m = evaluation(dvc_repo)
    gt = COCO(str(details / "coco_ground_truth.json"))
    for model in ("baseline", "augmented"):
        results = json.loads((details / f"coco_results_{model}.json").read_text())
        assert results and all(isinstance(r["segmentation"]["counts"], str) for r in results)  # compressed RLE
        for iou_type, prefix in (("segm", "mask"), ("bbox", "box")):
            ev = COCOeval(gt, gt.loadRes(str(details / f"coco_results_{model}.json")), iou_type)
            ev.evaluate(), ev.accumulate(), ev.summarize()
            assert m[model][f"{prefix}_map"] == pytest.approx(ev.stats[0], abs=1e-9)
            assert m[model][f"{prefix}_map50"] == pytest.approx(ev.stats[1], abs=1e-9)


@pytest.mark.slow  # make test-all (suite budget): the same flow code as the served train-detection run in test_e2e_detection.py
def test_prefect_flow_train_instance_segmentation(dvc_repo, tmp_path, monkeypatch):
    import mlflow
    from tests.conftest import prefect_harness

    from flows.pipeline import FLOWS, flow_name

    assert flow_name(TASK) == "train-instance-segmentation"
    repo = make_repo(tmp_path / "flow", **instance_only())
    monkeypatch.chdir(repo)
    with prefect_harness():
        result = FLOWS[TASK](params_path="params.yaml")
    assert result["augmented"]["mask_map50"] > result["dummy"]["mask_map50"] + 0.05
    assert result == evaluation(repo)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("cv-" + TASK)
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'evaluate'")
    assert any(
        r.data.metrics.get("test.augmented.mask_map50") == pytest.approx(result["augmented"]["mask_map50"])
        for r in runs
    )
