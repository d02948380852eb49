"""Issue 29: the figures reported (COCO scoring at the maxDets used, the fitted plan), the time budget (plan, stop,
schedule re-spanned and annealed, resume) and the warnings that should fire."""
import contextlib
import io

import numpy as np
import pytest

from cv_models.data import coco


def _crowded(n_objects: int = 150, class_names=("cell", "debris")):
    """One 1000x1000 image holding ``n_objects`` 40x40 boxes of the first class (none of the second), and a
    detector's results: every box found, scores falling."""
    anns, results = [], []
    for k in range(n_objects):
        x, y = 60 * (k % 15), 60 * (k // 15)
        anns.append({"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [x, y, 40, 40], "area": 1600, "iscrowd": 0})
        results.append({"image_id": 1, "category_id": 1, "bbox": [x + 1, y, 40, 40], "score": 1 - k / 1000})
    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 1000, "height": 1000}], "annotations": anns,
          "categories": [{"id": k + 1, "name": c} for k, c in enumerate(class_names)]}
    return gt, results


def test_coco_aps_are_taken_at_the_raised_max_dets():
    gt, results = _crowded(150)
    metrics, per_class = coco.coco_map(gt, results, ["cell", "debris"])
    # every object found: AP 1 at maxDets 150 (pycocotools' summarize() gave -1 for mAP@[.5:.95], reported as 0)
    assert metrics["max_dets"] == 150
    assert metrics["map"] == pytest.approx(1.0) and metrics["map50"] == pytest.approx(1.0)
    assert metrics["map75"] == pytest.approx(1.0)
    # at COCO's 100, a third of the objects cannot be found: recall 100/150, AP@.5 = 67 of the 101 recall points
    assert metrics["map50_maxdets100"] == pytest.approx(67 / 101)
    assert metrics["mar100"] == pytest.approx(100 / 150)
    # a class without ground truth has no AP: NaN in the table, absent from the metrics, named in a note
    assert np.isnan(per_class.set_index("class").loc["debris", "ap50"]) and "ap50/debris" not in metrics
    assert metrics["ap50/cell"] == pytest.approx(1.0)
    assert "debris" in coco.no_ground_truth_notes(per_class)[0]


def test_coco_scoring_at_100_objects_is_pycocotools_summarize():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, results = _crowded(60)
    results = [{**r, "bbox": [r["bbox"][0] + (k % 7), *r["bbox"][1:]]} for k, r in enumerate(results)]  # imperfect
    metrics, _ = coco.coco_map(gt, results, ["cell", "debris"])
    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = gt
        g.createIndex()
        ev = COCOeval(g, g.loadRes(results), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert metrics["max_dets"] == 100
    assert [metrics[k] for k in ("map", "map50", "map75", "mar100")] == [ev.stats[i] for i in (0, 1, 2, 8)]
    assert metrics["map50_maxdets100"] == metrics["map50"]


def test_the_recompute_lines_give_the_reported_values():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, results = _crowded(150)
    metrics, _ = coco.coco_map(gt, results, ["cell", "debris"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        g = COCO()
        g.dataset = gt
        g.createIndex()
        e = COCOeval(g, g.loadRes(results), "bbox")
        e.params.maxDets = [1, 10, 100, 150]
        e.evaluate(), e.accumulate()
        exec(coco.RESCORE_LINES, {"e": e, "np": np})
    printed = out.getvalue().split()
    values = {k: float(v) for k, v in zip(printed[-8::2], printed[-7::2])}
    assert values == pytest.approx({k: metrics[k] for k in ("map", "map50", "map75", "map50_maxdets100")})
