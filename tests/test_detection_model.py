"""Detection pieces: box-aware augmentations and mixers, the detector registry and pretrained-head
refit, the dummy, and COCO mAP that pycocotools reproduces from the exported files."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision import tv_tensors

from cv_models import get_task
from cv_models.detection.tta import tta_detections
from cv_models.mix.detection import DetectionMixer, clip_to_region, cutmix, mixup, mosaic
from tasks.config import load_params
from tests.detection_helpers import det_params

ALL_ON = {
    name: {"enabled": True, "p": 1.0}
    for name in ("hflip", "vflip", "rotation", "crop", "rescale", "color", "noise", "blur", "cutout")
}


def _task(project, **extra):
    return get_task(
        "detection",
        load_params(det_params(project, **{"tasks.detection.normalization": "none", **extra})).task("detection"),
    )


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels), "image_id": 1}


def test_every_augmentation_moves_boxes_with_the_image(project):
    task = _task(project)
    torch.manual_seed(0)
    data = task.dataset("train", task.train_transforms(task.augment_schema().model_validate(ALL_ON), None))
    for i in range(6):
        image, target = data[i]
        assert isinstance(image, tv_tensors.Image) and image.shape == (3, 64, 64) and image.dtype == torch.float32
        b = target["boxes"]
        assert isinstance(b, tv_tensors.BoundingBoxes) and len(b) == len(target["labels"])
        if len(b):  # sanitised: inside the image, positive size
            assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all() and b.min() >= 0 and b.max() <= 64


def test_hflip_mirrors_the_boxes(project):
    task = _task(project)
    plain = task.dataset("train", task.train_transforms(None, None))[0]
    flipped = task.dataset(
        "train",
        task.train_transforms(task.augment_schema().model_validate({"hflip": {"enabled": True, "p": 1.0}}), None),
    )[0]
    b, f = plain[1]["boxes"], flipped[1]["boxes"]
    torch.testing.assert_close(f[:, 0], 64 - b[:, 2])
    torch.testing.assert_close(torch.flip(plain[0], dims=[-1]), flipped[0])


def test_cutout_drops_mostly_covered_boxes():
    from cv_models.detection import BoxCutout

    image = tv_tensors.Image(torch.rand(3, 64, 64))
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[10.0, 10, 20, 20], [40, 40, 60, 60]]), format="XYXY", canvas_size=(64, 64)
    )
    cut = BoxCutout(p=1.0, scale=(0.5, 0.5), min_visible=0.3)
    torch.manual_seed(3)
    kept_any_change = False
    for _ in range(20):
        out, t = cut(image, {"boxes": boxes, "labels": torch.tensor([1, 2])})
        erased = (out == 0.5).all(0)
        for box, lab in zip(boxes, [1, 2]):
            x0, y0, x1, y1 = box.int().tolist()
            covered = erased[y0:y1, x0:x1].float().mean()
            assert (lab in t["labels"].tolist()) == bool(covered <= 0.7 + 1e-6)
        kept_any_change |= len(t["labels"]) < 2
    assert kept_any_change


def test_mixup_keeps_both_box_sets_with_their_weights():
    a, b = torch.zeros(3, 8, 8), torch.ones(3, 8, 8)
    image, t = mixup(a, _target([[0, 0, 4, 4]], [1]), b, _target([[2, 2, 8, 8], [1, 1, 3, 3]], [2, 3]), lam=0.7)
    torch.testing.assert_close(image, torch.full((3, 8, 8), 0.3))
    assert t["labels"].tolist() == [1, 2, 3]
    torch.testing.assert_close(t["weights"], torch.tensor([0.7, 0.3, 0.3]))


def test_mosaic_clips_boxes_to_their_quadrant_and_drops_slivers():
    images = [torch.full((3, 16, 16), float(k)) for k in range(4)]
    targets = [
        _target([[0, 0, 8, 8], [6, 6, 10, 10]], [1, 2]),
        _target([[12, 0, 16, 4]], [3]),
        _target([[0, 0, 16, 16]], [1]),
        _target([[0, 0, 2, 2]], [4]),
    ]
    out, t = mosaic(images, targets, centre=(8, 8), offsets=[(0, 0)] * 4, min_visible=0.2, min_side=2)
    assert out[0, 0, 0] == 0 and out[0, 0, 15] == 1 and out[0, 15, 0] == 2 and out[0, 15, 15] == 3
    got = {(tuple(b.tolist()), int(lab)) for b, lab in zip(t["boxes"], t["labels"])}
    # a quarter of two boxes stays (>= 0.2 kept); image 1's box lies outside its crop; image 3's lands at (8,8)-(10,10)
    assert got == {
        ((0.0, 0.0, 8.0, 8.0), 1),
        ((6.0, 6.0, 8.0, 8.0), 2),
        ((0.0, 8.0, 8.0, 16.0), 1),
        ((8.0, 8.0, 10.0, 10.0), 4),
    }


def test_cutmix_clips_pasted_boxes_and_drops_covered_ones():
    a, b = torch.zeros(3, 16, 16), torch.ones(3, 16, 16)
    out, t = cutmix(
        a,
        _target([[0, 0, 6, 6], [10, 10, 14, 14]], [1, 2]),
        b,
        _target([[4, 4, 9, 9], [0, 12, 3, 16]], [3, 4]),
        region=(8, 8, 16, 16),
        min_visible=0.3,
        min_side=2,
    )
    assert out[:, 8:, 8:].eq(1).all() and out[:, :8, :].eq(0).all()
    got = {(tuple(b.tolist()), int(lab)) for b, lab in zip(t["boxes"], t["labels"])}
    assert got == {((0.0, 0.0, 6.0, 6.0), 1)}  # a's box 2 covered; b's box 3 leftover 1x1 px; b's box 4 outside


def test_clip_keeps_boxes_with_enough_left():
    t = clip_to_region({**_target([[0, 0, 10, 10]], [1]), "weights": torch.ones(1)}, (5, 0, 20, 20), 0.3, 2)
    assert t["boxes"].tolist() == [[5.0, 0.0, 10.0, 10.0]]


def test_mixer_adds_weights_and_keeps_batch(project):
    mixer = DetectionMixer(mixup_p=1.0, mosaic_p=1.0, cutmix_p=1.0)
    images = [torch.rand(3, 32, 32) for _ in range(4)]
    targets = [_target([[4, 4, 20, 20]], [k % 3 + 1]) for k in range(4)]
    torch.manual_seed(0)
    out_images, out_targets = mixer(images, targets)
    assert len(out_images) == 4 and all(im.shape == (3, 32, 32) for im in out_images)
    assert all(len(t["weights"]) == len(t["labels"]) == len(t["boxes"]) for t in out_targets)
    assert _task(project).batch_mixer(None) is None


@pytest.mark.parametrize("name", ["fasterrcnn", "retinanet"])
def test_detectors_train_and_predict_with_weighted_boxes(project, name):
    task = _task(project, **{"tasks.detection.model.name": name})
    model = task.build_model()
    data = task.dataset("train", task.eval_transforms(None))
    images, targets = task.collate([data[i] for i in range(2)])
    weighted = [{**t, "weights": torch.full((len(t["labels"]),), 0.5)} for t in targets]
    model.train()
    torch.manual_seed(0)
    full = task.training_loss(model, images, targets)
    torch.manual_seed(0)
    half = task.training_loss(model, images, weighted)
    assert torch.isfinite(full) and half < full  # the box weights scale the box losses
    model.eval()
    with torch.no_grad():
        out = model(images)
        fused = tta_detections(model, images, "dihedral")  # eight views of each image, boxes mapped back and fused
    assert set(out[0]) >= {"boxes", "scores", "labels"}
    for f, im in zip(fused, images):
        assert len(f["boxes"]) == len(f["scores"]) == len(f["labels"])
        h, w = im.shape[-2:]
        assert (
            (f["boxes"] >= -1e-3).all()
            and (f["boxes"][:, 2] <= w + 1e-3).all()
            and (f["boxes"][:, 3] <= h + 1e-3).all()
        )
        assert (f["scores"][:-1] >= f["scores"][1:]).all()  # best first, as the detectors return them


def test_local_weights_refit_the_box_predictor(project, tmp_path):
    task = _task(project)
    source = task.build_model()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    # a checkpoint trained for another number of classes
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(
        9, state["roi_heads.box_predictor.cls_score.weight"].shape[1]
    )
    state["roi_heads.box_predictor.cls_score.bias"] = torch.zeros(9)
    state["roi_heads.box_predictor.bbox_pred.weight"] = torch.zeros(
        36, state["roi_heads.box_predictor.bbox_pred.weight"].shape[1]
    )
    state["roi_heads.box_predictor.bbox_pred.bias"] = torch.zeros(36)
    path = tmp_path / "other.pt"
    torch.save({"model": state}, path)
    model = _task(project, **{"tasks.detection.model.weights": str(path)}).build_model()
    torch.testing.assert_close(
        model.state_dict()["backbone.body.stages.0.0.weight"], state["backbone.body.stages.0.0.weight"]
    )
    assert model.roi_heads.box_predictor.cls_score.out_features == len(task.class_names()) + 1


def test_torchvision_weights_without_network_say_where_to_put_the_file(project):
    from cv_models.weights import WeightsError

    task = _task(
        project,
        **{
            "tasks.detection.model.name": "fasterrcnn_mobilenet_v3_large_320_fpn",
            "tasks.detection.model.weights": "torchvision:DEFAULT",
            "tasks.detection.model.options": {},
        },
    )
    with pytest.raises(WeightsError, match="checkpoints"):
        task.build_model()


def test_reported_map_equals_pycocotools_on_the_exported_files(project, tmp_path):
    """Predictions = ground truth jittered, some dropped, some extra: the exported JSON files recompute the same mAP."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from cv_models.detection import _coco_results

    task = _task(project)
    test = task.dataset("test", None)
    g = torch.Generator().manual_seed(0)
    results = []
    for r in test.records:
        boxes = r["boxes"] + torch.randn(r["boxes"].shape, generator=g) * 1.5
        labels = torch.where(torch.rand(len(boxes), generator=g) < 0.2, torch.tensor(1), r["labels"])
        results += _coco_results(r["image_id"], boxes, torch.rand(len(boxes), generator=g), labels)
    res = task.score(test, results)
    assert 0.1 < res.metrics["map"] < res.metrics["map50"] <= 1
    task.report({"augmented": res}, test, tmp_path)
    gt = COCO(str(tmp_path / "ground_truth_test.json"))
    ev = COCOeval(gt, gt.loadRes(str(tmp_path / "predictions_augmented.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert res.metrics["map"] == pytest.approx(ev.stats[0], abs=1e-12)
    assert res.metrics["map50"] == pytest.approx(ev.stats[1], abs=1e-12)
    assert (tmp_path / "predictions_augmented.png").exists()
    assert set(res.per_class["class"]) == set(task.class_names())


def test_dummy_is_one_centred_box_per_image(project):
    task = _task(project)
    res = task.dummy_result(task.dataset("train", None), task.dataset("val", None))
    assert len(res.predictions) == len(task.dataset("val", None))
    assert {p["category_id"] for p in res.predictions} == {res.predictions[0]["category_id"]}
    assert 0 <= res.metrics["map50"] < 0.2
    json.dumps(res.predictions)


def test_anchors_sized_to_the_boxes_fit_them_better_than_the_default():
    from cv_models.nets.detectors import anchor_shapes, anchors_sized_to, best_anchor_iou

    # tall boxes (height 1.5 x width) of two sizes, as after squashing a 4:3 image into a square
    sizes = torch.tensor([[20.0, 30.0]] * 50 + [[40.0, 60.0]] * 50)
    fitted = anchors_sized_to(sizes, n_levels=4, scales_per_level=1)
    assert fitted["aspect_ratios"] == [1.5, 1.5, 1.5]
    assert fitted["mean_best_iou"] > 0.95 and fitted["recall_at_iou_0.5"] == 1.0
    default = best_anchor_iou(sizes, anchor_shapes(16, 4, 1, (0.5, 1.0, 2.0))).mean()
    assert fitted["mean_best_iou"] > float(default) + 0.1
    with pytest.raises(ValueError, match="needs training boxes"):
        anchors_sized_to(torch.zeros((0, 2)), 4, 1)
    # COCO-like spread: a few tiny boxes, most of them large and of every shape; sizing to the smallest alone
    # would make every anchor too small (coco128: 0.50 against the defaults' 0.56); never worse than the defaults
    gen = torch.Generator().manual_seed(0)
    spread = torch.cat([torch.full((20, 2), 3.0), torch.rand(300, 2, generator=gen) * 120 + 8])
    fitted = anchors_sized_to(spread, n_levels=4, scales_per_level=1)
    default = best_anchor_iou(spread, anchor_shapes(16, 4, 1, (0.5, 1.0, 2.0))).mean()
    assert fitted["mean_best_iou"] >= round(float(default), 3) and fitted["anchor_size"] > 4.5


def test_auto_anchors_reach_the_detector(project):
    task = _task(
        project,
        **{"tasks.detection.model.options.anchor_size": "auto", "tasks.detection.model.options.aspect_ratios": "auto"},
    )
    options = task.model_options()
    assert isinstance(options.anchor_size, float) and len(options.aspect_ratios) == 3
    generator = task.build_model().rpn.anchor_generator
    assert generator.sizes[0][0] == pytest.approx(options.anchor_size)
    assert list(generator.aspect_ratios[0]) == pytest.approx(options.aspect_ratios)


def test_sizing_and_the_networks_take_the_typed_options():
    """model.options stay the task's pydantic object down to the networks: sizing returns a copy of the same class."""
    from cv_models.detection import DetectionModelOptions
    from cv_models.instance_segmentation import InstanceModelOptions
    from cv_models.nets.detectors import build_detector
    from cv_models.nets.mask_rcnn import build_mask_rcnn
    from cv_models.sizing import sized_options, sized_values

    options = DetectionModelOptions(anchor_size=16, aspect_ratios=[0.5, 1.0, 2.0], detections_per_img=30)
    sized, chosen = sized_options(options, 40)
    assert type(sized) is DetectionModelOptions and options.rpn_post_nms_top_n_test == "auto"  # the original kept
    assert sized.detections_per_img == 30 and "detections_per_img" not in chosen
    assert (
        sized.rpn_post_nms_top_n_test
        == chosen["rpn_post_nms_top_n_test"]
        == sized_values(40)["rpn_post_nms_top_n_test"]
    )
    detector = build_detector("retinanet", 3, 64, [0.5] * 3, [0.25] * 3, 8, sized)
    assert detector.detections_per_img == 30 and detector.topk_candidates == options.topk_candidates
    instance = InstanceModelOptions(backbone="tiny", mask_head_layers=1)
    mask_rcnn = build_mask_rcnn("maskrcnn", 3, 64, 8, sized_options(instance, 5)[0])
    assert mask_rcnn.roi_heads.detections_per_img == sized_values(5)["detections_per_img"]
    assert len(mask_rcnn.roi_heads.mask_head) == 1


def test_inference_config_keeps_the_typed_options_with_the_anchors_resolved(project):
    """The bundle's settings: model.options is still the task's class (kwargs kept), anchors and counts resolved."""
    task = _task(project, **{"tasks.detection.model.options.kwargs": {"box_nms_thresh": 0.4}})
    cfg = task.inference_config()
    options = cfg.model.options
    assert type(options) is type(task.cfg.model.options) and options.kwargs == {"box_nms_thresh": 0.4}
    assert isinstance(options.anchor_size, float) and isinstance(options.detections_per_img, int)
    assert type(task.cfg).model_validate(cfg.model_dump(mode="json")) == cfg  # what task.json holds reads back


def _bright_box_detector(images):
    """A detector for tests: one box around each image's pixels above 0.5, class 1, score 0.9."""
    out = []
    for im in images:
        ys, xs = torch.nonzero(im[0] > 0.5, as_tuple=True)
        box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        out.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])})
    return out


