"""Segmentation on tiny data: readers, bad input naming file and rule, mask-aware augmentations,
MixUp / CutMix alignment, losses on soft targets, models and metrics."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from cv_models import get_task
from cv_models.mix.segmentation import SegmentationCutMix, SegmentationMixUp
from cv_models.seg_losses import LOSSES, soft_targets
from tasks import validate
from tasks.config import ConfigError, LossConfig, load_params
from tasks.validate import ValidationFailed

CLASSES = ["background", "circle", "square", "triangle", "star"]
COLORS = [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200]]
GEOMETRIC = {
    "hflip": {"enabled": True, "p": 1.0},
    "vflip": {"enabled": True, "p": 1.0},
    "rotation": {"enabled": True, "p": 1.0, "degrees": 180},
    "crop": {"enabled": True, "p": 1.0},
    "rescale": {"enabled": True, "p": 1.0, "scale": [0.6, 1.4]},
    "elastic": {"enabled": True, "p": 1.0, "alpha": 60.0, "sigma": 4.0},
}


def _task(project, **extra):
    return get_task("segmentation", load_params(project.params(**extra)).task("segmentation"))


def _mask_of(project, split="train", index=0):
    return sorted((project.shapes / "scenes/masks" / split).glob("*.png"))[index]


def _image_of(mask_path):
    return mask_path.parents[2] / "images" / mask_path.parent.name / mask_path.name


def _report():
    return json.loads(open("outputs/segmentation/validate/report.json").read())


def _failing(rule_part):
    return [f for r in _report()["checks"] if rule_part in r["rule"] and not r["success"] for f in r["failing"]]


# ------------------------------------------------------------------ validation


def test_clean_scenes_pass_with_a_pixel_frequency_table(project):
    report = validate.run("segmentation", project.params())
    assert report["success"] and report["n_samples"] == 24
    table = report["summaries"]["Per-class pixel frequency"]
    assert "| background |" in table and "| star |" in table
    assert "Per-class pixel frequency" in open("outputs/segmentation/validate/report.md").read()


def test_missing_mask(project):
    victim = _mask_of(project, "val")
    victim.unlink()
    with pytest.raises(ValidationFailed, match=rf"every image has a mask.*{victim.name}"):
        validate.run("segmentation", project.params())
    assert any(victim.name in f and "masks/val" in f for f in _failing("every image has a mask"))


def test_mask_size_differs_from_image(project):
    victim = _mask_of(project, "train", 2)
    Image.open(victim).resize((40, 40), Image.NEAREST).save(victim)
    with pytest.raises(ValidationFailed, match=rf"same height and width.*{victim.name}"):
        validate.run("segmentation", project.params())
    assert any(f.endswith(f"masks/train/{victim.name}") for f in _failing("same height and width"))


def test_mask_values_outside_the_classes(project):
    victim = _mask_of(project, "test")
    m = np.array(Image.open(victim))
    m[:4, :4] = 7  # five classes declared: 7 is neither a class nor the ignore index
    Image.fromarray(m, mode="L").save(victim)
    with pytest.raises(ValidationFailed, match=rf"mask values in the declared classes.*{victim.name}"):
        validate.run("segmentation", project.params())
    row = [r for r in _report()["checks"] if "mask values" in r["rule"]][0]
    assert row["unexpected_count"] == 1


def test_ignore_index_is_allowed(project):
    victim = _mask_of(project, "train", 1)
    m = np.array(Image.open(victim))
    m[:3] = 255
    Image.fromarray(m, mode="L").save(victim)
    assert validate.run("segmentation", project.params())["success"]


def _as_rgb(mask_path, colours, undeclared_at=None):
    m = np.array(Image.open(mask_path))
    rgb = np.asarray(colours, dtype=np.uint8)[m]
    if undeclared_at is not None:
        rgb[undeclared_at] = (12, 34, 56)
    Image.fromarray(rgb, mode="RGB").save(mask_path)


def test_rgb_mask_with_an_undeclared_colour(project):
    victim = _mask_of(project, "train", 3)
    _as_rgb(victim, COLORS, undeclared_at=(slice(0, 2), slice(0, 2)))
    with pytest.raises(ValidationFailed, match=rf"colours are declared.*{victim.name}"):
        validate.run("segmentation", project.params())
    row = [r for r in _report()["checks"] if "colours are declared" in r["rule"]][0]
    assert row["unexpected_count"] == 1
    assert "rgb(12,34,56)" in open("outputs/segmentation/validate/samples.csv").read()


def test_rgb_mask_with_declared_colours_is_converted_and_reported(project):
    victim = _mask_of(project, "train", 3)
    original = np.array(Image.open(victim))
    _as_rgb(victim, COLORS)
    report = validate.run("segmentation", project.params())
    assert report["success"]
    assert any(victim.name in n and "RGB mask converted" in n for n in report["notes"])
    task = _task(project)
    data = task.dataset("train", None)
    index = [s["mask_path"] for s in data.samples].index(str(victim.relative_to(project.root)))
    assert np.array_equal(data.mask(index).numpy(), original)


def test_rgb_mask_rejected_when_params_say_so(project):
    victim = _mask_of(project, "val", 1)
    _as_rgb(victim, COLORS)
    with pytest.raises(ValidationFailed, match=rf"single-channel.*{victim.name}"):
        validate.run("segmentation", project.params(**{"tasks.segmentation.data.options.mask_color_mode": "reject"}))


def test_image_without_foreground_is_a_note_not_a_failure(project):
    victim = _mask_of(project, "train", 4)
    Image.fromarray(np.zeros_like(np.array(Image.open(victim))), mode="L").save(victim)
    report = validate.run("segmentation", project.params())
    assert report["success"]
    assert any(_image_of(victim).name in n and "no foreground pixels" in n for n in report["notes"])


def test_identical_image_in_two_splits(project):
    src = _mask_of(project, "train")
    shutil.copy(_image_of(src), project.shapes / "scenes/images/test/leaked.png")
    shutil.copy(src, project.shapes / "scenes/masks/test/leaked.png")
    with pytest.raises(ValidationFailed, match="no identical image in two splits"):
        validate.run("segmentation", project.params())
    assert any("leaked.png" in f for f in _failing("identical"))


# ------------------------------------------------------------------ readers


def test_coco_json_rasterises_to_the_same_masks(project):
    png = _task(project).dataset("train", None)
    coco = _task(project, **{"tasks.segmentation.data.format": "coco"}).dataset("train", None)
    assert [s["path"] for s in coco.samples] == [s["path"] for s in png.samples]
    for i in range(len(png)):
        a, b = png.mask(i).numpy(), coco.mask(i).numpy()
        assert set(np.unique(b)) <= set(np.unique(a)) | {0}
        assert (a == b).mean() > 0.97  # polygon rasterisers differ on edge pixels only
    assert validate.run("segmentation", project.params(**{"tasks.segmentation.data.format": "coco"}))["success"]


def test_split_by_seed_from_flat_folders(project):
    flat = project.root / "flat"
    for sub in ("images", "masks"):
        (flat / sub).mkdir(parents=True)
        for f in (project.shapes / "scenes" / sub).glob("*/*.png"):
            shutil.copy(f, flat / sub / f.name)
    task = _task(project, **{"tasks.segmentation.data.path": "flat", "tasks.segmentation.data.split_from": "seed"})
    sizes = {s: len(task.dataset(s, None)) for s in ("train", "val", "test")}
    assert sizes == {"train": 17, "val": 4, "test": 3}


# ------------------------------------------------------------- augmentations


def test_geometric_transforms_never_create_new_mask_values(project):
    task = _task(project)
    data = task.dataset("train", task.train_transforms(task.augment_schema().model_validate(GEOMETRIC), None))
    torch.manual_seed(0)
    for _ in range(3):
        for i in range(len(data)):
            image, mask = data[i]
            assert isinstance(mask, tv_tensors.Mask) and mask.shape[-2:] == image.shape[-2:] == (64, 64)
            assert set(mask.unique().tolist()) <= set(range(len(CLASSES))) | {255}  # 255: uncovered, not trained


def test_train_crop_cuts_aligned_tiles_and_evaluation_takes_the_whole_image(project):
    """options.train_crop: training samples are random tiles of the image at image_size, each mask cut with its
    image; evaluation keeps the whole image, and the network takes both sizes."""
    task = _task(project, **{"tasks.segmentation.options.train_crop": [32, 48]})
    rows = (np.arange(64) * 4).astype(np.uint8)[:, None].repeat(64, 1)  # row y holds 4 * y
    picture = Image.fromarray(np.stack([rows] * 3, -1))
    labels = tv_tensors.Mask(torch.from_numpy(np.arange(64) % 5)[:, None].expand(64, 64).clone())
    torch.manual_seed(0)
    tops = set()
    for _ in range(8):
        image, mask = task.train_transforms(None, None)(picture, labels)
        assert image.shape[-2:] == mask.shape[-2:] == (32, 48)
        y = (image[0, :, 0] * 255 / 4).round().long()  # each tile row's source row
        assert torch.equal(mask[:, 0], y % 5) and torch.equal(y, y[0] + torch.arange(32))
        tops.add(int(y[0]))
    assert len(tops) > 1  # a new tile each time
    whole = task.dataset("val", task.eval_transforms(None))[0][0]
    tile = task.dataset("train", task.train_transforms(None, None))[0][0]
    assert whole.shape[-2:] == (64, 64) and tile.shape[-2:] == (32, 48)
    model = task.build_model().eval()
    with torch.no_grad():
        assert model(whole[None]).shape[-2:] == (64, 64) and model(tile[None]).shape[-2:] == (32, 48)


def test_elastic_deformation_moves_the_mask_with_the_image(project):
    """augment.elastic: the pixels move (a smooth random field), each mask value with its image pixel."""
    task = _task(project)
    transforms = task.train_transforms(
        task.augment_schema().model_validate({"elastic": {"enabled": True, "p": 1.0, "alpha": 80.0, "sigma": 4.0}}),
        None,
    )
    stripes = (np.arange(64)[None, :].repeat(64, 0) // 8 % 2).astype(np.uint8)  # vertical stripes 8 px wide
    picture = Image.fromarray(np.stack([stripes * 200] * 3, -1))
    torch.manual_seed(0)
    image, mask = transforms(picture, tv_tensors.Mask(torch.from_numpy(stripes).clone()))
    labelled = mask != 255
    moved = (mask[labelled] != torch.from_numpy(stripes)[labelled]).float().mean()
    agree = ((image[0] > 0.5).long() == mask.long())[labelled].float().mean()
    assert moved > 0.05 and agree > 0.95, (float(moved), float(agree))  # displaced, and the pair displaced alike


def test_a_train_crop_larger_than_image_size_is_refused_naming_the_key(project):
    with pytest.raises(
        ConfigError, match=r"tasks\.segmentation\.options\.train_crop: \[96, 96\] is larger than image_size"
    ):
        _task(project, **{"tasks.segmentation.options.train_crop": 96})


@pytest.mark.parametrize(
    "augmentation",
    [
        {"rotation": {"enabled": True, "p": 1.0, "degrees": 45, "fill": 127}},
        {"rescale": {"enabled": True, "p": 1.0, "scale": [0.5, 0.6]}},
    ],
)
def test_pixels_a_rotation_or_zoom_out_uncovers_are_not_labelled_class_0(project, augmentation):
    """An EM slice's class 0 is membrane: uncovered corners and borders go to the ignore index, not to class 0."""
    from PIL import Image

    task = _task(project)
    transforms = task.train_transforms(task.augment_schema().model_validate(augmentation), None)
    torch.manual_seed(0)
    draws_uncovering = 0
    for _ in range(6):
        image, mask = transforms(
            Image.new("RGB", (64, 64), (200, 200, 200)), tv_tensors.Mask(torch.ones(64, 64, dtype=torch.uint8))
        )
        uncovered = mask == 255
        draws_uncovering += bool(uncovered.any())
        assert set(mask.unique().tolist()) <= {1, 255}  # never class 0
        assert bool((image[:, uncovered] < 0.6).all())  # the image's fill there, not the grey 200 of the picture
    assert draws_uncovering >= 4  # (a draw close to 0 degrees uncovers nothing)


