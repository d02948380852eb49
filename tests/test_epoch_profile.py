"""benchmarks/epoch_profile.py: the parts of a pipeline epoch add up to the epoch, and the ratio to the plain loop
is printed (issue 33)."""

from __future__ import annotations

import re

from tests.conftest import tiny_task


def test_short_profile_parts_sum_to_the_epoch(project, capsys):
    from benchmarks import epoch_profile
    from tasks.training import checkpointing, engine

    make_loader, save_last = engine.make_loader, checkpointing.save_last
    params = project.params(**tiny_task("classification"))
    [r] = epoch_profile.main(["--params", str(params), "--short", "--task", "classification", "--images", "16"])
    out = capsys.readouterr().out

    assert r["epochs_measured"] == 2  # --short: three epochs, the first left out
    assert abs(sum(r["seconds"].values()) - r["epoch"]) < 1e-9
    assert abs(sum(r["shares"].values()) - 1) < 1e-9
    # every part the pipeline pays for was timed (a renamed hook in tasks/training/engine.py or tasks/training/checkpointing.py would
    # leave one at zero)
    for part in ("data", "step", "validation", "checkpoint", "logging"):
        assert r["seconds"][part] > 0, part
    assert r["seconds"]["other"] > -0.01 * r["epoch"]  # what the timed parts leave is not negative
    assert r["ratio_epoch"] == r["epoch"] / r["plain_epoch"] and r["ratio_epoch"] > r["ratio_train_pass"] > 0
    ratio = re.search(
        r"ratio pipeline epoch / plain loop = (\d+\.\d{3}); "
        r"training pass / plain loop = (\d+\.\d{3})",
        out,
    )
    assert ratio and float(ratio.group(1)) == round(r["ratio_epoch"], 3)
    assert re.search(r"checkpoint +\d+\.\d{3} +\d+\.\d%", out)
    # the benchmark put tasks.training.engine and tasks.training.checkpointing back as it found them
    assert engine.make_loader is make_loader and checkpointing.save_last is save_last
