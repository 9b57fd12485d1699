"""Where activation quantizers go: clipping activations fuse into the layer's range,
other activations get a quantizer of their own; both export to integer kernels."""

from __future__ import annotations

import pytest
import torch
from support_layers import SameConv2d
from torch import fx, nn
from torch.nn import functional as F

import penjing as pj
from penjing.export import compare_with_ort, cpu_saturates_int8, optimized_ops
from penjing.export import onnx as export_onnx
from penjing.quant import ActQuant, get_weight_quant, int8, layer_report, ptq
from penjing.quant.linear.graph import (
    CLIPPING,
    OWN,
    activation,
    join_operands,
    output_placements,
    quantized_joins,
    trace,
)

# x86 CPUs without VNNI saturate u8×s8 pair sums in int16: 7-bit weights keep them exact
INT8 = {"reduce_range": cpu_saturates_int8()}


@pytest.fixture(scope="module")
def images(mnist) -> torch.Tensor:
    return mnist.train.tensors[0][:256]




def _act(kind: str) -> nn.Module:
    """One activation site, written the way `kind` says."""
    class Act(nn.Module):  # a plain module: fx traces into it and sees the function
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if kind == "F.relu6":
                return F.relu6(x)
            if kind == "clamp":
                return x.clamp(0, 6)
            return torch.clamp(x, min=0.0)

    return {"ReLU6": nn.ReLU6(inplace=True), "Hardtanh": nn.Hardtanh(0.0, 6.0),
            "SiLU": nn.SiLU(), "Hardswish": nn.Hardswish()}.get(kind) or Act()


class InvertedResidual(nn.Module):
    """Stem Conv-BN-act, then MobileNetV2's block: 1×1 expand Conv-BN-act, depthwise 3×3
    Conv-BN-act, 1×1 project Conv-BN (linear), residual add; pool and a classifier."""

    def __init__(self, act: str = "ReLU6", c: int = 8, t: int = 4, conv=nn.Conv2d) -> None:
        super().__init__()
        hidden = c * t
        self.stem = nn.Sequential(conv(1, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), _act(act))
        self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                    _act(act))
        self.dw = nn.Sequential(conv(hidden, hidden, 3, 1, 1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), _act(act))
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))
        self.fc = nn.Linear(c, 10)
        for m in self.modules():  # statistics that make folding change the weights
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.1, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _quantizer_nodes(q: fx.GraphModule) -> list[fx.Node]:
    """The quantizer calls that set a scale of their own (not a reuse with observe=False)."""
    return [n for n in q.graph.nodes
            if n.op == "call_module" and isinstance(q.get_submodule(n.target), ActQuant)
            and n.kwargs.get("observe", True)]


CONVS = ["stem.0", "expand.0", "dw.0", "project.0"]


@pytest.mark.parametrize(("kind", "label"), [("ReLU6", "relu6"), ("Hardtanh", "hardtanh"),
                                             ("F.relu6", "relu6"), ("clamp", "clamp")])
def test_clipping_activation_takes_the_layer_output_quantizer(images, tmp_path, kind, label):
    model = InvertedResidual(kind).eval()
    q = ptq(model, images.split(64), int8(**INT8))
    # input, one per conv (after its clip where it has one), the residual add's output,
    # fc's input and output: no second quantizer after a clip
    assert len(_quantizer_nodes(q)) == 1 + len(CONVS) + 1 + 2
    placements = output_placements(q)
    assert [placements[c] for c in CONVS] == [f"fused {label}"] * 3 + ["layer output"]
    for conv in CONVS[:3]:  # the clipped range starts at 0: uint8 spends nothing below
        (node,) = (n for n in q.graph.nodes if n.target == f"{conv.replace('.', '_')}_output_quant")
        assert activation(q, node.args[0]) == (CLIPPING, label)
        assert int(q.get_submodule(node.target).zero_point) == 0
    path = export_onnx(q, tmp_path / "q.onnx", images[:1])
    ops = optimized_ops(path)
    assert ops.get("QLinearConv") == len(CONVS) and "Conv" not in ops
    assert not {"Clip", "Relu"} & set(ops)  # fused into QLinearConv
    assert ops.get("QLinearAdd") == 1 and "Add" not in ops
    agreement = compare_with_ort(q, path, images)
    assert agreement.max_steps <= 2
    assert agreement.max_abs <= 2 * agreement.step * (1 + 1e-3)
    assert agreement.exact >= 0.75 and agreement.top1 >= 0.99