@pytest.mark.parametrize("fill, expected", [("ignore", True), ("keep", False)])
def test_cutout_sets_the_erased_mask_to_ignore_or_keeps_it(project, fill, expected):
    task = _task(project)
    augment = task.settings.model_fields["augment"].annotation.model_validate(
        {"cutout": {"enabled": True, "p": 1.0, "scale": [0.2, 0.3], "mask_fill": fill}}
    )
    torch.manual_seed(0)
    image, mask = task.dataset("train", task.train_transforms(augment, None))[0]
    erased = (image == 0).all(0)
    assert erased.sum() > 0.15 * erased.numel()
    assert bool((mask[erased] == 255).all()) is expected


def _tagged_batch(n=6, size=32, classes=5):
    """Image k has every pixel equal to k; its mask is class k % classes with one ignored corner."""
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, size, size).clone()
    masks = (torch.arange(n) % classes)[:, None, None].expand(n, size, size).clone()
    masks[:, :2, :2] = 255
    return images, masks


def test_cutmix_pastes_pixels_and_labels_from_the_same_image():
    images, masks = _tagged_batch()
    torch.manual_seed(3)
    mixed, mixed_masks = SegmentationCutMix(1.0, 5, 255)(images, masks)
    source = mixed[:, 0].long()  # which image each pixel came from
    pasted = source != torch.arange(6)[:, None, None]
    assert pasted.any() and (~pasted).any()
    assert (
        source[pasted] == torch.arange(6).roll(1)[:, None, None].expand_as(source)[pasted]
    ).all()  # from the partner
    labelled = mixed_masks != 255
    assert torch.equal(mixed_masks[labelled], (source % 5)[labelled])  # label of the pixel's own image
    assert (mixed_masks[~labelled] == 255).all()
    assert (mixed[:, 1:] == mixed[:, :1]).all()  # all channels moved together


