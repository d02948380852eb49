"""Stage 3: know what to expect. The dummy solution's score, an overfit-one-batch sanity check,
then the plain model trained without augmentation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks import engine
from tasks.paths import atomic_dir, outputs
from tasks.stage import open_stage
from tasks.train import drop_checkpoint, initial_model, normalizer, summary_metrics, timings, train_model, write_metrics


def overfit_check(st) -> float:
    """Drive the loss on one small batch close to zero, or fail with a clear message."""
    c = st.cfg.overfit_check
    engine.set_threads(st.cfg.train.num_threads)  # as training does (train.num_threads)
    norm = normalizer(st)
    data = st.task.dataset("train", st.task.eval_transforms(norm))
    batch = next(iter(engine.make_loader(st.task, data, min(c.batch_size, len(data)), True, st.params.seed)))
    model, _ = initial_model(st)  # the weights the baseline starts from
    losses = engine.overfit_one_batch(st.task, model, batch, c.steps, c.lr,
                                      engine.pick_device(st.cfg.train.device))
    for step, loss in enumerate(losses[:: max(len(losses) // 20, 1)]):
        st.log_metrics({"overfit_loss": loss}, step=step * max(len(losses) // 20, 1))
    final = min(losses[-5:])
    print(f"[baseline] overfit one batch of {c.batch_size}: loss {losses[0]:.4f} -> {final:.4f} in {c.steps} steps")
    if final > c.max_loss:
        raise engine.OverfitCheckFailed(
            f"overfit-one-batch check failed for task '{st.task_name}': loss {losses[0]:.4f} -> {final:.4f} after "
            f"{c.steps} steps on one batch, above overfit_check.max_loss={c.max_loss}. The model, loss or data pipeline "
            f"cannot fit even a single batch: check labels, normalisation and the learning rate (overfit_check.lr)."
        )
    return final


def run(task_name: str, params_path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None,
        pipeline_run_id: str | None = None) -> dict:
    with open_stage("baseline", task_name, params_path, overrides, pipeline_run_id) as st:
        out_dir = outputs(task_name, "baseline")
        norm = normalizer(st)
        dummy = st.task.dummy_result(st.task.dataset("train", None), st.task.dataset("val", st.task.eval_transforms(norm)))
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
        print(f"[baseline] best val {m} = {result.best_metrics[m]:.4f} (epoch {result.best_epoch}); dummy {dummy.metrics[m]:.4f}")
        drop_checkpoint(st)  # only now, at the very end: a kill before this resumes instead of training again
        return metrics