@pytest.mark.parametrize("mode", ["hflip", "flips", "dihedral"])
def test_tta_maps_each_views_boxes_back_before_fusing_them(mode):
    """options.tta: every view sees the object elsewhere (flipped, transposed); mapped back, the views agree on the
    image's own box, so the fused box is it, at the views' score."""
    from cv_models.detection.tta import tta_detections
    from cv_models.augment import VIEWS

    image = torch.zeros(3, 40, 60)
    image[:, 5:15, 8:30] = 1.0  # x 8..30, y 5..15 on a 60-wide, 40-high image
    seen = [_bright_box_detector([im])[0]["boxes"][0].tolist() for im in _views(image, VIEWS[mode])]
    assert len({tuple(b) for b in seen}) == len(VIEWS[mode])  # each view places the object differently
    out = tta_detections(_bright_box_detector, [image], mode)[0]
    assert out["boxes"].tolist() == [pytest.approx([8.0, 5.0, 30.0, 15.0])]
    assert out["scores"].tolist() == pytest.approx([0.9])


def _views(image, views):
    from cv_models.augment import apply_view

    return [apply_view(image, ops) for ops in views]


def test_tta_fusion_averages_agreeing_boxes_and_discounts_a_box_one_view_missed():
    from cv_models.detection.tta import fuse

    a = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]]),
        "scores": torch.tensor([0.8, 0.6]),
        "labels": torch.tensor([1, 2]),
    }
    b = {"boxes": torch.tensor([[2.0, 0, 12, 10]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([1])}
    out = fuse([a, b], limit=10)
    assert out["boxes"].tolist() == [
        pytest.approx([1.0, 0.0, 11.0, 10.0]),
        pytest.approx([50.0, 50.0, 60.0, 60.0]),
    ]  # score-weighted mean corners
    assert out["scores"].tolist() == pytest.approx([0.8, 0.3])  # the second found by one view of two
    assert out["labels"].tolist() == [1, 2]
    nothing = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    assert fuse([nothing, nothing], limit=10)["boxes"].shape == (0, 4)