def test_mixup_gives_soft_targets_with_the_image_weights():
    images, masks = _tagged_batch()
    torch.manual_seed(5)
    mixed, soft = SegmentationMixUp(0.4, 5, 255)(images, masks)
    assert soft.shape == (6, 5, 32, 32) and soft.is_floating_point()
    lam = float(1 - (mixed[1, 0, 5, 5] - 1) / (0 - 1))  # image 1 mixed with image 0: value = lam*1 + (1-lam)*0
    expected = lam * soft_targets(masks, 5, 255) + (1 - lam) * soft_targets(masks, 5, 255).roll(1, 0)
    torch.testing.assert_close(soft, expected)
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))
    torch.testing.assert_close(soft[:, :, 5:, 5:].sum(1), torch.ones(6, 27, 27))
    assert (soft[:, :, :2, :2] == 0).all()  # ignored in both images: no target at all


def test_mixers_from_params(project):
    task = _task(project)
    assert task.batch_mixer(None) is None and task.batch_mixer(task.augment_schema()()) is None
    mixer = task.batch_mixer(task.augment_schema().model_validate({"mixup": {"enabled": True, "p": 1.0}}))
    images, masks = _tagged_batch()
    _, targets = mixer(images, masks)
    assert targets.shape == (6, 5, 32, 32)


