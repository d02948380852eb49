"""Stage 3: know what to expect. The dummy solution's score, an overfit-one-batch sanity check,
then the plain model trained without augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.training import engine
from tasks.paths import atomic_dir, outputs
from tasks.stage import open_stage
from tasks.training.train import initial_weights, normalizer, summary_metrics, timings, train_model, write_metrics


def overfit_verdict(losses: list[float], c) -> tuple[bool, float, str]:
    """(passed, smoothed final loss, target in words). The final loss is the lowest of the last five
    steps (one noisy step neither passes nor fails the check); the target is relative to the first loss."""
    final = min(losses[-5:])
    target = c.max_loss_ratio * losses[0]
    words = f"{c.max_loss_ratio:g} x the first loss {losses[0]:.4f} = {target:.4f}"
    if c.max_loss is not None:
        words += f" (or overfit_check.max_loss={c.max_loss:g})"
    passed = final <= target or (c.max_loss is not None and final <= c.max_loss)
    return passed, final, words


def run_overfit_check(task, cfg, seed: int, norm, task_name: str, log=None) -> dict:
    """Overfit one training batch (seeded draw); raises OverfitCheckFailed when the loss does not fall
    to ``overfit_check.max_loss_ratio`` of its first value within ``overfit_check.steps``."""
    c = cfg.overfit_check
    engine.set_threads(cfg.train.num_threads)  # as training does (train.num_threads)
    data = task.dataset("train", task.eval_transforms(norm))
    batch = next(iter(engine.make_loader(task, data, min(c.batch_size, len(data)), True, seed)))
    model, _ = initial_weights(task, seed)  # the weights the baseline starts from (initial_model)
    losses = engine.overfit_one_batch(
        task,
        model,
        batch,
        c.steps,
        c.lr,
        engine.pick_device(cfg.train.device),
        done=lambda ls: len(ls) >= 5 and overfit_verdict(ls, c)[0],
    )
    if log is not None:
        every = max(len(losses) // 20, 1)
        for step in range(0, len(losses), every):
            log({"overfit_loss": losses[step]}, step)
    passed, final, target = overfit_verdict(losses, c)
    print(
        f"[baseline] overfit one batch of {len(batch[0])}: loss {losses[0]:.4f} -> {final:.4f} in {len(losses)} "
        f"of at most {c.steps} steps (target {target}): {'passed' if passed else 'FAILED'}"
    )
    if not passed:
        raise engine.OverfitCheckFailed(
            f"overfit-one-batch check failed for task '{task_name}': loss {losses[0]:.4f} -> {final:.4f} after "
            f"{len(losses)} steps on one batch, not below {target}. The model, loss or data pipeline "
            f"cannot fit even a single batch: check labels, normalisation and the learning rate (overfit_check.lr); "
            f"raise overfit_check.steps if the loss was still falling."
        )
    return {
        "first_loss": losses[0],
        "final_loss": final,
        "ratio": final / losses[0] if losses[0] else 0.0,
        "steps": len(losses),
    }


def overfit_check(st) -> float:
    """The stage's overfit check: losses logged to MLflow; the smoothed final loss returned."""
    result = run_overfit_check(
        st.task, st.cfg, st.params.seed, normalizer(st), st.task_name, log=lambda m, step: st.log_metrics(m, step=step)
    )
    st.log_metrics({"overfit_loss_ratio": result["ratio"]})
    return result["final_loss"]


def run(
    task_name: str,
    params_path: str | Path = "params.yaml",
    overrides: dict[str, Any] | None = None,
    pipeline_run_id: str | None = None,
) -> dict:
    with open_stage("baseline", task_name, params_path, overrides, pipeline_run_id) as st:
        out_dir = outputs(task_name, "baseline")
        norm = normalizer(st)
        dummy = st.task.dummy_result(
            st.task.dataset("train", None), st.task.dataset("val", st.task.eval_transforms(norm))
        )
        m = st.task.primary_metric
        print(f"[baseline] dummy solution: val {m} = {dummy.metrics[m]:.4f}")
        st.log_metrics({f"dummy_val_{k}": v for k, v in dummy.metrics.items()})
        overfit = overfit_check(st) if st.cfg.overfit_check.enabled else None
        with atomic_dir(out_dir) as tmp:  # all or nothing
            result, _ = train_model(st, augment=None, out_dir=tmp, keep_checkpoint=True)
            metrics = {**summary_metrics(st, result), f"dummy_val_{m}": dummy.metrics[m], "overfit_final_loss": overfit}
            write_metrics(tmp, metrics, timings(result))
        st.log_artifacts(out_dir, "baseline")
        st.log_pictures(out_dir)
        print(
            f"[baseline] best val {m} = {result.best_metrics[m]:.4f} (epoch {result.best_epoch}); dummy {dummy.metrics[m]:.4f}"
        )
        return metrics
