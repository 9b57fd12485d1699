from __future__ import annotations

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.quant import (
    PerTensor,
    QuantConfig,
    QuantSpec,
    activation_quantizers,
    get_weight_quant,
    ptq,
    qat,
)

W2 = QuantSpec(2, symmetric=True, signed=True, granularity=PerTensor())


def test_qat_recovers_what_2_bit_ptq_loses(lenet5_trained):
    model, train, test, calib, fp32 = lenet5_trained
    cfg = QuantConfig(weight=W2)  # 2-bit weights, one scale per tensor; uint8 activations
    ptq_acc = pj.train.evaluate(ptq(model, calib, cfg), test)
    few = [batch for batch, _ in zip(train, range(20), strict=False)]
    q = qat(model, few, cfg, epochs=1, lr=1e-4, progress=False)
    qat_acc = pj.train.evaluate(q, test)
    assert ptq_acc < fp32 - 0.03  # two-bit weights cost real accuracy after PTQ ...
    assert qat_acc >= fp32 - 0.01  # ... and 20 steps of QAT win it back
    # after QAT the weights sit on their frozen 2-bit grid: 4 levels
    w, wq = q.fc1.weight, get_weight_quant(q.fc1)
    assert not wq.dynamic
    ints = w / wq.scale
    torch.testing.assert_close(ints, ints.round(), atol=1e-4, rtol=0)
    assert int(ints.detach().round().min()) >= -2 and int(ints.detach().round().max()) <= 1


def test_qat_leaves_the_float_model_alone_and_returns_eval_mode(lenet5_trained):
    model, train, _, _, _ = lenet5_trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = qat(model, [next(iter(train))], QuantConfig(), epochs=1, progress=False)
    assert not q.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.frozen for m in activation_quantizers(q).values())


def test_learnable_scales_train_in_the_log_domain_and_stay_positive():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    loader = list(zip(x.split(32), y.split(32), strict=True))
    # a large learning rate would drive a raw scale below zero within a few Adam steps
    q = qat(model, loader, QuantConfig(learnable=True), epochs=3, lr=5e-2, calib_batches=2,
            progress=False)
    scales = [get_weight_quant(q.get_submodule(n)).scale for n in ("0", "2")]
    scales += [m.scale for m in activation_quantizers(q).values()]
    assert all(float(s.min()) > 0 for s in scales)
    assert not any("log_scale" in n for n, _ in q.named_parameters())  # baked at the end


def test_qat_with_no_batches_is_a_clear_error(lenet5_trained):
    model = lenet5_trained[0]
    with pytest.raises(ValueError, match="at least one batch, got an empty loader"):
        qat(model, [], QuantConfig(), epochs=1, progress=False)


def test_qat_keeps_pruned_zeros_and_quantizes_after_the_mask():
    torch.manual_seed(0)
    model = pj.models.create("lenet300")
    pj.prune.magnitude_(model, sparsity=0.8)
    chain = model.fc1.parametrizations.weight
    chain[0].mask.view(-1)[chain.original.abs().argmax()] = 0  # mask the largest weight too
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    loader = list(zip(x.split(32), y.split(32), strict=True))
    q = qat(model, loader, QuantConfig(weight=QuantSpec(4, granularity=PerTensor())),
            epochs=2, lr=1e-2, calib_batches=1, progress=False)
    w, wq = q.fc1.weight, get_weight_quant(q.fc1)
    assert float((w == 0).float().mean()) >= 0.8  # the mask still holds after training
    # the frozen scale is the masked weight's range (not the masked-out largest), 4-bit grid
    masked = q.fc1.parametrizations.weight[0](q.fc1.parametrizations.weight.original)
    assert float(wq.scale) == pytest.approx(float(masked.detach().abs().max()) / 7, rel=1e-6)
    assert int((w / wq.scale).round().abs().max()) <= 8
