import torch
from torchvision import tv_tensors

from cv_models import get_task
from tasks.config import AugmentConfig, load_params
from tests.conftest import REPO, tiny_overrides

ALL_ON = {name: {"enabled": True, "p": 1.0} for name in
          ("hflip", "vflip", "rotation", "crop", "rescale", "color", "noise", "blur", "cutout", "mixup", "cutmix")}


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
    task = _task(project)
    plain = task.dataset("train", task.train_transforms(None, None))
    torch.manual_seed(0)
    augmented = task.dataset("train", task.train_transforms(AugmentConfig.model_validate(ALL_ON), None))
    assert torch.equal(plain[0][0], plain[0][0])
    assert not torch.equal(plain[0][0], augmented[0][0])


def test_mixup_cutmix_give_soft_labels_that_sum_to_one(project):
    task = _task(project)
    mixer = task.batch_mixer(AugmentConfig.model_validate({"mixup": {"enabled": True, "p": 1.0},
                                                          "cutmix": {"enabled": True, "p": 1.0}}))
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(8) % 4
    torch.manual_seed(1)
    mixed, soft = mixer(images, labels)
    assert mixed.shape == images.shape and soft.shape == (8, 4)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    assert (soft.max(1).values < 1).any()
    assert task.batch_mixer(None) is None


def test_disabled_mixers_give_no_mixer(project):
    assert _task(project).batch_mixer(AugmentConfig()) is None
