from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Subset

import penjing as pj
from penjing.errors import FormatError
from penjing.train import evaluate, fit, load_checkpoint, save_checkpoint


def test_fit_learns_and_repeats_exactly(mnist):
    test = DataLoader(mnist.test, batch_size=500)
    runs = []
    for _ in range(2):
        loader = DataLoader(Subset(mnist.train, range(0, 4000, 4)), batch_size=50, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        model = pj.models.create("lenet300")
        history = fit(model, loader, epochs=2, test_loader=test, progress=False, seed=0)
        runs.append((history, model.state_dict()))
    (h1, s1), (h2, s2) = runs
    assert h1.loss == h2.loss
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert h1.loss[-1] < h1.loss[0]
    assert h1.accuracy[-1] > 0.8  # 1,000 images, 2 epochs: far above the 10 % of chance


def test_checkpoint_round_trip(tmp_path):
    model = pj.models.create("lenet5")
    save_checkpoint(model, tmp_path / "m.safetensors")
    fresh = load_checkpoint(tmp_path / "m.safetensors", pj.models.create("lenet5"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 fresh.state_dict().values(), strict=True))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_checkpoint_refuses_pickle(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(pj.models.create("lenet300").state_dict(), path)
    with pytest.raises(FormatError, match="safetensors"):
        load_checkpoint(path)


def test_evaluate_empty_loader():
    with pytest.raises(ValueError, match="empty"):
        evaluate(pj.models.create("lenet300"), [])


def test_bad_training_settings_say_what_to_give(tmp_path):
    model = pj.models.create("lenet300")
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'; choose 'adam', 'adamw'"):
        pj.train.make_optimizer(model.parameters(), "rmsprop")
    with pytest.raises(ValueError, match="epochs must be >= 0, got -1"):
        fit(model, [], epochs=-1, progress=False)
    with pytest.raises(FileNotFoundError, match="'.*missing.safetensors' does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors", model)


def test_eval_mode_restores_each_mode_even_on_error():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).eval()
    with pytest.raises(RuntimeError, match="inside"), pj.train.eval_mode(a, b):
        assert not a.training and not b.training
        raise RuntimeError("inside")
    assert a.training and not b.training


def test_recalibrated_bn_holds_the_average_of_the_batch_statistics():
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3, momentum=0.3)
    model = torch.nn.Sequential(conv, bn, torch.nn.ReLU()).eval()
    batches = [torch.randn(4, 1, 8, 8) * (i + 1) + i for i in range(3)]
    weights = {k: v.clone() for k, v in model.state_dict().items()
               if "running" not in k and "num_batches" not in k}
    assert pj.train.recalibrate_bn_(model, batches + [torch.full((4, 1, 8, 8), 1e3)],
                                    batches=3) == 1
    with torch.no_grad():
        feats = [conv(b) for b in batches]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, atol=1e-4)
    assert bn.momentum == 0.3 and not model.training and int(bn.num_batches_tracked) == 3
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_recalibrate_bn_bad_input():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="batches must be a positive int, got 0"):
        pj.train.recalibrate_bn_(model, [torch.randn(2, 1, 5, 5)], batches=0)
    with pytest.raises(ValueError, match="empty loader"):
        pj.train.recalibrate_bn_(model, [], batches=5)
    assert pj.train.recalibrate_bn_(torch.nn.Linear(2, 2), [torch.randn(1, 2)]) == 0


def _recording_loss(opt, seen):
    def loss_fn(model, x, y):
        seen.append(opt.param_groups[0]["lr"])
        return pj.train.cross_entropy(model, x, y)
    return loss_fn


def test_cosine_schedule_falls_to_zero_step_by_step():
    import math

    model = torch.nn.Linear(2, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))] * 5
    seen: list[float] = []
    fit(model, batches, epochs=2, optimizer=opt, loss_fn=_recording_loss(opt, seen),
        schedule="cosine", progress=False)
    expected = [0.05 * (1 + math.cos(math.pi * k / 10)) for k in range(10)]
    assert seen == pytest.approx(expected)
    # the optimizer comes back at its own rate, so a second fit starts from 0.1 again
    assert opt.param_groups[0]["lr"] == 0.1
    seen.clear()
    fit(model, batches, epochs=1, optimizer=opt, loss_fn=_recording_loss(opt, seen),
        schedule="cosine", progress=False)
    assert seen == pytest.approx([0.05 * (1 + math.cos(math.pi * k / 5)) for k in range(5)])


def test_cosine_schedule_steps_per_epoch_for_a_loader_without_length():
    model = torch.nn.Linear(2, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (torch.randn(4, 2), torch.zeros(4, dtype=torch.long))

    class Stream:  # re-iterable, no __len__
        def __iter__(self):
            return iter([batch, batch])

    seen: list[float] = []
    fit(model, Stream(), epochs=2, optimizer=opt, loss_fn=_recording_loss(opt, seen),
        schedule="cosine", progress=False)
    assert seen == pytest.approx([0.1, 0.1, 0.05, 0.05])


def test_constant_schedule_keeps_the_rate_and_unknown_ones_are_refused():
    model = torch.nn.Linear(2, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[float] = []
    batches = [(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))] * 3
    fit(model, batches, epochs=2, optimizer=opt, loss_fn=_recording_loss(opt, seen),
        progress=False)
    assert seen == [0.1] * 6
    with pytest.raises(ValueError, match="unknown schedule 'step'; choose one of"):
        fit(model, batches, epochs=1, schedule="step", progress=False)
