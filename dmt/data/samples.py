"""A small folder of real JPEG photos, made offline from images that ship in packages.

For the demo, the tests and the loader benchmark: nothing can be downloaded, but
scikit-image (and scikit-learn, when present) carry a few real photographs. Each
sample is a random crop of one of them, resized and saved as JPEG, so the files
have the statistics of photos (and of JPEG) rather than of noise.
"""
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from dmt.data.rng import uniform
from dmt.errors import DataError

_SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                   "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "color.png")
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
_ASPECTS = (4 / 3, 3 / 4, 1.0, 3 / 2, 2 / 3)  # width / height


def _package_dir(name):
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec and spec.origin else None


@lru_cache(maxsize=1)
def _source_photos() -> tuple:
    paths = []
    for package, subdir, names in (("skimage", "data", _SKIMAGE_PHOTOS),
                                   ("sklearn", "datasets/images", _SKLEARN_PHOTOS)):
        root = _package_dir(package)
        if root is not None:
            paths += [root / subdir / n for n in names if (root / subdir / n).is_file()]
    if not paths:
        raise DataError("write_sample_images needs scikit-image (pip install scikit-image)")
    return tuple(Image.open(p).convert("RGB") for p in paths)


def write_sample_images(out_dir, num_images: int = 256, size: int = 96, seed: int = 0,
                        num_classes: int = 4, quality: int = 90) -> Path:
    """Write `num_images` JPEGs into out_dir/class_k/ and return out_dir.

    The longer side of each image is `size` +-10%, its aspect one of 4:3, 3:4, 1:1,
    3:2, 2:3 (size=500 gives ImageNet-like 500x375 files). Deterministic in `seed`.
    """
    photos = _source_photos()
    out = Path(out_dir)
    for k in range(num_classes):
        (out / f"class_{k}").mkdir(parents=True, exist_ok=True)
    i = np.arange(num_images)
    u = [uniform(seed, 0x5A4D, i, stream) for stream in range(6)]
    for n in range(num_images):
        photo = photos[int(u[0][n] * len(photos))]
        aspect = _ASPECTS[int(u[1][n] * len(_ASPECTS))]
        longer = max(8, round(size * (0.9 + 0.2 * u[2][n])))
        width, height = (longer, round(longer / aspect)) if aspect >= 1 else (round(longer * aspect), longer)
        # A crop of 30-100% of the photo's shorter side, with the output's aspect.
        side = min(photo.size) * (0.3 + 0.7 * u[3][n])
        cw, ch = min(photo.width, side * max(aspect, 1)), min(photo.height, side / min(aspect, 1))
        left, top = u[4][n] * (photo.width - cw), u[5][n] * (photo.height - ch)
        image = photo.resize((width, height), Image.BICUBIC, box=(left, top, left + cw, top + ch))
        image.save(out / f"class_{n % num_classes}" / f"img_{n:05d}.jpg", quality=quality)
    return out
