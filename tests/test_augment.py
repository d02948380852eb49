import torch
from torchvision import tv_tensors

from cv_models import get_task
from tasks.config import AugmentConfig, load_params

ALL_ON = {
    name: {"enabled": True, "p": 1.0}
    for name in ("hflip", "vflip", "rotation", "crop", "rescale", "color", "noise", "blur", "cutout", "mixup", "cutmix")
}


def _task(project):
    cfg = load_params(project.params()).task("classification")
    return get_task("classification", cfg)


def test_every_augmentation_builds_and_keeps_the_shape(project):
    task = _task(project)
    augment = AugmentConfig.model_validate(ALL_ON)
    transforms = task.train_transforms(augment, None)
    image, label = task.dataset("train", transforms)[0]
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int)


def test_augmentations_change_pixels_but_baseline_does_not(project):
    """The baseline pipeline gives the same pixels whatever the random state; the augmented one does not."""
    task = _task(project)
    torch.manual_seed(0)
    plain_a = task.dataset("train", task.train_transforms(None, None))[0][0]
    torch.manual_seed(123)
    torch.rand(1000)
    plain_b = task.dataset("train", task.train_transforms(None, None))[0][0]
    assert torch.equal(plain_a, plain_b)
    augmented = task.dataset("train", task.train_transforms(AugmentConfig.model_validate(ALL_ON), None))
    torch.manual_seed(0)
    first = augmented[0][0]
    torch.manual_seed(1)
    second = augmented[0][0]
    assert not torch.equal(first, plain_a) and not torch.equal(first, second)


def test_each_augmentation_alone_changes_the_image(project):
    """Every per-sample augmentation switched on alone (p=1) does something: none is skipped silently."""
    from cv_models.augment import BATCH

    task = _task(project)
    plain = task.dataset("train", task.train_transforms(None, None))[0][0]
    for name, aug in task.augmentations.items():
        if aug.phase == BATCH:
            continue
        torch.manual_seed(3)
        augment = AugmentConfig.model_validate({name: {"enabled": True, "p": 1.0}})
        image = task.dataset("train", task.train_transforms(augment, None))[0][0]
        assert not torch.equal(image, plain), name


def test_every_task_registers_exactly_its_schema_augmentations():
    """A Switch in a task's augment schema without a registry entry (or the reverse) is refused at registration."""
    import pytest

    from cv_models import TASKS
    from cv_models.base import register_task
    from cv_models.settings import Switch, task_settings

    for cls in TASKS.values():
        assert sorted(cls.augment_schema().switch_names()) == sorted(cls.augmentations)
    assert "mosaic" in TASKS["detection"].augmentations and "copy_paste" in TASKS["instance_segmentation"].augmentations

    class WithTeleport(AugmentConfig):
        teleport: Switch = Switch()

    class Forgetful(TASKS["classification"]):
        name = "forgetful"
        settings = task_settings("Forgetful", augment=WithTeleport)

    with pytest.raises(TypeError, match=r"forgetful.*teleport"):
        register_task(Forgetful)
    assert "forgetful" not in TASKS


def test_mixup_cutmix_give_soft_labels_that_sum_to_one(project):
    task = _task(project)
    mixer = task.batch_mixer(
        AugmentConfig.model_validate({"mixup": {"enabled": True, "p": 1.0}, "cutmix": {"enabled": True, "p": 1.0}})
    )
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(8) % 4
    torch.manual_seed(1)
    mixed, soft = mixer(images, labels)
    assert mixed.shape == images.shape and soft.shape == (8, 4)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    assert (soft.max(1).values < 1).any()
    assert task.batch_mixer(None) is None


def test_disabled_mixers_give_no_mixer(project):
    assert _task(project).batch_mixer(AugmentConfig()) is None


def test_cutout_samples_the_same_rectangle_in_every_task():
    """One cutout behaviour: detection and instance segmentation erase the rectangle RandomErasing would."""
    from torchvision.transforms import v2

    from cv_models.detection import BoxCutout
    from cv_models.instance_segmentation import InstanceCutout

    image = tv_tensors.Image(torch.ones(3, 40, 60))
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[0.0, 0.0, 5.0, 5.0]]), format="XYXY", canvas_size=(40, 60))
    masks = tv_tensors.Mask(torch.ones(1, 40, 60, dtype=torch.uint8))
    erased = []
    for seed in range(5):
        torch.manual_seed(seed)
        det, _ = BoxCutout(1.0, (0.05, 0.3), 0.3)(image, {"boxes": boxes, "labels": torch.tensor([1])})
        torch.manual_seed(seed)
        inst, _ = InstanceCutout(1.0, (0.05, 0.3))(image, {"masks": masks})
        torch.manual_seed(seed)
        ref = v2.RandomErasing(p=1.0, scale=(0.05, 0.3), ratio=(0.3, 3.3), value=0)(image)
        assert torch.equal(det[0] != 1, inst[0] != 1)
        assert torch.equal(inst[0] != 1, ref[0] != 1)
        erased.append(int((inst[0] != 1).sum()))
    assert len(set(erased)) > 1  # the rectangle is random
