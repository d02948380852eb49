import json

import numpy as np
import torch
from PIL import Image

from cv_models.normalize import Normalize, load_normalizer
from tasks import normstats


def test_streaming_stats_match_direct_computation(project):
    normstats.run("classification", project.params())
    stats = json.loads(open("outputs/classification/normstats/stats.json").read())
    files = sorted((project.classification / "train").rglob("*.png"))
    images = np.stack(
        [np.asarray(Image.open(f).convert("RGB").resize((32, 32), Image.BILINEAR)) / 255.0 for f in files]
    )
    assert stats["n_images"] == len(files)
    np.testing.assert_allclose(stats["per_channel_mean"], images.mean(axis=(0, 1, 2)), atol=3e-3)
    np.testing.assert_allclose(stats["per_channel_std"], images.std(axis=(0, 1, 2)), atol=3e-3)
    mean_image = np.load("outputs/classification/normstats/mean_image.npy")
    assert mean_image.shape == (32, 32, 3)
    np.testing.assert_allclose(mean_image, images.mean(axis=0), atol=1e-2)
    assert Image.open("outputs/classification/normstats/mean_image.png").size == (32, 32)


def test_the_three_normalisations(project):
    normstats.run("classification", project.params())
    x = torch.rand(3, 32, 32)
    from torchvision import tv_tensors

    img = tv_tensors.Image(x)
    for mode in ("mean_image", "per_channel_mean", "per_channel_std"):
        norm = load_normalizer("outputs/classification/normstats", mode)
        assert isinstance(norm, Normalize)
        out = norm(img)
        torch.testing.assert_close(norm.undo(out.as_subclass(torch.Tensor)), x, atol=1e-5, rtol=0)
    assert load_normalizer("outputs/classification/normstats", "none") is None