# ------------------------------------------------------------ losses, models


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_accept_hard_and_soft_targets_alike(name):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    hard = torch.randint(0, 5, (2, 8, 8))
    hard[0, 0] = 255
    cfg = LossConfig(name=name, class_weights=[1, 2, 2, 2, 2])
    loss_hard = LOSSES[name](logits, hard, cfg)
    loss_soft = LOSSES[name](logits, soft_targets(hard, 5, 255), cfg)
    torch.testing.assert_close(loss_hard, loss_soft)
    loss_soft.backward()
    assert torch.isfinite(logits.grad).all()


def test_perfect_and_dummy_scores(project):
    task = _task(project)
    test = task.dataset("test", task.eval_transforms(None))

    class Oracle(torch.nn.Module):  # looks up the true masks: scores 1.0
        def forward(self, images):
            masks = torch.stack([test[i][1] for i in range(len(test))]).long()[: len(images)]
            return torch.nn.functional.one_hot(masks.clamp(max=4), 5).permute(0, 3, 1, 2).float()

    from tasks.training.engine import make_loader

    loader = make_loader(task, test, 64, False, 0)
    result = task.evaluate(Oracle(), loader, torch.device("cpu"))
    assert result.metrics["miou"] == 1.0 and result.metrics["pixel_accuracy"] == 1.0
    dummy = task.dummy_result(task.dataset("train", None), test)
    assert dummy.extra["most_frequent_class"] == "background"
    assert dummy.metrics["iou/background"] == dummy.metrics["pixel_accuracy"]
    others = [v for k, v in dummy.metrics.items() if k.startswith("iou/") and k != "iou/background"]
    assert others and not any(others)  # present classes get IoU 0, absent ones none
    assert dummy.metrics["miou"] == pytest.approx(dummy.metrics["iou/background"] / (1 + len(others)))


