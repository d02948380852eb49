"""Using a trained model: loading it, predicting on new images, exporting and serving it."""
