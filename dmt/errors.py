"""One exception family, so users can tell dmt's own diagnostics from crashes."""


class DMTError(Exception):
    """Base class of every error dmt raises on purpose."""


class ConfigError(DMTError):
    """The experiment configuration is invalid (typo, wrong type, bad arithmetic)."""


class CheckpointError(DMTError):
    """A checkpoint is missing or does not fit the model it is loaded into."""


class DataError(DMTError):
    """The data source is missing, empty or unusable."""
