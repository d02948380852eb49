"""Classification's scores and report: accuracy, per-class F1 and the confusion matrix, the captions of the
preview pictures, and the evaluate stage's per-image predictions, confusion matrices and how to rescore them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cv_models.base import EvalResult, never_predicted

RECOMPUTE = (
    "# Rescoring the test predictions\n\n`predictions_<model>.csv`: one row per test image (file, true class, "
    "predicted class, each class's probability). With scikit-learn:\n\n```python\nimport pandas as pd\n"
    "from sklearn.metrics import accuracy_score, f1_score\n\ndf = pd.read_csv('predictions_augmented.csv')\n"
    "print('accuracy', accuracy_score(df.true_class, df.predicted_class))\n"
    "print('macro_f1', f1_score(df.true_class, df.predicted_class, labels={names!r}, average='macro', "
    "zero_division=0))\n```\n\nThe macro F1 averages over every declared class (one absent from both columns "
    "counts 0), as metrics.json does.\n"
)


def score(names: list[str], y_true: np.ndarray, y_pred: np.ndarray) -> EvalResult:
    """Accuracy, per-class precision / recall / F1 and the confusion matrix (rows: true class).

    Computed from the confusion matrix directly: it runs every epoch on the validation split,
    where a general-purpose metrics library's input checks cost more than the arithmetic."""
    n = len(names)
    cm = np.bincount(y_true.astype(np.int64) * n + y_pred.astype(np.int64), minlength=n * n).reshape(n, n)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        r = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)
    per_class = pd.DataFrame({"class": names, "precision": p, "recall": r, "f1": f, "support": support})
    metrics = {
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_f1": float(f.mean()),
        "predicted_classes": int((predicted > 0).sum()),  # 1: the model has collapsed to one class
        **{f"f1/{c}": float(v) for c, v in zip(names, f)},
        **never_predicted(names, support.tolist(), predicted.tolist()),
    }
    return EvalResult(
        metrics,
        predictions={"y_true": y_true, "y_pred": y_pred},
        per_class=per_class,
        extra={"confusion_matrix": cm},
    )


def label_text(names: list[str], target) -> str:
    """A preview's caption: the class, or the two heaviest classes of a soft label after MixUp / CutMix."""
    if isinstance(target, torch.Tensor) and target.ndim == 1:
        top = target.topk(min(2, len(names)))
        return " + ".join(f"{names[i]} {w:.2f}" for w, i in zip(top.values.tolist(), top.indices.tolist()) if w > 0.01)
    return names[int(target)]


def write_report(names: list[str], results: dict[str, EvalResult], test, out_dir: Path) -> list[Path]:
    """Confusion matrices, and a CSV per model of every test image's true class, predicted class and class
    probabilities (the dummy: probability 1 for its one class), with how to rescore them."""
    files = [prediction_table(names, name, res, test, out_dir) for name, res in results.items()]
    (out_dir / "RECOMPUTE.md").write_text(RECOMPUTE.format(names=names))
    files.append(out_dir / "RECOMPUTE.md")
    return files + confusion_pictures(names, results, out_dir)


def prediction_table(names: list[str], model_name: str, res: EvalResult, test, out_dir: Path) -> Path:
    y_true, y_pred = res.predictions["y_true"], res.predictions["y_pred"]
    probs = res.predictions.get("probs", np.eye(len(names))[y_pred])
    table = pd.DataFrame(
        {
            "file": [s["path"] for s in test.samples],
            "true_class": [names[k] for k in y_true],
            "predicted_class": [names[k] for k in y_pred],
        }
    )
    table[[f"prob_{c}" for c in names]] = np.round(probs, 6)
    path = out_dir / f"predictions_{model_name}.csv"
    table.to_csv(path, index=False)
    return path


def confusion_pictures(names: list[str], results: dict[str, EvalResult], out_dir: Path) -> list[Path]:
    from cv_models.visualise import confusion_matrix_figure

    files = []
    for model_name, res in results.items():
        if "confusion_matrix" in res.extra:
            path = out_dir / f"confusion_matrix_{model_name}.png"
            confusion_matrix_figure(res.extra["confusion_matrix"], names, f"{model_name}: test", path)
            files.append(path)
    return files
