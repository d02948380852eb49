"""Image classification: ImageFolder data, small CNN or torchvision classifiers, accuracy and F1.

``settings`` (the options schemas), ``data`` (listing, dataset, transforms, batch mixer), ``validation`` (tables,
checks, notes), ``report`` (scores, captions, the evaluate stage's files) and ``task`` (:class:`ClassificationTask`,
registered when this package is imported)."""

from cv_models.classification.data import ImageFolderDataset, PilResize, PlainTransform
from cv_models.classification.settings import (
    DUPLICATE_POLICIES,
    REQUIRED_SPLITS,
    SETTINGS,
    ClassificationDataOptions,
    ClassificationModelOptions,
)
from cv_models.classification.task import ClassificationTask

__all__ = [
    "DUPLICATE_POLICIES",
    "REQUIRED_SPLITS",
    "SETTINGS",
    "ClassificationDataOptions",
    "ClassificationModelOptions",
    "ClassificationTask",
    "ImageFolderDataset",
    "PilResize",
    "PlainTransform",
]
