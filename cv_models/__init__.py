"""Task-specific code: one module per CV task behind the interface in :mod:`cv_models.base`."""
from cv_models.base import TASKS, CVTask, DataError, get_task, register_task

# importing a task module registers it
from cv_models import classification  # noqa: E402,F401
from cv_models import segmentation  # noqa: E402,F401
from cv_models import detection  # noqa: E402,F401
from cv_models import instance_segmentation  # noqa: E402,F401

__all__ = ["TASKS", "CVTask", "DataError", "get_task", "register_task"]
