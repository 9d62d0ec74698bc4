"""The model zoo. Importing this package fills the registries."""

from mtl.models import context, decoders, encoders  # noqa: F401  (registration side effects)
from mtl.models.architectures import ARCH_DEFAULTS, TASKS, build_model, resolve
from mtl.models.registry import ARCHITECTURES, CONTEXTS, DECODERS, ENCODERS

__all__ = ["ARCHITECTURES", "ARCH_DEFAULTS", "CONTEXTS", "DECODERS", "ENCODERS", "TASKS", "build_model", "resolve"]