@pytest.mark.parametrize("kind", ["SiLU", "Hardswish"])
def test_other_activations_get_a_quantizer_before_and_after(images, tmp_path, kind):
    model = InvertedResidual(kind).eval()
    q = ptq(model, images.split(64), int8(**INT8))
    label = kind.lower()
    nodes = {n.target: n for n in q.graph.nodes}
    for conv in CONVS[:3]:  # the next layer reads the activation: it has its own quantizer
        name = conv.replace(".", "_")
        act = nodes[f"{name}_{label}_quant"].args[0]
        assert activation(q, act) == (OWN, label)
        assert act.args[0] is nodes[f"{name}_output_quant"]
        assert nodes[f"{name}_output_quant"].args[0] is nodes[conv]
    # the next conv reads that quantizer itself, not one of its own
    assert nodes["expand.0"].args[0] is nodes[f"stem_0_{label}_quant"]
    assert not {f"{c.replace('.', '_')}_input_quant" for c in CONVS[1:]} & set(nodes)
    placements = output_placements(q)
    assert [placements[c] for c in CONVS] == [f"own quantizer ({label})"] * 3 + ["layer output"]
    assert len(_quantizer_nodes(q)) == 1 + len(CONVS) + 1 + 2 + 3
    path = export_onnx(q, tmp_path / "q.onnx", images[:1])
    ops = optimized_ops(path)
    assert ops.get("QLinearConv") == len(CONVS) and "Conv" not in ops
    agreement = compare_with_ort(q, path, images)
    assert agreement.top1 >= 0.99 and agreement.max_steps <= 2


def test_conv_subclass_with_its_own_forward_is_quantized_and_exported(images, tmp_path):
    model = InvertedResidual("ReLU6", conv=SameConv2d).eval()
    x = images[:8]
    q = ptq(model, images.split(64), int8(**INT8))
    for name in ("stem.0", "dw.0"):
        assert isinstance(q.get_submodule(name), SameConv2d)
        assert get_weight_quant(q.get_submodule(name)) is not None
    assert output_placements(q)["stem.0"] == "fused relu6"
    assert pj.quant.sqnr(model(x), q(x)) > 20
    path = export_onnx(q, tmp_path / "q.onnx", images[:1])
    ops = optimized_ops(path)
    assert ops.get("QLinearConv") == len(CONVS) and "Conv" not in ops
    agreement = compare_with_ort(q, path, images)
    assert agreement.max_steps <= 2 and agreement.top1 >= 0.99


def test_activation_families_match_subclasses_and_every_spelling():
    class Relu6Too(nn.ReLU6):
        pass

    class Uses(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = Relu6Too(), nn.Hardtanh(-1.0, 1.0), nn.GELU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.a(x) + self.b(x) + self.c(x) + torch.clip(x, 0, 1) + x.relu()
                    + F.silu(x) + torch.sigmoid(x) + F.leaky_relu(x) + x.tanh() + x.exp())

    gm = trace(Uses())
    found = [activation(gm, n) for n in gm.graph.nodes
             if n.op != "call_function" or n.target is not __import__("operator").add]
    assert found == [None, (CLIPPING, "relu6"), (CLIPPING, "hardtanh"), (OWN, "gelu"),
                     (CLIPPING, "clip"), (CLIPPING, "relu"), (OWN, "silu"), (OWN, "sigmoid"),
                     (OWN, "leaky_relu"), (OWN, "tanh"), None, None]


def test_report_names_the_choice_for_each_output(images):
    model = InvertedResidual("SiLU").eval()
    model.stem[2] = nn.ReLU6()
    q = ptq(model, images.split(64), int8(**INT8))
    rows = {r.name: r.output for r in layer_report(model, q, images[:32])}
    assert rows == {"stem.0": "fused relu6", "expand.0": "own quantizer (silu)",
                    "dw.0": "own quantizer (silu)", "project.0": "layer output",
                    "fc": "layer output"}
    weights_only = ptq(model, None, pj.quant.weight_only(bits=8))
    assert {r.output for r in layer_report(model, weights_only, images[:32])} == {"none"}


def test_activation_no_layer_reads_stays_float_after_its_input_quantizer():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh()).eval()
    x = torch.randn(64, 8)
    q = ptq(model, [x], int8())
    assert output_placements(q) == {"0": "before tanh"}
    (out,) = (n for n in q.graph.nodes if n.op == "output")
    assert activation(q, out.args[0]) == (OWN, "tanh")  # the model returns tanh in float
    assert [n.target for n in _quantizer_nodes(q)] == ["0_input_quant", "0_output_quant"]
    assert {r.output for r in layer_report(model, q, x)} == {"before tanh"}


def test_an_activation_that_is_itself_a_chosen_layer_keeps_its_own_quantizers():
    model = nn.Sequential(nn.Linear(8, 8), nn.PReLU(8), nn.Linear(8, 4)).eval()
    q = ptq(model, [torch.randn(32, 8)], int8(types=(nn.Linear, nn.PReLU)))
    assert output_placements(q) == {"0": "layer output", "1": "layer output", "2": "layer output"}
    # one quantizer per value, none stacked on another
    assert [n.target for n in _quantizer_nodes(q)] == [
        "0_input_quant", "0_output_quant", "1_output_quant", "2_output_quant"]
    assert all(n.args[0].op != "call_module" or not isinstance(
        q.get_submodule(n.args[0].target), ActQuant) for n in _quantizer_nodes(q))


