"""Geometric transforms of image batches (N, C, H, W) for data distillation.

Each is a batched affine resampling; pixels from outside the image repeat the border,
which is the background on digits (a zero fill would be wrong once images are
normalised). Label-preserving depends on the data: a horizontal flip is a fine
transform for natural images but turns digits into other shapes (a flipped 2, 3, 7 is no
longer that digit), so `LABEL_PRESERVING`, the default for digits, uses small shifts,
scalings and rotations only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

Transform = Callable[[torch.Tensor], torch.Tensor]


def _affine(images: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    if images.dim() != 4:
        raise ValueError(
            f"transforms take image batches shaped (N, C, H, W), got {tuple(images.shape)}"
        )
    matrix = torch.tensor(theta, dtype=images.dtype, device=images.device)
    grid = nn.functional.affine_grid(
        matrix.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False
    )
    return nn.functional.grid_sample(images, grid, padding_mode="border", align_corners=False)


def shift(dx: float, dy: float) -> Transform:
    """Move the content `dx` pixels right and `dy` pixels down."""

    def apply(images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        # affine_grid maps output coordinates (in [-1, 1]) to input coordinates
        return _affine(images, [[1.0, 0.0, -2.0 * dx / w], [0.0, 1.0, -2.0 * dy / h]])

    return apply


def scale(factor: float) -> Transform:
    """Enlarge the content about the centre by `factor` (< 1 shrinks it)."""
    if not factor > 0:
        raise ValueError(f"scale factor must be > 0, got {factor}")

    def apply(images: torch.Tensor) -> torch.Tensor:
        return _affine(images, [[1.0 / factor, 0.0, 0.0], [0.0, 1.0 / factor, 0.0]])

    return apply


def rotate(degrees: float) -> Transform:
    """Rotate the content about the centre by `degrees`, counter-clockwise as displayed."""
    a = math.radians(degrees)

    def apply(images: torch.Tensor) -> torch.Tensor:
        c, s = math.cos(a), math.sin(a)
        # rows go down on screen, so a displayed counter-clockwise turn samples with +a here
        return _affine(images, [[c, -s, 0.0], [s, c, 0.0]])

    return apply


def identity(images: torch.Tensor) -> torch.Tensor:
    """The images themselves."""
    return images


def hflip(images: torch.Tensor) -> torch.Tensor:
    """Mirror left to right (changes the identity of digits; fine for natural images)."""
    return images.flip(-1)


TRANSFORMS: dict[str, Transform] = {
    "identity": identity,
    "hflip": hflip,
    "shift_left": shift(-2, 0),
    "shift_right": shift(2, 0),
    "shift_up": shift(0, -2),
    "shift_down": shift(0, 2),
    "zoom_in": scale(1.1),
    "zoom_out": scale(0.9),
    "rotate_left": rotate(10),
    "rotate_right": rotate(-10),
}

LABEL_PRESERVING: tuple[str, ...] = tuple(name for name in TRANSFORMS if name != "hflip")


def resolve_transforms(transforms: Sequence[str | Transform]) -> list[Transform]:
    """Transforms by name (keys of TRANSFORMS) or as callables images -> images."""
    if isinstance(transforms, str) or callable(transforms):
        transforms = [transforms]
    resolved = []
    for t in transforms:
        if callable(t):
            resolved.append(t)
        elif t in TRANSFORMS:
            resolved.append(TRANSFORMS[t])
        else:
            raise ValueError(
                f"unknown transform {t!r}; choose from {sorted(TRANSFORMS)} or pass a callable"
            )
    if not resolved:
        raise ValueError("give at least one transform, e.g. ('identity',)")
    return resolved


class Augmented:
    """A training loader whose images each pass through one randomly chosen transform.

    Data distillation ensembles a model over transforms, which only helps when the model is
    accurate on every transformed view: a model that never saw a 2-pixel shift labels
    shifted digits far worse than the originals. Train the labelling model on
    `Augmented(loader, transforms)` with the transforms it will later ensemble over.
    Re-iterable (one pass per epoch); the draws come from a seeded generator.

    >>> pj.train.fit(model, Augmented(train_loader, LABEL_PRESERVING, seed=0), epochs=20)
    """

    def __init__(
        self, loader: Iterable, transforms: Sequence[str | Transform] = LABEL_PRESERVING,
        seed: int = 0,
    ) -> None:
        self.loader = loader
        self.transforms = resolve_transforms(transforms)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    @property
    def dataset(self):
        """The wrapped loader's data set (untransformed), for probing shapes."""
        return getattr(self.loader, "dataset", None)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield self.apply(x), y

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Each image of the batch through one transform drawn uniformly."""
        pick = torch.randint(0, len(self.transforms), (len(images),), generator=self.generator)
        out = images.clone()
        for i, fn in enumerate(self.transforms):
            chosen = pick == i
            if bool(chosen.any()):
                out[chosen] = fn(images[chosen])
        return out
