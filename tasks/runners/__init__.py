"""Experiment runners: ablation, hyperparameter search and their settings."""
