"""The segmentation task's settings (``tasks.segmentation`` in params.yaml): its ``data.options``, ``model.options``,
augment section and ``options``, and :data:`SETTINGS`, the task's whole schema."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import Field, model_validator

from cv_models.settings import (
    AugmentConfig,
    ConfigError,
    CutoutAug,
    ImageSize,
    Strict,
    Switch,
    size_hw,
    task_settings,
)


class SegmentationDataOptions(Strict):
    """``data.options``: where the masks are and how their pixel values become classes."""

    # folders under data.path; a "{split}" in them is replaced by the split's name on disk (data.options.splits),
    # e.g. SegNet "{split}" + "{split}annot", ADE20K "images/{split}" + "annotations/{split}"; without "{split}"
    # the split folders are <dir>/train, val, test (split_from=folders) or none (split_from=seed)
    images_dir: str = "images"  # under data.path
    masks_dir: str = "masks"  # same sub-folders (or {split} template) and file stems as images_dir
    splits: dict[str, str] | None = (
        None  # split -> name on disk, e.g. {train: training, val: validation, test: testing}
    )
    split_list: str | None = None  # a list of image stems per split, e.g. VOC "ImageSets/Segmentation/{split}.txt"
    image_suffix: str = ".jpg"  # split_list: the images' suffix (others are tried when absent)
    value_map: dict[int, int] | None = (
        None  # raw mask value -> class index, e.g. {255: 1} for 0/255 binary masks (applied first)
    )
    ignore_values: list[
        int
    ] = []  # mask values that mean unlabelled (SegNet/CamVid 11, ADE20K 0): read as train.loss.ignore_index
    palette_as_index: bool = (
        False  # palette (mode P) masks hold class indices (Pascal VOC): read the indices, not colours
    )
    mask_suffix: str = ".png"  # mask file = image stem + this
    annotations: str = "annotations/{split}.json"  # format coco: one file per split, or one file for split_from=seed
    mask_color_mode: Literal["convert", "reject"] = "convert"  # palette / RGB masks: convert through `colors` | reject
    colors: list[tuple[int, int, int]] | None = None  # one [r, g, b] per class, for palette/RGB masks and pictures
    ignore_color: tuple[int, int, int] | None = None  # [r, g, b] of unlabelled pixels in palette/RGB masks


class SegmentationModelOptions(Strict):
    """``model.options``: torchvision segmentation models only (the U-Net takes width, depth and dropout; the
    timm_unet its encoder, width and dropout)."""

    aux_loss: bool = False  # fcn / deeplabv3: the auxiliary head, weighted 0.5 in the loss
    weights_backbone: str | None = (
        None  # torchvision ImageNet backbone weights (DEFAULT, IMAGENET1K_V1...); None = no download
    )
    backbone_weights: str = (
        "none"  # or the trunk of a classifier checkpoint of the same family (models/pretrain/backbone.pt)
    )
    kwargs: dict[str, Any] = {}  # extra keyword arguments of the torchvision builder
    encoder: str = "timm:efficientnet_lite0"  # timm_unet / timm_fpn / timm_deeplab: the pretrained encoder


class SegmentationCutoutAug(CutoutAug):
    mask_fill: Literal["ignore", "keep"] = "ignore"  # what the erased region's mask becomes: not trained on | kept


class ElasticAug(Switch):
    """torchvision's ElasticTransform: every pixel displaced by a random field, ``alpha`` its strength in pixels and
    ``sigma`` the Gaussian smoothing of it (the U-Net paper's augmentation for few EM slices)."""

    alpha: float = Field(50.0, gt=0, le=1000)
    sigma: float = Field(5.0, gt=0, le=100)


class SegmentationAugment(AugmentConfig):
    cutout: SegmentationCutoutAug = SegmentationCutoutAug()
    elastic: ElasticAug = ElasticAug()


class SegmentationOptions(Strict):
    overlay_samples: int = Field(8, ge=0)  # test images drawn with true and predicted masks
    # train on random crops of this size cut from the image at image_size (U-Net's own tiles): the network sees the
    # image's full resolution at the cost of a smaller input; validation and prediction take the whole image
    train_crop: ImageSize | None = None
    # test-time augmentation of the evaluate stage and of predictions (not of validation during training): the class
    # probabilities averaged over the image flipped left-right (hflip: 2 views), also upside down (flips: 4), also
    # transposed (dihedral: 8; for data with no up or left, such as microscopy)
    tta: Literal["none", "hflip", "flips", "dihedral"] = "none"


_Settings = task_settings(
    "Segmentation",
    data_options=SegmentationDataOptions,
    model_options=SegmentationModelOptions,
    augment=SegmentationAugment,
    options=SegmentationOptions,
)


class SegmentationSettings(_Settings):  # type: ignore[misc,valid-type]
    @model_validator(mode="after")
    def _train_crop_fits(self) -> Self:
        if self.options.train_crop is None:
            return self
        (h, w), (big_h, big_w) = size_hw(self.options.train_crop), self.image_hw
        if h > big_h or w > big_w:
            raise ConfigError(
                f"tasks.segmentation.options.train_crop: {[h, w]} is larger than image_size {[big_h, big_w]} "
                "(the crops are cut from the image at image_size)"
            )
        return self


SETTINGS = SegmentationSettings
