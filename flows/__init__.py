"""Prefect flows: one ``train-<task>`` flow per CV task, chaining the stages in ``tasks/``."""
