"""Registry of the networks written in this project (torchvision's come by name through get_model)."""

from __future__ import annotations

from cv_models.nets import small_cnn, unet  # noqa: F401  (register)
from cv_models.nets.registry import NETS, register_net  # noqa: F401  (the registry's public names)
