"""The data version the validate stage records: a digest per split that follows file contents and labels."""

from __future__ import annotations

import pandas as pd

from tasks.track.data_version import ALL, digest_tables


def _tables(tmp_path, pixels: bytes, label: str = "a") -> dict[str, pd.DataFrame]:
    train, val = tmp_path / "train.png", tmp_path / "val.png"
    train.write_bytes(pixels)
    val.write_bytes(b"val")
    images = pd.DataFrame({"path": [str(train), str(val)], "split": ["train", "val"], "label": [label, "a"]})
    return {"images": images}


def test_digest_follows_content_and_labels_per_split(tmp_path):
    base = digest_tables(_tables(tmp_path, b"one"))
    assert base["train"]["n_samples"] == 1 and base[ALL]["n_samples"] == 2
    changed = digest_tables(_tables(tmp_path, b"two"))  # same path, other bytes: a table without sha256
    assert changed["train"]["digest"] != base["train"]["digest"]
    assert changed[ALL]["digest"] != base[ALL]["digest"]
    assert changed["val"]["digest"] == base["val"]["digest"]  # the val split did not change
    relabelled = digest_tables(_tables(tmp_path, b"one", label="b"))
    assert relabelled["train"]["digest"] != base["train"]["digest"]
    assert digest_tables(_tables(tmp_path, b"one")) == base  # deterministic
