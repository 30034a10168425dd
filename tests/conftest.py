import os

# Keep CPU tests predictable on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import dmt  # noqa: E402,F401  (applies the torchvision-on-CPU-torch fix before timm loads)