@pytest.mark.parametrize("name", ["unet", "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_models_build_offline_and_predict_full_size_masks(project, name):
    extra = {"tasks.segmentation.model.name": name}
    if name.startswith("deeplab"):
        extra["tasks.segmentation.model.options"] = {"aux_loss": True}
    task = _task(project, **extra)
    model = task.build_model()
    images, masks = torch.rand(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    loss = task.training_loss(model.train(), images, masks)
    assert torch.isfinite(loss)
    model.eval()
    from cv_models.segmentation import model_outputs

    assert model_outputs(model(images))[0].shape == (2, 5, 64, 64)


def test_unet_weights_from_a_file_refit_the_head(project, tmp_path):
    from cv_models.nets.unet import UNet

    source = UNet(num_classes=3, width=8, depth=2)
    torch.save({"model": source.state_dict()}, tmp_path / "w.pt")
    task = _task(
        project,
        **{
            "tasks.segmentation.model.weights": str(tmp_path / "w.pt"),
            "tasks.segmentation.model.freeze_backbone": True,
            "tasks.segmentation.model.width": 8,
            "tasks.segmentation.model.depth": 2,
        },
    )
    model = task.build_model()
    torch.testing.assert_close(model.encoder[0][0].weight, source.encoder[0][0].weight)
    assert model.head.out_channels == 5
    assert not model.encoder[0][0].weight.requires_grad and model.head.weight.requires_grad


def test_draw_overlays_hard_and_soft_masks(project):
    task = _task(project)
    image, mask = task.dataset("train", task.eval_transforms(None))[0]
    plain = task.draw(image, torch.zeros_like(mask))
    drawn = task.draw(image, mask)
    assert drawn.dtype == torch.uint8 and drawn.shape == plain.shape
    assert not torch.equal(drawn, plain)
    soft = task.draw(image, soft_targets(mask[None].long(), 5, 255)[0])
    assert soft.shape == plain.shape


def test_dihedral_tta_makes_the_prediction_follow_a_flip_of_the_image(project):
    """options.tta averages the probabilities over the image's flipped and transposed views, each mapped back: the
    network alone is not flip-equivariant, its dihedral average is (a view of a flipped image is a view of the image)."""
    from cv_models.segmentation.tta import tta_logits

    torch.manual_seed(0)
    model = _task(project, **{"tasks.segmentation.model.name": "unet"}).build_model().eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        plain, plain_flipped = tta_logits(model, x), tta_logits(model, x.flip(-1))
        avg, avg_flipped = tta_logits(model, x, "dihedral"), tta_logits(model, x.flip(-1), "dihedral")
        avg_t = tta_logits(model, x.transpose(-1, -2), "dihedral")
    assert not torch.allclose(plain_flipped, plain.flip(-1), atol=1e-4)
    assert torch.allclose(avg_flipped, avg.flip(-1), atol=1e-5)
    assert torch.allclose(avg_t, avg.transpose(-1, -2), atol=1e-5)
    assert torch.allclose(avg.exp().sum(1), torch.ones(1, 32, 32), atol=1e-5)  # log-probabilities
    task = _task(project, **{"tasks.segmentation.options.tta": "flips"})
    image = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    mask = task.predict_image(model, image, None, 0).mask
    mask_flipped = task.predict_image(model, image.transpose(Image.FLIP_LEFT_RIGHT), None, 0).mask
    assert (mask_flipped == mask[:, ::-1]).mean() > 0.99  # bilinear resizing aside, the same pixels
    with pytest.raises(ConfigError, match=r"tasks\.segmentation\.options\.tta"):
        _task(project, **{"tasks.segmentation.options.tta": "rotate"})
