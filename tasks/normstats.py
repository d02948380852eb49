"""Stage 2: normalisation statistics from the training split only, in one streaming pass:
the mean image, the per-channel mean and the per-channel std."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cv_models.normalize import RunningStats
from tasks.paths import atomic_dir, outputs
from tasks.stage import open_stage


def _image_of(sample) -> torch.Tensor:
    image = sample[0] if isinstance(sample, (tuple, list)) else sample
    return image.as_subclass(torch.Tensor) if isinstance(image, torch.Tensor) else torch.as_tensor(image)


def run(
    task_name: str,
    params_path: str | Path = "params.yaml",
    overrides: dict[str, Any] | None = None,
    pipeline_run_id: str | None = None,
) -> dict:
    with open_stage("normstats", task_name, params_path, overrides, pipeline_run_id) as st:
        size = st.cfg.image_hw
        train = st.task.dataset("train", st.task.eval_transforms(normalize=None))
        stats = RunningStats()
        for i in range(len(train)):  # one image in memory at a time
            image = _image_of(train[i]).float()
            if tuple(image.shape[-2:]) != size:
                image = torch.nn.functional.interpolate(
                    image[None], size=size, mode="bilinear", antialias=True, align_corners=False
                )[0]
            stats.update(image)
        result = stats.result()
        mean_image = result.pop("mean_image").permute(1, 2, 0).numpy()  # HxWxC
        summary = {
            **result,
            "image_size": st.cfg.image_size,
            "normalization_used": st.cfg.normalization,
            "mean_image_file": "mean_image.npy",
        }
        out_dir = outputs(task_name, "normstats")
        with atomic_dir(out_dir) as tmp:
            (tmp / "stats.json").write_text(json.dumps(summary, indent=2) + "\n")
            np.save(tmp / "mean_image.npy", mean_image.astype(np.float32))
            Image.fromarray((mean_image.clip(0, 1) * 255).round().astype(np.uint8)).save(tmp / "mean_image.png")
        st.log_artifacts(out_dir, "normstats")
        st.log_inputs("train")
        st.log_pictures(out_dir)
        st.log_metrics(
            {f"mean.{c}": v for c, v in zip("rgb", result["per_channel_mean"])}
            | {f"std.{c}": v for c, v in zip("rgb", result["per_channel_std"])}
        )
        print(
            f"[normstats] {task_name}: {result['n_images']} train images, mean={np.round(result['per_channel_mean'], 4).tolist()} "
            f"std={np.round(result['per_channel_std'], 4).tolist()}"
        )
        return summary
