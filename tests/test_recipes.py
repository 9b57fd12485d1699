"""penjing.recipes: recipe errors name the line, key and allowed values; a user's own
model goes through every stage kind with its accuracy recorded; finished stages are not
run again; the example recipes are valid and run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import penjing as pj
from penjing import recipes
from penjing.recipes import RecipeError
from penjing.recipes import stages as stage_fns

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "recipes"


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyRes(nn.Module):
    """A user's own residual CNN: the residual add couples the stem's channels with the
    block's output, which channel pruning has to keep in step."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        self.block = Block(16)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def tiny_res() -> nn.Module:
    return TinyRes()


def seven_classes() -> nn.Module:
    return TinyRes(classes=7)


def broken() -> nn.Module:
    raise RuntimeError("the config file is missing")


@pytest.fixture
def user_code(monkeypatch):
    """This file importable as `test_recipes`, as a user's module beside a recipe is."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- errors before anything runs -----------------------------------------------------------


def problem(text: str) -> str:
    with pytest.raises(RecipeError) as err:
        recipes.parse(text, "recipe.yaml")
    return str(err.value)


def test_unknown_stage_names_line_and_allowed_stages():
    msg = problem("model: lenet300\nstages:\n  - stage: train\n  - stage: pruen\n")
    assert "recipe.yaml line 4: stages[1] (pruen).stage: unknown stage 'pruen'" in msg
    assert "did you mean 'prune'" in msg
    assert "allowed: train, prune, finetune, distill, quantize, encode, export" in msg


def test_unknown_key_names_line_and_allowed_keys():
    msg = problem("model: lenet300\nstages:\n  - stage: prune\n    structure: group\n"
                  "    ratoi: 0.5\n")
    assert "line 5: stages[0] (prune): unknown key 'ratoi' (did you mean 'ratio'?)" in msg
    assert "allowed:" in msg and "ratio" in msg and "criterion" in msg and "round_to" in msg


def test_key_of_another_structure_is_unknown():
    msg = problem("model: lenet300\nstages:\n  - stage: prune\n    structure: weight\n"
                  "    sparsity: 0.5\n    ratio: 0.5\n")
    assert "line 6" in msg and "unknown key 'ratio'" in msg and "sparsity" in msg


def test_wrong_type_and_range_name_line_and_value():
    msg = problem("model: lenet300\nseed: abc\nstages:\n  - stage: train\n"
                  "  - stage: prune\n    ratio: 1.5\n  - stage: quantize\n    method: ptq\n"
                  "    observer: maximum\n")
    assert msg.startswith("recipe.yaml: 3 problems")
    assert "line 2: seed: must be a valid integer" in msg and "got 'abc'" in msg
    assert ("line 6: stages[1] (prune).ratio: must be a fraction of channels to remove in "
            "[0, 1), got 1.5") in msg
    assert "line 9: stages[2] (quantize).observer: must be 'minmax'" in msg
    assert "'entropy'" in msg and "got 'maximum'" in msg


def test_unknown_method_and_missing_keys():
    msg = problem("stages:\n  - stage: quantize\n    method: int3\n")
    assert "recipe: missing key 'model'" in msg
    assert "line 3: stages[0] (quantize).method: unknown quantize method 'int3'" in msg
    assert "allowed: kmeans, ptq, qat, gptq, awq, weight_only" in msg


def test_per_layer_values_are_checked_by_layer():
    msg = problem("model: lenet300\nstages:\n  - stage: prune\n    structure: weight\n"
                  "    sparsity:\n      fc1: 0.9\n      fc2: 1.2\n")
    assert msg.startswith("recipe.yaml line 7: stages[0] (prune).sparsity.fc2: must be in")


def test_duplicate_key_and_bad_yaml_are_errors():
    assert "key 'seed' is written twice" in problem("model: a\nseed: 1\nseed: 2\nstages: []\n")
    assert "line 3: not valid YAML" in problem("model: a\nstages: [\n  }\n")
    assert "a recipe is a mapping" in problem("- just a list\n")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_example_recipes_are_valid(path):
    recipe = recipes.load(path)
    assert recipe.stages


def test_examples_are_all_there():
    names = {p.stem for p in EXAMPLES.glob("*.yaml")}
    assert {"deep_compression", "network_slimming", "int8_ptq", "prune_kd_int8"} <= names


def test_epoch_cap_applies_to_every_training_stage(monkeypatch):
    recipe = recipes.load(EXAMPLES / "deep_compression.yaml")
    monkeypatch.setenv(recipes.EPOCHS_ENV, "1")
    from penjing.recipes.run import capped, epochs_cap

    small = capped(recipe, epochs_cap())
    assert [getattr(s, "epochs", None) for s in small.stages] == [1, 1, 1, None]
    monkeypatch.setenv(recipes.EPOCHS_ENV, "many")
    with pytest.raises(ValueError, match="PENJING_EPOCHS must be an integer"):
        epochs_cap()


# --- bad input caught before the first stage ----------------------------------------------


def test_model_function_that_raises_is_named(tmp_path, user_code):
    path = write(tmp_path, "model: test_recipes:broken\ndata: digits\n"
                 "stages:\n  - stage: train\n")
    with pytest.raises(RecipeError, match="'test_recipes:broken' raised RuntimeError: the "
                       "config file is missing"):
        recipes.run(path, tmp_path / "out", progress=False, log=None)
    assert not (tmp_path / "out").exists()


def test_model_and_data_that_disagree_fail_first(tmp_path, user_code):
    path = write(tmp_path, "model: test_recipes:seven_classes\ndata: digits\n"
                 "stages:\n  - stage: train\n")
    with pytest.raises(RecipeError, match=r"gives \(2, 7\) on a batch of 2 .* 10 classes"):
        recipes.run(path, tmp_path / "out", progress=False, log=None)
    path = write(tmp_path, "model: lenet300\ndata: digits\nstages:\n  - stage: train\n")
    with pytest.raises(RecipeError, match=r"cannot run on the inputs of data 'digits' "
                       r"\(shape \(2, 1, 8, 8\)\)"):
        recipes.run(path, tmp_path / "out", progress=False, log=None)


def test_weights_that_do_not_fit_and_foreign_files(tmp_path, user_code):
    pj.train.save_checkpoint(nn.Linear(3, 2), tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"GIF89a not a safetensors file")
    for weights, expected in (("other.safetensors", "do not fit"),
                              ("junk.safetensors", "cannot read"),
                              ("missing.pt", "does not exist")):
        path = write(tmp_path, f"model: test_recipes:tiny_res\nweights: {weights}\n"
                     "data: digits\nstages:\n  - stage: train\n")
        with pytest.raises(RecipeError, match=f"weights: .*{expected}"):
            recipes.run(path, tmp_path / "out", progress=False, log=None)


# --- running -------------------------------------------------------------------------------

USER_RECIPE = """\
model: test_recipes:tiny_res   # a residual CNN defined in this test file
data: digits
batch_size: 128
stages:
  - stage: train
    epochs: 2
    lr: 3.0e-3
  - stage: prune
    structure: group
    ratio: 0.5
    epochs: 1
  - stage: distill
    epochs: 1
  - stage: quantize
    method: ptq
    calib_images: 256
  - stage: encode
  - stage: export
