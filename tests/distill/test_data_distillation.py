from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

import penjing as pj
from penjing.distill import LABEL_PRESERVING, TRANSFORMS, Augmented, data_distill_, pseudo_label
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


def test_bad_transforms_are_refused():
    with pytest.raises(ValueError, match="give at least one transform"):
        resolve_transforms([])
    with pytest.raises(ValueError, match="scale factor must be > 0, got 0"):
        pj.distill.scale(0)
    with pytest.raises(ValueError, match=r"image batches shaped \(N, C, H, W\), got \(9, 9\)"):
        TRANSFORMS["shift_left"](torch.zeros(9, 9))


def test_pseudo_labels_are_the_mean_over_transforms(teacher, mnist):
    images = mnist.test.tensors[0][:100]
    names = ("identity", "shift_left", "zoom_in")
    result = pseudo_label(teacher, images, names)
    with torch.no_grad():
        views = [torch.softmax(teacher(TRANSFORMS[n](images)), 1) for n in names]
        mean = torch.stack(views).mean(0)
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


def test_augmented_loader_applies_one_transform_per_image(mnist):
    images, labels = mnist.test.tensors[0][:64], mnist.test.tensors[1][:64]
    loader = [(images, labels)]
    names = ("identity", "shift_left", "zoom_in")
    x, y = next(iter(Augmented(loader, names, seed=3)))
    assert torch.equal(y, labels) and x.shape == images.shape
    views = torch.stack([TRANSFORMS[n](images) for n in names])  # (3, N, C, H, W)
    match = (views == x.unsqueeze(0)).flatten(2).all(2)  # which view each image equals
    assert bool((match.sum(0) >= 1).all())  # every image is exactly one of the views
    assert all(bool(match[i].any()) for i in range(3))  # and every view is drawn
    again, _ = next(iter(Augmented(loader, names, seed=3)))
    assert torch.equal(again, x)  # the draws repeat with the seed


LABELED = range(0, 4000, 20)  # 200 images, every class
UNLABELED = [i for i in range(0, 4000, 2) if i % 20]  # 1,800 others


@pytest.fixture(scope="module")
def few_labels(mnist):
    return Subset(mnist.train, LABELED)


@pytest.fixture(scope="module")
def view_teacher(few_labels):
    """A LeNet-5 trained on the 200 labels, each batch seen through the digit transforms."""
    loader = DataLoader(few_labels, batch_size=50, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = pj.models.create("lenet5")
    pj.train.fit(model, Augmented(loader, LABEL_PRESERVING, seed=0), epochs=15, progress=False)
    return model


def view_accuracy(model, mnist, name: str) -> float:
    images, truth = mnist.train.tensors[0][UNLABELED], mnist.train.tensors[1][UNLABELED]
    return float((pseudo_label(model, images, (name,)).labels == truth).float().mean())


def test_only_a_model_trained_on_the_views_labels_them_well(mnist, few_labels, view_teacher):
    # Regression: a model that never saw 2-pixel shifts labels shifted digits far worse than
    # the originals, so ensembling it over them adds little. Training on the views fixes it.
    loader = DataLoader(few_labels, batch_size=50, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = pj.models.create("lenet5")
    pj.train.fit(plain, loader, epochs=15, progress=False)
    shifts = ("shift_left", "shift_right", "shift_up", "shift_down")

    def mean_shifted(model) -> float:
        return sum(view_accuracy(model, mnist, n) for n in shifts) / len(shifts)

    assert mean_shifted(plain) < view_accuracy(plain, mnist, "identity") - 0.15
    assert mean_shifted(view_teacher) > mean_shifted(plain) + 0.1


def test_pseudo_labels_teach_a_student_beyond_its_few_labels(mnist, few_labels, view_teacher,
                                                            test_loader):
    # 200 labels: a LeNet-5 trained on them (with the views) labels 1,800 more images; the
    # 784-30-10 student trained on all 2,000 beats the same student on the 200 alone, with
    # the same number of optimizer steps (120).
    unlabeled = TensorDataset(mnist.train.tensors[0][UNLABELED])
    loader = DataLoader(few_labels, batch_size=50, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    alone = pj.models.create("mlp30")
    pj.train.fit(alone, loader, epochs=30, progress=False)
    few = pj.train.evaluate(alone, test_loader)
    torch.manual_seed(7)
    result = data_distill_(view_teacher, pj.models.create("mlp30"), few_labels, unlabeled,
                          epochs=3, batch_size=50, test_loader=test_loader, progress=False)
    truth = mnist.train.tensors[1][UNLABELED]
    assert len(result.pseudo.labels) == 1800
    assert float((result.pseudo.labels == truth).float().mean()) > 0.85
    assert result.history.accuracy[-1] > few + 0.03


def test_data_distill_refuses_bad_input(mnist, few_labels, view_teacher):
    unlabeled = mnist.train.tensors[0][UNLABELED]
    with pytest.raises(ValueError, match="teacher gives 10 logits, the student 4"):
        data_distill_(view_teacher, pj.models.create("mlp30", num_classes=4), few_labels,
                     unlabeled, progress=False)
    with pytest.raises(ValueError, match="no unlabelled images"):
        data_distill_(view_teacher, pj.models.create("mlp30"), few_labels, unlabeled[:0],
                     progress=False)
    with pytest.raises(ValueError, match="unknown transform 'flip'"):
        data_distill_(view_teacher, pj.models.create("mlp30"), few_labels, unlabeled,
                     transforms=("flip",), progress=False)
    with pytest.raises(ValueError, match="labelled data set is empty"):
        data_distill_(view_teacher, pj.models.create("mlp30"), Subset(few_labels, []), unlabeled,
                     progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        pseudo_label(view_teacher, unlabeled, batch_size=0)
