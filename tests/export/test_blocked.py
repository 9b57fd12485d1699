"""Group-quantized weights in ONNX files: the integers the quantizer holds, stored once,
whatever the layer's shape or how often the model calls it."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

import penjing as pj
from penjing.export import onnx as export_onnx
from penjing.export import optimized_ops, ort_run
from penjing.quant import weight_only


class Twice(nn.Module):
    """One Linear called twice, then a conv: a reused layer and a 3-D weight."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(64, 64)
        self.conv = nn.Conv1d(4, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shared(torch.relu(self.shared(x)))
        return self.conv(y.reshape(x.shape[0], 4, 16))


def test_reused_and_conv_weights_store_the_quantizers_integers(tmp_path):
    torch.manual_seed(0)
    model = Twice().eval()
    pj.prune.magnitude_(model, {"shared": 0.5})
    q = pj.quant.ptq(model, None, weight_only(4, 32))
    x = torch.randn(5, 1, 64)  # 3-D: the Linear exports as Transpose -> MatMul
    path = export_onnx(q, tmp_path / "twice.onnx", x)
    np.testing.assert_allclose(ort_run(path, x)[0], q(x).detach().numpy(), atol=1e-5)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    shared = sorted(name for name in inits if name.startswith("shared."))
    assert shared == ["shared.bias", "shared.weight_int4_t", "shared.weight_int4_t_scale"]
    quant = pj.quant.get_weight_quant(q.shared)
    want = pj.quant.quantize(q.shared.parametrizations.weight.original
                                    * q.shared.parametrizations.weight[0].mask,
                                    quant.scale, quant.zero_point, quant.spec)
    np.testing.assert_array_equal(inits["shared.weight_int4_t"], want.numpy().T)
    assert (inits["shared.weight_int4_t"] == 0).mean() >= 0.5  # the pruned zeros stay zero
    assert inits["conv.weight_int4"].shape == (8, 12)  # (rows, in × kernel), reshaped back
    # stored once, read twice: ORT does not fuse a shared initializer into MatMulNBits, so
    # the two calls run DequantizeLinear -> MatMul in float
    ops = optimized_ops(path)
    assert "MatMulNBits" not in ops and ops.get("DequantizeLinear") == 3