"""


def test_user_model_through_every_stage_then_nothing_runs_again(tmp_path, user_code):
    path = write(tmp_path, USER_RECIPE)
    out = tmp_path / "out"
    lines: list[str] = []
    result = recipes.run(path, out, progress=False, log=lines.append)
    assert result.ran == [0, 1, 2, 3, 4, 5]
    assert [r.stage for r in result.rows] == ["input", "train", "prune", "distill",
                                             "quantize", "encode", "export"]
    assert len([line for line in lines if line.startswith("stages[")]) == 6
    train, pruned = result.rows[1], result.rows[2]
    assert train.metric > 0.3  # learned something in 2 epochs on 8×8 digits
    assert pruned.params < 0.5 * train.params and pruned.macs < 0.5 * train.macs
    assert all(0 <= r.metric <= 1 for r in result.rows)
    assert result.rows[6].notes["format"] == "QDQ INT8"
    assert result.rows[6].metric == result.rows[6].notes["ort_accuracy"]

    # every stage's model file loads into a fresh model and measures what the row says
    test = pj.data.loaders(pj.data.digits(), seed=0)[1]
    for row in result.rows[1:4]:
        model = pj.load(out / row.file, tiny_res)
        assert pj.train.evaluate(model, test) == pytest.approx(row.metric)

    data = json.loads((out / "metrics.json").read_text())
    assert data["metric"] == "accuracy" and data["ran"] == [0, 1, 2, 3, 4, 5]
    assert [s["stage"] for s in data["stages"]] == [r.stage for r in result.rows]
    assert {"metric", "params", "nonzero_params", "macs", "bytes", "latency_ms",
            "seconds"} <= set(data["stages"][1])
    assert data["stages"][5]["bytes"] == (out / "model.pjz").stat().st_size
    assert "histograms" not in data["stages"][1]["notes"]
    for name in ("report.md", "weights.png", "size_waterfall.png", "accuracy_vs_size.png",
                 "model.onnx"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "| 1:prune |" in report
    assert "Δ vs 0:train" in result.format()
    # the quantize row's eager time is simulated quantization, and says so; the export row
    # is ONNX Runtime's and carries no mark
    quantize_row = next(r for r in report.splitlines() if r.startswith("| 3:quantize"))
    export_row = next(r for r in report.splitlines() if r.startswith("| 5:export"))
    assert "¹" in quantize_row.split("|")[9] and "¹" not in export_row
    assert "¹ simulated quantization in eager PyTorch" in report
    assert "±" in quantize_row.split("|")[9]  # the spread of the timings
    for row in result.rows:  # a file larger than the float32 weights is marked, others not
        cells = next(r for r in report.splitlines() if r.startswith(f"| {row.label}"))
        big = row.index is not None and row.bytes > 4 * result.rows[1].params
        assert ("²" in cells.split("|")[8]) == big, row.label

    again = recipes.run(path, out, progress=False, report=False, log=None)
    assert again.ran == []
    assert [r.metric for r in again.rows] == [r.metric for r in result.rows]
    assert "all 6 stages finished in an earlier run" in again.messages[0]

    # a change to the last stage runs only that one again
    write(tmp_path, USER_RECIPE.replace("  - stage: export\n",
                                        "  - stage: export\n    check: false\n"))
    changed = recipes.run(path, out, progress=False, report=False, log=None)
    assert changed.ran == [5]
    assert "stages[5] (export) changed" in changed.messages[0]


INTERRUPTED = """\
model: test_recipes:tiny_res
data: digits
batch_size: 256
stages:
  - stage: train
    epochs: 1
  - stage: prune
    structure: weight
    sparsity: 0.5
  - stage: finetune
    epochs: 1
