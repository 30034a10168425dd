"""The values each choice-valued config key may take, in one place. The config check
reads them here; the module that implements a choice imports its list from here, and
tests/test_config_errors.py checks that every value is implemented."""

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
