"""dmt: distillation with multiple frozen self-supervised teachers (arXiv 2312.11938)."""
import sys
import types
import warnings

import torch

# The registry's torchvision wheel is a CUDA build; with a CPU torch its compiled
# meta-registrations fail to load and `import torchvision` (hence timm) breaks.
# Stubbing that one module keeps everything dmt needs from torchvision working.
if torch.version.cuda is None:
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))

# DeepSpeed 0.19 calls an API that torch 2.13 deprecates: a warning on every rank, every
# run, about code users cannot change.
warnings.filterwarnings("ignore", category=FutureWarning,
                        message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated")

from dmt.errors import CheckpointError, ConfigError, DataError, DMTError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["DMTError", "ConfigError", "CheckpointError", "DataError", "__version__"]