def test_input_quantizer_goes_ahead_of_a_flatten_so_the_pool_runs_on_integers(images, tmp_path):
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 8, 3, 2), nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.adaptive_avg_pool2d(F.relu6(self.conv(x)), 1)
            return self.fc(torch.flatten(x, 1))

    q = ptq(Head().eval(), images.split(64), int8(**INT8))
    observing, reusing = (n for n in q.graph.nodes if n.target == "fc_input_quant")
    assert observing.args[0].target is F.adaptive_avg_pool2d and not observing.kwargs
    # the flattened value reuses that quantizer's scale without observing: same numbers
    assert reusing.args[0].target is torch.flatten and reusing.kwargs == {"observe": False}
    assert next(n for n in q.graph.nodes if n.target == "fc").args[0] is reusing
    assert [n.target for n in _quantizer_nodes(q)] == [
        "conv_input_quant", "conv_output_quant", "fc_input_quant", "fc_output_quant"]
    ops = optimized_ops(export_onnx(q, tmp_path / "q.onnx", images[:1]))
    assert ops.get("QLinearGlobalAveragePool") == 1 and "GlobalAveragePool" not in ops
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1  # all else integer


class _Basic(nn.Module):
    """torchvision's BasicBlock: the block input feeds conv1 and the residual add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class _ResNet(nn.Module):
    """Stem, max-pool, three residual blocks, pool, classifier: the identity of the first
    block is the max-pool's output, of the others the previous block's ReLU."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.blocks = nn.Sequential(_Basic(c), _Basic(c), _Basic(c))
        self.fc = nn.Linear(c, 10)
        for m in self.modules():  # statistics that make folding change the weights
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.1, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _is_quantizer(q: fx.GraphModule, node: object) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_module"
            and isinstance(q.get_submodule(node.target), ActQuant))


def test_a_value_read_by_a_layer_and_an_add_is_quantized_once_for_both(images):
    torch.manual_seed(0)
    q = ptq(_ResNet().eval(), images.split(64), int8(**INT8))
    adds = [n for n in q.graph.nodes if join_operands(n) is not None]
    assert quantized_joins(q) == {n.name: "add" for n in adds} and len(adds) == 3
    for add in adds:
        conv2_out, identity = join_operands(add)
        assert _is_quantizer(q, conv2_out) and _is_quantizer(q, identity)
        assert any(n.target.endswith("conv1") and n.args[0] is identity  # what conv1 reads
                   for n in q.graph.nodes if n.op == "call_module")
        (relu,) = add.users  # the output quantizer sits after the ReLU: one range from 0
        (quant,) = relu.users
        assert _is_quantizer(q, quant) and int(q.get_submodule(quant.target).zero_point) == 0
    # nothing but quantizers and shape reads reads an unquantized value twice
    for node in q.graph.nodes:
        readers = [u for u in node.users if not _is_quantizer(q, u)]
        if node.op != "output" and not _is_quantizer(q, node) and node.op != "placeholder":
            assert len(readers) <= 1, f"{node.name} is read unquantized by {readers}"


def test_se_gate_and_concat_inputs_and_outputs_are_quantized(images):
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, 2)
            self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
            self.a, self.b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1)
            self.head = nn.Conv2d(8, 10, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.silu(self.conv(x))
            x = x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
            x = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
            return self.head(x).mean((2, 3))

    q = ptq(Gate().eval(), images.split(64), int8(**INT8))
    assert sorted(quantized_joins(q).values()) == ["cat", "mul"]
    for node in q.graph.nodes:
        if join_operands(node) is not None:
            assert all(_is_quantizer(q, v) for v in join_operands(node))
            assert all(_is_quantizer(q, u) for u in node.users)
    assert output_placements(q)["conv"] == "own quantizer (silu)"  # the gate's mul reads it


def test_joins_that_reach_no_quantized_layer_stay_float():
    class Residual(nn.Module):
        """A pre-norm residual stream, a join with a number, shape arithmetic, alpha=."""

        def __init__(self) -> None:
            super().__init__()
            self.norm, self.fc, self.head = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.fc(self.norm(x))
            x = torch.add(x, self.fc(self.norm(x)), alpha=0.5)
            x = x.view(x.size(0) * 1, -1) + 1
            return self.head(self.norm(x))

    gm = trace(Residual())
    kinds = {n.name: join_operands(n) is not None for n in gm.graph.nodes
             if n.op in ("call_function", "call_method")}
    assert kinds["add"] and not kinds["add_1"]  # alpha= has no ONNX Add
    assert not kinds["mul"] and not kinds["add_2"]  # x.size(0) * 1, x + 1
    q = ptq(Residual().eval(), [torch.randn(32, 8)], int8())
    assert quantized_joins(q) == {}
    assert not any(_is_quantizer(q, u) for n in q.graph.nodes if n.name == "add" for u in n.users)
