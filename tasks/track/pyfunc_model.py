"""The MLflow model file of the pipeline's registered models (MLflow's "models from code": nothing is pickled).

tasks/track/registry.py logs this file as the pyfunc's ``python_model``; MLflow runs it when the model is loaded
(with the shipped ``tasks`` and ``cv_models`` on the path) and serves the model it sets: :class:`CVModel`,
whose ``load_context`` reads the bundle artifact (weights, settings, normalisation).
"""

import mlflow

from tasks.track.registry import CVModel

mlflow.models.set_model(CVModel())
