"""MLflow tracking: per-stage runs, the UI's view, the data version and the Model Registry."""
