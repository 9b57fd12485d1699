from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

import penjing as pj
from penjing.distill import LABEL_PRESERVING, TRANSFORMS, data_distill, pseudo_label
from penjing.distill.transforms import resolve_transforms


def dot(row: int, col: int) -> torch.Tensor:
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, row, col] = 1.0
    return image


def where(image: torch.Tensor) -> list[list[int]]:
    return (image[0, 0] > 0.5).nonzero().tolist()


def test_transforms_move_content_as_named():
    image = dot(4, 6)  # two pixels right of the centre
    assert where(TRANSFORMS["shift_right"](image)) == [[4, 8]]
    assert where(TRANSFORMS["shift_up"](image)) == [[2, 6]]
    assert where(TRANSFORMS["hflip"](image)) == [[4, 2]]
    assert where(pj.distill.rotate(90)(image)) == [[2, 4]]  # counter-clockwise as displayed
    assert where(pj.distill.scale(1.5)(image)) == [[4, 7]]
    assert torch.equal(TRANSFORMS["identity"](image), image)


def test_transforms_keep_the_background_and_shape(mnist):
    images = mnist.test.tensors[0][:8]
    background = float(images.min())  # normalised zero ink
    for name in LABEL_PRESERVING:
        out = TRANSFORMS[name](images)
        assert out.shape == images.shape, name
        assert float(out[..., 0, 0].max()) == pytest.approx(background, abs=1e-5), name


def test_digit_defaults_exclude_the_flip():
    assert "hflip" not in LABEL_PRESERVING and len(LABEL_PRESERVING) == len(TRANSFORMS) - 1
    with pytest.raises(ValueError, match="unknown transform 'vflip'"):
        resolve_transforms(["identity", "vflip"])


def test_pseudo_labels_are_the_mean_over_transforms(teacher, mnist):
    images = mnist.test.tensors[0][:100]
    names = ("identity", "shift_left", "zoom_in")
    result = pseudo_label(teacher, images, names)
    with torch.no_grad():
        mean = torch.stack([torch.softmax(teacher(TRANSFORMS[n](images)), 1) for n in names]).mean(0)
    torch.testing.assert_close(result.confidence, mean.max(1).values)
    assert torch.equal(result.labels, mean.argmax(1))
    assert bool(result.kept.all()) and torch.equal(result.images, images)


def test_confidence_threshold_drops_uncertain_images(teacher, mnist):
    images, truth = mnist.test.tensors
    everything = pseudo_label(teacher, images)
    confident = pseudo_label(teacher, images, min_confidence=0.9)
    assert 0 < len(confident.labels) < len(everything.labels) == len(images)
    assert float(confident.confidence.min()) >= 0.9
    all_right = float((everything.labels == truth).float().mean())
    confident_right = float((confident.labels == truth[confident.kept]).float().mean())
    assert confident_right > all_right > 0.85
    with pytest.raises(ValueError, match=r"min_confidence must be in \[0, 1\], got 2"):
        pseudo_label(teacher, images, min_confidence=2)


def test_retraining_on_pseudo_labels_beats_the_few_labels(mnist, test_loader):
    # 200 labelled images teach a model; 1,800 more, pseudo-labelled, teach a fresh one.
    labeled = Subset(mnist.train, range(0, 4000, 20))
    unlabeled = TensorDataset(mnist.train.tensors[0][[i for i in range(0, 4000, 2) if i % 20]])
    loader = torch.utils.data.DataLoader(labeled, batch_size=50, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    first = pj.models.create("mlp30")
    pj.train.fit(first, loader, epochs=10, progress=False)
    few_labels = pj.train.evaluate(first, test_loader)
    torch.manual_seed(7)
    result = data_distill(first, pj.models.create("mlp30"), labeled, unlabeled, epochs=3,
                          batch_size=50, test_loader=test_loader, progress=False)
    assert len(result.pseudo.labels) == 1800
    assert result.history.accuracy[-1] > few_labels
