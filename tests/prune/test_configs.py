"""`pj.prune.prune_(model, config)`: one entry for every kind of pruning, configs that check
themselves, and the same words for the same mistake from Python, the CLI and a recipe."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.cli import main
from penjing.prune import (
    STRUCTURES,
    ChannelConfig,
    HeadConfig,
    MagnitudeConfig,
    NMConfig,
    PatternConfig,
    prune_,
)
from penjing.prune.configs import config_for
from penjing.recipes import RecipeError, parse
from penjing.recipes.schema import PRUNE


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 4))


X = torch.randn(1, 3, 8, 8)


def zeros(module: nn.Module) -> float:
    return float((module.weight == 0).float().mean())


def test_magnitude_reaches_the_sparsity_asked_in_every_layer():
    model = convnet()
    done = prune_(model, MagnitudeConfig(sparsity=0.75))
    assert set(done) == {"0", "2", "5", "7"}
    for name in done:
        w = model.get_submodule(name).weight
        assert int((w == 0).sum()) == round(0.75 * w.numel())


def test_each_config_does_what_its_function_does():
    for config, direct in [
        (NMConfig(2, 4), lambda m: pj.prune.nm_(m, 2, 4)),
        (PatternConfig("block", 0.5), lambda m: pj.prune.pattern_(m, "block", 0.5)),
        (ChannelConfig(ratio=0.5), lambda m: pj.prune.channels_(m, X, ratio=0.5)),
    ]:
        a, b = convnet(), convnet()
        prune_(a, config, X)
        direct(b)
        for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(),
                                      strict=True):
            assert na == nb and torch.equal(pa, pb), type(config).__name__


def test_layers_chosen_by_name_or_filter_and_the_rest_left_alone():
    by_name = convnet()
    prune_(by_name, MagnitudeConfig(sparsity=0.5, layers=["5"]))
    assert zeros(by_name[5]) == 0.5 and zeros(by_name[0]) == 0 and zeros(by_name[7]) == 0
    by_filter = convnet()
    prune_(by_filter, NMConfig(layers=~pj.layers.types(nn.Conv2d)))
    assert zeros(by_filter[5]) == 0.5 and zeros(by_filter[0]) == 0
    # channels: only the first conv may lose channels; the second keeps its 8
    small = convnet()
    prune_(small, ChannelConfig(ratio=0.5, layers=["0"]), X)
    assert small[0].out_channels == 4 and small[2].out_channels == 8


def test_heads_config_prunes_attention_heads():
    model = nn.Sequential(nn.MultiheadAttention(16, 4, batch_first=True))
    kept = prune_(model, HeadConfig(ratio=0.5))
    assert [len(v) for v in kept.values()] == [2]


def test_channel_pruning_needs_example_inputs_and_taylor_needs_data():
    with pytest.raises(ValueError, match="channel pruning traces the model: pass example_inputs"):
        prune_(convnet(), ChannelConfig())
    with pytest.raises(ValueError, match="criterion 'taylor' needs data"):
        prune_(convnet(), ChannelConfig(criterion="taylor"), X)
    with pytest.raises(TypeError, match="prune_ takes one of MagnitudeConfig"):
        prune_(convnet(), {"sparsity": 0.5})


@pytest.mark.parametrize("make, message", [
    (lambda: MagnitudeConfig(), "give exactly one of sparsity"),
    (lambda: MagnitudeConfig(sparsity=1.2), r"sparsity must be in \[0, 1\), got 1.2"),
    (lambda: MagnitudeConfig(sparsity=0.5, scope="net"), "scope must be one of"),
    (lambda: NMConfig(4, 2), r"0 < n < m \(2:4 by default\), got 4:2"),
    (lambda: PatternConfig("diagonal"), "pattern must be one of"),
    (lambda: ChannelConfig(round_to=0), "round_to must be a positive int"),
    (lambda: ChannelConfig(criterion="l3"), "criterion must be one of"),
    (lambda: HeadConfig(ratio=1.0), r"ratio must be a fraction .* got 1.0"),
    (lambda: MagnitudeConfig(sparsity=0.5, layers="fc1"), "layers must be None, a list"),
])
def test_a_config_refuses_a_bad_value_naming_the_field(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_the_same_mistake_reads_the_same_from_python_cli_and_recipe(capsys):
    with pytest.raises(ValueError) as python:
        config_for("block", sparsity=1.5)
    words = str(python.value)
    assert words == "sparsity must be in [0, 1), got 1.5; 0.9 keeps 10 % of weights"
    assert main(["prune", "vgg", "--data", "none", "--input-shape", "1,1,28,28",
                 "--structure", "block", "--sparsity", "1.5", "--quiet"]) == 2
    assert words in capsys.readouterr().err
    with pytest.raises(RecipeError) as recipe:
        parse("model: vgg\nstages:\n  - stage: prune\n    structure: block\n"
              "    sparsity: 1.5\n", "r.yaml")
    # the key path stands where Python names the field; the rest is word for word
    assert "stages[0] (prune).sparsity: " + words.removeprefix("sparsity ") in str(
        recipe.value)
    with pytest.raises(RecipeError) as recipe:
        parse("model: vgg\nstages:\n  - stage: prune\n    structure: nm\n    n: 4\n    m: 3\n",
              "r.yaml")
    with pytest.raises(ValueError) as python:
        NMConfig(4, 3)
    assert str(python.value) in str(recipe.value)


def test_every_config_field_is_a_recipe_key_with_the_same_default():
    """The recipe schema and the configs cannot drift apart: each prune stage takes every
    field of its config (under the same name, with the same default)."""
    for structure, config in STRUCTURES.items():
        stage = PRUNE[structure]
        for field in dataclasses.fields(config):
            if field.name in ("pattern", "structure"):  # the stage's `structure` says it
                continue
            assert field.name in stage.model_fields, (structure, field.name)
            if field.name != "layers":  # names in a recipe, a filter too in Python
                assert stage.model_fields[field.name].default == field.default, field.name
        assert "structure" in stage.model_fields and "skip" in stage.model_fields


def test_cli_skip_maps_onto_layers(capsys):
    assert main(["prune", "lenet300", "--data", "none", "--input-shape", "1,1,28,28",
                 "--structure", "weight", "--sparsity", "0.5", "--skip", "fc3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "sparsity 0.5 of weight groups on 2 layers" in out


def test_old_recipe_keys_are_read_under_their_new_names_with_a_warning():
    text = ("model: lenet300\nstages:\n  - stage: prune\n    granularity: group\n"
            "    ignored_layers: [fc3]\n  - stage: quantize\n    method: ptq\n"
            "    first: false\n    calib_batches: 2\n    per_channel: false\n")
    with pytest.warns(pj.errors.PenjingWarning) as seen:
        recipe = parse(text, "old.yaml")
    said = [str(w.message) for w in seen]
    assert len(said) == 5 and "old.yaml line 4: stages[0] (prune).granularity is now " \
        "structure; read as structure: 'group'" in said
    prune, quantize = recipe.stages
    assert prune.structure == "group" and prune.skip == ["fc3"]
    assert quantize.skip_first is True and quantize.calib_images == 128
    assert quantize.granularity == "tensor"
    # a new quantize stage's own granularity is not mistaken for a prune stage's old key
    new = parse("model: lenet300\nstages:\n  - stage: quantize\n    method: ptq\n"
                "    granularity: tensor\n", "new.yaml")
    assert new.stages[0].granularity == "tensor"


def test_deprecated_function_names_still_answer_with_a_warning():
    with pytest.warns(DeprecationWarning, match="penjing.distill.distill is now"):
        assert pj.distill.distill is pj.distill.distill_
    with pytest.warns(DeprecationWarning, match="penjing.quant.inq is now"):
        assert pj.quant.inq is pj.quant.inq_
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        pj.prune.nope  # noqa: B018



def test_cuts_reach_the_amount_asked_on_every_schedule():
    masks = pj.prune.cuts(MagnitudeConfig(sparsity=0.9), "iterative", 3)
    assert [round(c.sparsity, 4) for c in masks] == [0.5358, 0.7846, 0.9]  # 1 − 0.1^(r/3)
    agp = pj.prune.cuts(PatternConfig("block", 0.8), "agp", 4)
    assert agp[-1].sparsity == pytest.approx(0.8) and agp[0].sparsity < agp[1].sparsity
    # channels are gone after a cut: each cut removes a share of what is left
    steps = pj.prune.cuts(ChannelConfig(ratio=0.75, ratios={"0": 0.5}), "iterative", 2)
    assert [c.ratio for c in steps] == pytest.approx([0.5, 0.5])
    assert [c.ratios["0"] for c in steps] == pytest.approx([1 - 0.5 ** 0.5] * 2)
    per_layer = pj.prune.cuts(MagnitudeConfig(sparsity={"0": 0.75, "5": 0.5}), "iterative", 2)
    assert per_layer[-1].sparsity == {"0": 0.75, "5": 0.5}


def test_a_schedule_that_cannot_cut_a_config_says_why():
    with pytest.raises(ValueError, match="N:M sparsity is one pattern, cut once"):
        pj.prune.cuts(NMConfig(), "agp", 3)
    with pytest.raises(ValueError, match="rounds = 3 needs schedule 'iterative' or 'agp'"):
        pj.prune.cuts(MagnitudeConfig(sparsity=0.5), "one-shot", 3)
    with pytest.raises(ValueError, match="quality is a one-shot threshold"):
        pj.prune.cuts(MagnitudeConfig(quality=1.0), "iterative", 2)
    with pytest.raises(ValueError, match="schedule must be one of"):
        pj.prune.cuts(MagnitudeConfig(sparsity=0.5), "cubic", 2)


def test_prune_rounds_ends_exactly_at_the_target_with_fine_tuning_between_cuts():
    model = convnet()
    loader = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]
    done = pj.prune.prune_rounds_(model, pj.prune.cuts(MagnitudeConfig(sparsity=0.8),
                                                       "iterative", 3),
                                  loader, epochs=1, lr=1e-2, progress=False)
    assert len(done) == 3
    for i in (0, 2, 5, 7):
        w = model[i].weight
        assert int((w == 0).sum()) == round(0.8 * w.numel())  # trained, zeros kept
    with pytest.raises(ValueError, match="need a train_loader"):
        pj.prune.prune_rounds_(convnet(), [MagnitudeConfig(sparsity=0.5)], epochs=1)


def test_cli_prunes_on_a_schedule(capsys):
    assert main(["prune", "lenet300", "--data", "none", "--input-shape", "1,1,28,28",
                 "--structure", "weight", "--sparsity", "0.9", "--schedule", "agp",
                 "--rounds", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "sparsity 0.9 of weight groups on 3 layers, agp ×3" in out
    nonzero = next(line for line in out.splitlines() if line.startswith("non-zero params"))
    assert nonzero.split()[-1] == "0.101"  # 10 % of the weights plus the biases
    assert main(["prune", "lenet300", "--data", "none", "--input-shape", "1,1,28,28",
                 "--structure", "nm", "--schedule", "agp", "--rounds", "2", "--quiet"]) == 2
    assert "N:M sparsity is one pattern, cut once" in capsys.readouterr().err


def test_cli_prunes_by_sparsegpt_on_training_inputs(capsys):
    assert main(["prune", "lenet300", "--structure", "nm", "--method", "sparsegpt",
                 "--calib-images", "128", "--bn-batches", "0", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2:4 on 3 layers, sparsegpt on 128 training inputs" in out
    nonzero = next(line for line in out.splitlines() if line.startswith("non-zero params"))
    assert nonzero.split()[-1] == "0.501"  # (266,200 / 2 + 410 biases) / 266,610
    assert main(["prune", "lenet300", "--data", "none", "--input-shape", "1,1,28,28",
                 "--structure", "group", "--method", "wanda", "--quiet"]) == 2
    assert "--method wanda prunes single weights or N:M" in capsys.readouterr().err
