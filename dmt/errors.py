"""One exception family, so users can tell dmt's own diagnostics from crashes."""
import shutil
from pathlib import Path


class DMTError(Exception):
    """Base class of every error dmt raises on purpose. `same_on_every_rank`: all ranks
    raised it together with the same text (after agreeing on it), so rank 0 alone says it.
    `every_rank_stops`: all ranks raised a dmt error at the same point (each its own words,
    perhaps; no crash), so they can still meet at a barrier to leave the process group."""

    same_on_every_rank = False
    every_rank_stops = False


class ConfigError(DMTError):
    """The experiment configuration is invalid (typo, wrong type, bad arithmetic)."""


class CheckpointError(DMTError):
    """A checkpoint is missing or does not fit the model it is loaded into."""


class DataError(DMTError):
    """The data source is missing, empty or unusable."""


class StorageError(DMTError):
    """A file dmt writes could not be written: a full disk, a read-only folder, a quota."""


# How torch's zip writer (torch.save) reports a write the system refused or cut short.
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "open file failed",
                         "file write failed")


def is_write_failure(err: BaseException) -> bool:
    """Whether `err` is the system refusing a write (rather than, say, a collective or an
    out-of-memory error, which torch also raises as RuntimeError)."""
    if isinstance(err, OSError):
        return True
    return isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITE_FAILURES)


def storage_error(path, err: BaseException, what: str = "") -> StorageError:
    """One line for a failed write of `path`: the system's reason and the space left there
    (torch.save reports a full disk only as "unexpected pos ...")."""
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    elif "unexpected pos" in str(err):  # torch's zip writer, when a write comes up short
        reason = "the file was cut short: a full disk, a quota or a file-size limit"
    else:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        reason += f"; {shutil.disk_usage(where).free / 2**20:.0f} MiB free on its disk"
    except OSError:
        pass
    return StorageError(f"cannot write {what + ' ' if what else ''}{path} ({reason})")
