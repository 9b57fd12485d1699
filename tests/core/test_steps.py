"""The step registry: a method of one's own, declared in this one file and registered once,
gets model files, .pjz files, a recipe stage and a CLI verb with flags, and its config's
errors read the same from Python, a recipe and the command line."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import penjing as pj
from penjing import recipes
from penjing.cli import main
from penjing.core import history, steps
from penjing.core.checkpoint import checkpoint_digest
from penjing.errors import FormatError

# --- the toy method: scale one Linear's output by a factor kept as a buffer -------------


@dataclasses.dataclass(frozen=True)
class Scale:
    factor: float = 2.0
    layer: str = "fc2"
    exact: bool = True  # unused by the method; a bool field for the CLI

    def __post_init__(self) -> None:
        if not 0 < self.factor <= 100:
            raise ValueError(f"factor must be in (0, 100], got {self.factor}")


class Scaled(nn.Module):
    def __init__(self, inner: nn.Module, factor: float) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("factor", torch.tensor(float(factor)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.factor


def scale_(model: nn.Module, config: Scale) -> nn.Module:
    model.set_submodule(config.layer, Scaled(model.get_submodule(config.layer), config.factor))
    history.record(model, {"op": "toy_scale", "layer": config.layer})
    return model


def _replay(model: nn.Module, record: dict, tensors) -> nn.Module:
    model.set_submodule(record["layer"], Scaled(model.get_submodule(record["layer"]), 1.0))
    history.record(model, record)
    return model


def _check(record: dict) -> None:
    if not isinstance(record.get("layer"), str):
        raise ValueError(f"a toy_scale step names its layer, got {record!r}")


STEP = steps.Step("toy_scale", _replay, structural=True, check=_check, config=Scale,
                  apply=scale_, help="scale one Linear's output")


class MLP(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP()


@pytest.fixture
def toy():
    steps.register(STEP)
    yield STEP
    steps.unregister(STEP.op)


X = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def same(a: nn.Module, b: nn.Module) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(X), b.eval()(X))


# --- from Python --------------------------------------------------------------------------


def test_a_registered_step_is_saved_and_replayed(toy, tmp_path):
    model = steps.run("toy_scale", mlp(), Scale(factor=3.0))
    assert isinstance(model.fc2, Scaled) and float(model.fc2.factor) == 3.0
    pj.save(model, tmp_path / "m.safetensors")
    loaded = pj.load(tmp_path / "m.safetensors", MLP)
    assert isinstance(loaded.fc2, Scaled) and float(loaded.fc2.factor) == 3.0
    assert same(model, loaded)
    # a .pjz keeps a structural step's record too
    pj.codec.save(model, tmp_path / "m.pjz")
    assert same(model, pj.load(tmp_path / "m.pjz", MLP))
    # and it chains with built-in steps: masks on top, kept live
    pj.prune.magnitude_(model, sparsity=0.5, layers=["fc1"])
    pj.save(model, tmp_path / "m2.safetensors")
    again = pj.load(tmp_path / "m2.safetensors", MLP)
    assert same(model, again) and set(pj.prune.masks(again)) == {"fc1"}


def test_the_registry_lists_built_in_and_registered_steps(toy):
    assert {"channels", "quantize", "parametrize", "toy_scale"} <= set(steps.ops())
    assert steps.get("channels").structural and not steps.get("quantize").structural
    assert "toy_scale" in steps.runnable()
    with pytest.raises(ValueError, match="registered already"):
        steps.register(STEP)
    with pytest.raises(ValueError, match="registered already"):
        steps.register(dataclasses.replace(STEP, op="channels"))
    with pytest.raises(ValueError, match="unknown step 'nope'; known steps: channels"):
        steps.get("nope")
    with pytest.raises(ValueError, match="lowercase letters"):
        steps.Step("Bad Name", _replay)
    with pytest.raises(ValueError, match="both config"):
        steps.Step("half", _replay, config=Scale)


def test_a_file_of_an_unregistered_or_malformed_step_is_refused(toy, tmp_path):
    model = steps.run("toy_scale", mlp(), {"factor": 2})
    pj.save(model, tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    meta["penjing.history"] = json.dumps([{"op": "toy_scale", "layer": 3}])
    meta["penjing.sha256"] = checkpoint_digest(tensors, meta)  # as a forger would
    save_file(tensors, tmp_path / "bad.safetensors", meta)
    with pytest.raises(FormatError, match="a toy_scale step names its layer"):
        pj.load(tmp_path / "bad.safetensors", MLP)
    steps.unregister("toy_scale")
    with pytest.raises(FormatError, match="history cannot be read"):
        pj.load(tmp_path / "m.safetensors", MLP)


# --- the same errors from Python, a recipe and the command line ----------------------------

UNKNOWN = "unknown field 'factr' (did you mean 'factor'?); allowed: factor, layer, exact"
RANGE = "factor must be in (0, 100], got 500.0"
TYPE = "factor: must be a valid number, unable to parse string as a number, got 'big'"


@pytest.mark.parametrize(("values", "message"), [
    ({"factr": 2}, UNKNOWN), ({"factor": 500}, RANGE), ({"factor": "big"}, TYPE)])
def test_bad_config_is_one_error_in_the_same_words_everywhere(toy, tmp_path, capsys,
                                                              values, message):
    with pytest.raises(steps.ConfigError) as err:
        steps.run("toy_scale", mlp(), values)
    assert str(err.value) == f"toy_scale: {message}"

    key, value = next(iter(values.items()))
    text = f"model: lenet300\nstages:\n  - stage: toy_scale\n    {key}: {value}\n"
    with pytest.raises(recipes.RecipeError) as err:
        recipes.parse(text, "recipe.yaml")
    assert str(err.value) == f"recipe.yaml line 3: stages[0] (toy_scale): {message}"

    pj.save(mlp(), tmp_path / "in.safetensors")
    code = main(["apply", "toy_scale", "tests.core.test_steps:mlp", "--weights",
                 str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "out.safetensors"),
                 f"--{key}", str(value)])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"penjing apply: error: toy_scale: {message}"
    assert not (tmp_path / "out.safetensors").exists()


def test_apply_without_a_registered_step_says_how_to_add_one(capsys):
    assert main(["apply", "toy_scale", "lenet300"]) == 2
    assert capsys.readouterr().err.strip() == (
        "penjing apply: error: no step named 'toy_scale': no registered step has a config; "
        "register one with penjing.core.steps.register in a module named in "
        "PENJING_PLUGINS (comma-separated)")


def test_stray_arguments_and_a_plugins_key_that_is_no_list_are_named(toy, tmp_path, capsys):
    pj.save(mlp(), tmp_path / "in.safetensors")
    code = main(["apply", "toy_scale", "tests.core.test_steps:mlp", "--weights",
                 str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "out.safetensors"),
                 "--factor", "2", "stray"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "penjing apply: error: unexpected argument 'stray'; give fields as --name value")
    with pytest.raises(recipes.RecipeError, match="recipe.yaml line 2: plugins: must be a list "
                       "of module names, got 3"):
        recipes.parse("model: lenet300\nplugins: 3\nstages:\n  - stage: train\n",
                      "recipe.yaml")


def test_unknown_stage_lists_registered_steps(toy):
    with pytest.raises(recipes.RecipeError, match="allowed: train, prune, .*, toy_scale"):
        recipes.parse("model: lenet300\nstages:\n  - stage: toy_scal\n", "recipe.yaml")


# --- a recipe stage and a CLI verb, for free ------------------------------------------------


@pytest.fixture
def here_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))


def test_a_registered_step_is_a_recipe_stage(toy, tmp_path, here_importable):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent("""
        model: tests.core.test_steps:mlp
        data: digits
        stages:
          - stage: toy_scale
            factor: 4
    """))
    result = recipes.run(path, tmp_path / "out", progress=False, report=False, log=None)
    assert [r.stage for r in result.rows] == ["input", "toy_scale"]
    assert result.rows[1].detail == "factor 4"
    loaded = pj.load(tmp_path / "out" / result.rows[1].file, MLP)
    assert isinstance(loaded.fc2, Scaled) and float(loaded.fc2.factor) == 4.0
    # scaling the logits keeps every prediction
    assert result.rows[1].metric == result.rows[0].metric


def test_a_registered_step_is_a_cli_verb_with_flags(toy, tmp_path, capsys, here_importable):
    pj.save(mlp(), tmp_path / "in.safetensors")
    code = main(["apply", "toy_scale", "tests.core.test_steps:mlp", "--weights",
                 str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "out.safetensors"),
                 "--factor", "0.5", "--layer", "fc1", "--no-exact"])
    assert code == 0, capsys.readouterr().err
    assert "Scale(factor=0.5, layer='fc1', exact=False)" in capsys.readouterr().out
    loaded = pj.load(tmp_path / "out.safetensors", MLP)
    assert isinstance(loaded.fc1, Scaled) and float(loaded.fc1.factor) == 0.5


PLUGIN = '''
import dataclasses
from penjing.core import history, steps

@dataclasses.dataclass(frozen=True)
class Nothing:
    note: str = "x"

def apply(model, config):
    history.record(model, {"op": "plugin_noop"})
    return model

steps.register(steps.Step("plugin_noop", lambda model, record, tensors: model,
                          config=Nothing, apply=apply), replace=True)
'''


def test_plugins_are_imported_by_a_recipe_and_by_the_command(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    try:
        text = "model: lenet300\nplugins: [my_plugin]\nstages:\n  - stage: plugin_noop\n"
        (tmp_path / "recipe.yaml").write_text(text)
        recipe = recipes.load(tmp_path / "recipe.yaml")  # imported from the recipe's folder
        assert recipe.stages[0].config().note == "x"
        (tmp_path / "bad.yaml").write_text(text.replace("my_plugin", "no_such_plugin"))
        with pytest.raises(recipes.RecipeError, match="bad.yaml line 2: plugins: cannot import "
                           "module 'no_such_plugin'"):
            recipes.load(tmp_path / "bad.yaml")
        steps.unregister("plugin_noop")
        monkeypatch.delitem(sys.modules, "my_plugin")  # the command imports it afresh
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("PENJING_PLUGINS", "my_plugin")
        with pytest.raises(SystemExit):
            main(["apply", "plugin_noop", "-h"])
        assert "--note VALUE" in capsys.readouterr().out
    finally:
        steps.unregister("plugin_noop")
        sys.modules.pop("my_plugin", None)
