"""Counter-based random numbers: every draw is a pure function of its coordinates.

Why: exact resume and worker-count independence need sample i of epoch e to get the
same augmentation whoever computes it and in whatever order. A stateful generator
cannot promise that; hashing (seed, epoch, index, stream) can, and it vectorises.
"""
import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GAMMA
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def hash64(*keys) -> np.ndarray:
    """Well-mixed uint64 per element of the broadcast of integer `keys` (order matters)."""
    keys = [np.asarray(k).astype(np.int64).astype(np.uint64) for k in keys]
    shape = np.broadcast_shapes(*(k.shape for k in keys))
    h = np.zeros(shape, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
        for k in keys:
            h = _splitmix64(h ^ k)
    return h


def uniform(*keys, low=0.0, high=1.0) -> np.ndarray:
    """Float64 uniform in [low, high), one per element of the broadcast keys."""
    unit = (hash64(*keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return low + (high - low) * unit