"""


def test_interrupted_stage_keeps_finished_ones_and_resumes(tmp_path, user_code, monkeypatch):
    path = write(tmp_path, INTERRUPTED)
    out = tmp_path / "out"

    def interrupt(ctx, model, cfg):
        raise KeyboardInterrupt

    monkeypatch.setitem(stage_fns.RUNNERS, "finetune", interrupt)
    with pytest.raises(KeyboardInterrupt, match=r"interrupted in stages\[2\] \(finetune\); "
                       r"stages 0-1 are kept .* run again to resume from stages\[2\]"):
        recipes.run(path, out, progress=False, report=False, log=None)
    state = json.loads((out / "state.json").read_text())
    assert len(state["stages"]) == 2
    assert sorted(p.name for p in (out / "stages").iterdir()) == [
        "00-train.safetensors", "01-prune.safetensors"]  # nothing half-written
    assert not (out / "metrics.json").exists()

    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    result = recipes.run(path, out, progress=False, report=False, log=None)
    assert result.ran == [2]
    assert [r.resumed for r in result.rows] == [True, True, True, False]
    # the masks came back from the file: fine-tuning kept the pruned weights at zero
    assert result.rows[3].nonzero_params == result.rows[2].nonzero_params
    assert json.loads((out / "metrics.json").read_text())["ran"] == [2]


@pytest.mark.slow
def test_example_recipe_runs_in_quick_mode(tmp_path, monkeypatch):
    monkeypatch.setenv(recipes.EPOCHS_ENV, "1")
    result = recipes.run(EXAMPLES / "deep_compression.yaml", tmp_path, progress=False,
                         report=False, log=None)
    assert result.epochs_cap == 1
    dense, pruned, shared, stored = result.rows[1:]
    assert dense.metric > 0.8  # LeNet-300-100 after one epoch on the MNIST subset
    assert pruned.nonzero_params < 0.1 * dense.nonzero_params
    assert stored.bytes < dense.bytes / 25  # the .pjz
    assert stored.metric == pytest.approx(shared.metric, abs=0.002)  # read back from disk


LAYERWISE_RECIPE = """\
model: test_recipes:tiny_res
data: digits
batch_size: 128
stages:
  - stage: train
    epochs: 2
    lr: 3.0e-3
  - stage: prune
    structure: nm
    method: sparsegpt
    calib_images: 256
  - stage: quantize
    method: gptq
    bits: 4
    group_size: 16
    calib_images: 256
