"""The names of the model zoo's parts: the one list of them.

`mtl.config` types its model fields with these (so the command line lists them as choices and
`ExperimentConfig.validate` checks them), and the registries in `mtl.models` accept only these
names and must give each one a constructor (`mtl.models` checks that on import). The list lives
here, in a module that imports nothing, because `mtl.models` imports `mtl.config`: the config
cannot ask the registries without an import cycle. Adding a part = a name here + its
``@register`` in `mtl.models`.
"""

from __future__ import annotations

from typing import Literal

Arch = Literal["deeplabv3p", "branched", "distillation", "branched_vortex"]
Encoder = Literal["resnet18", "resnet34", "resnet50"]
Context = Literal["aspp", "vortex", "none"]  # the module between encoder and decoder; none = a 1x1 projection
Decoder = Literal["skip", "double_skip", "none"]  # none = the course skeleton's placeholder: upsampling, no skip
