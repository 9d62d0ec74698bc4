"""The model zoo. Importing this package fills the registries (and checks that every name in
`mtl.zoo_names` got a constructor)."""

from mtl.models import context, decoders, encoders  # noqa: F401  (registration side effects)
from mtl.models.architectures import ARCH_DEFAULTS, TASKS, build_model, deep_supervised, resolve
from mtl.models.registry import ARCHITECTURES, CONTEXTS, DECODERS, ENCODERS

for _registry in (ENCODERS, CONTEXTS, DECODERS, ARCHITECTURES):
    _registry.check_complete()

__all__ = ["ARCHITECTURES", "ARCH_DEFAULTS", "CONTEXTS", "DECODERS", "ENCODERS", "TASKS", "build_model", "deep_supervised", "resolve"]