"""


def test_awq_runs_as_a_recipe_stage_with_the_python_config(tmp_path, user_code):
    text = LAYERWISE_RECIPE.replace("    method: gptq\n", "    method: awq\n    grid: 5\n")
    text = text.replace("  - stage: prune\n    structure: nm\n    method: sparsegpt\n"
                        "    calib_images: 256\n", "")
    recipe = recipes.parse(text, "r.yaml")
    assert recipe.stages[1].config() == pj.quant.AWQConfig(4, 16, grid=5)
    result = recipes.run(write(tmp_path, text), tmp_path / "out", progress=False)
    quantized = result.rows[-1]
    assert quantized.detail == "weights INT4, groups of 16, AWQ"
    model = pj.load(tmp_path / "out" / quantized.file, tiny_res)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(pj.quant.get_weight_quant(m) for m in linears)
    test = pj.data.loaders(pj.data.digits(), seed=0)[1]
    assert pj.train.evaluate(model, test) == pytest.approx(quantized.metric)
    assert quantized.metric > result.rows[-2].metric - 0.1


def test_sparsegpt_and_gptq_run_as_recipe_stages_and_their_files_load(tmp_path, user_code):
    recipe = recipes.parse(LAYERWISE_RECIPE, "r.yaml")
    assert isinstance(recipe.stages[1].config(), pj.prune.SparseGPTConfig)
    assert recipe.stages[2].config() == pj.quant.GPTQConfig(4, 16)
    out = tmp_path / "out"
    result = recipes.run(write(tmp_path, LAYERWISE_RECIPE), out, progress=False)
    train, pruned, quantized = result.rows[1:]
    assert "sparsegpt on 256 training inputs" in pruned.detail
    assert quantized.detail == "weights INT4, groups of 16, GPTQ"
    assert pruned.metric > train.metric - 0.1 and quantized.metric > pruned.metric - 0.1
    model = pj.load(out / quantized.file, tiny_res)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(pj.quant.get_weight_quant(m) for m in linears)
    assert all(pj.prune.is_nm(m.weight, 2, 4) for m in linears)
    test = pj.data.loaders(pj.data.digits(), seed=0)[1]
    assert pj.train.evaluate(model, test) == pytest.approx(quantized.metric)
    with pytest.raises(RecipeError, match="quality, per-layer sparsity and scope are "
                       "magnitude's"):
        recipes.parse("model: a\nstages:\n  - stage: prune\n    structure: weight\n"
                      "    method: wanda\n    quality: 1.0\n", "r.yaml")
