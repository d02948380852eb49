"""What a trained model's figures say beside the metric itself: a silent failure (no better than the dummy
solution, collapsed to one class, never predicting some) and overfitting (from the per-epoch history)."""

from __future__ import annotations

import pandas as pd


class SilentFailureWarning(UserWarning):
    """A trained model no better than the dummy solution, collapsed to one class, or never predicting some."""


DUMMY_MARGIN = 0.01  # a metric within this of the dummy's has learnt nothing the class frequencies do not give


def silent_failure_warnings(metrics: dict, dummy: dict, primary: str, n_classes: int, where: str) -> list[str]:
    """Lines saying a model is no better than the dummy solution, predicts a single class, or never predicts some
    classes present in the data (``never_predicted/<class>`` metrics; empty: healthy). A collapsed model otherwise
    passes every stage quietly, its metric looking like a number."""
    out = []
    if primary in metrics and primary in dummy and metrics[primary] <= dummy[primary] + DUMMY_MARGIN:
        out.append(
            f"{where}: {primary} {metrics[primary]:.4f} is at the dummy solution's level ({dummy[primary]:.4f}): "
            f"the model has learnt nothing beyond the class frequencies (check the learning rate, the epochs, "
            f"class balance and the labels)"
        )
    missed = [k.split("/", 1)[1] for k in metrics if k.startswith("never_predicted/")]
    if n_classes > 1 and metrics.get("predicted_classes") == 1:
        out.append(
            f"{where}: the model predicts a single class for everything (collapsed; try class weights or a "
            f"Dice-based loss for rare classes, a lower learning rate, more epochs)"
        )
    elif missed:
        out.append(
            f"{where}: {len(missed)} of {n_classes} classes present in the data are never predicted: "
            f"{', '.join(missed)} (half-collapsed; try class weights or a Dice-based loss for rare classes, "
            f"more epochs)"
        )
    return out


def diagnose_overfitting(
    history: pd.DataFrame, metric: str, min_gap_growth: float = 0.02, min_flat_epochs: int = 2
) -> str | None:
    """A sentence when the model overfits: the validation metric stopped improving while the gap
    between train and validation kept growing. Names the epoch where it started; None otherwise. ``min_flat_epochs``
    counts validated epochs."""
    train_col, val_col = f"train_{metric}", f"val_{metric}"
    if train_col not in history or val_col not in history:
        return None
    history = history.dropna(subset=[val_col]).reset_index(drop=True)  # validated epochs only (train.val_every)
    if len(history) < min_flat_epochs + 1:
        return None
    best_idx = int(history[val_col].values.argmax())
    if len(history) - 1 - best_idx < min_flat_epochs:
        return None
    gap = (history[train_col] - history[val_col]).values
    growth = gap[best_idx + 1 :].max() - gap[best_idx]
    if growth < min_gap_growth:
        return None
    start = int(history["epoch"].iloc[best_idx + 1])
    return (
        f"overfitting from epoch {start}: val {metric} peaked at {history[val_col].iloc[best_idx]:.4f} in epoch "
        f"{int(history['epoch'].iloc[best_idx])} and did not improve afterwards, while the train-val gap grew from "
        f"{gap[best_idx]:.4f} to {gap[best_idx + 1 :].max():.4f}"
    )


NO_OVERFITTING = "no sign of overfitting (val metric still improving or gap not growing)"


def overfitting_verdict(history: pd.DataFrame, metric: str, min_flat_epochs: int = 2) -> str:
    """The evaluation report's line on overfitting: :func:`diagnose_overfitting`'s sentence, no sign of it, or that
    it cannot tell, and why (no train metric, too few validated epochs)."""
    if f"train_{metric}" not in history:
        return (
            "cannot tell: no train metric to compare with validation (train.track_train_metric: false; set it to "
            "true to score a training subset each epoch)"
        )
    validated = int(history[f"val_{metric}"].notna().sum()) if f"val_{metric}" in history else 0
    if validated < min_flat_epochs + 1:
        return f"cannot tell: {validated} validated epoch(s), the diagnosis needs at least {min_flat_epochs + 1}"
    return diagnose_overfitting(history, metric, min_flat_epochs=min_flat_epochs) or NO_OVERFITTING
