"""streetmtl: multi-task (semantic segmentation + monocular depth) training for street scenes.

The core (`mtl.config`, `mtl.data`, `mtl.models`, `mtl.losses`, `mtl.metrics`, `mtl.engine`)
depends only on torch, torchvision, numpy, PIL, fsspec and webdataset. Ray and DeepSpeed are
imported by `mtl.distributed` alone.
"""

__version__ = "0.1.0"
