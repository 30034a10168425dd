"""The values each choice-valued config key may take, in one place: the config check
reads them here. Plain lists (fusions, distances, adapters, placements...) are imported
from here by the module that implements them; registries keyed by name (data backends,
checkpoint kinds, methods, dtypes) are checked against these lists, and every value is
run once, by tests/test_config_errors.py::test_every_config_choice_is_implemented.

Adding a value: its name here, its implementation (a branch or a registry entry), and a
reference for it in that test. A teacher kind also needs a reader in
dmt.models.checkpoints.CHECKPOINT_FORMATS, its input statistics in FORMAT_NORMALIZATION,
and its file layout in likely_kinds.
"""

TEACHER_KINDS = ("mae", "mocov3", "ibot", "dino", "timm", "random")
ADAPTERS = ("linear", "identity", "mlp")
DTYPES = ("bfloat16", "float16", "float32")
PLACEMENTS = ("colocated", "dedicated")
STACK = ("auto", "always", "never")
METHODS = ("dmt",)
DISTANCES = ("kl", "mse")
DIRECTIONS = ("student_teacher", "teacher_student")
FUSIONS = ("sum", "mean", "weighted")
LOSS_TERMS = ("tfd", "sfd")
# torch.compile's modes (torch._inductor.list_mode_options(), "lite" aside), named here so
# a typo is caught with the rest of the config, not after the teachers are built.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# What data.path names for each backend: an image folder, a .beton file, or a sample count.
DATA_PATH = {"torch": "folder", "dali": "folder", "ffcv": "file", "synthetic": "count"}
BACKENDS = tuple(DATA_PATH)


def loads_checkpoint(teacher: dict) -> bool:
    """Whether a teachers[i] entry reads a checkpoint file (kind random builds its own)."""
    return teacher["kind"] != "random"
