"""The accuracy guard of PTQ: the most sensitive layers go back to float until the drop holds."""

from __future__ import annotations

import pytest

import penjing as pj
from penjing.errors import AccuracyGuardError, PenjingWarning
from penjing.quant import get_weight_quant, ptq, ptq_guarded
from penjing.quant.linear.config import make_config


@pytest.fixture(scope="module")
def setup(lenet5_trained):
    model, _, test, calib, _ = lenet5_trained
    return model, calib, (lambda m: pj.train.evaluate(m, test))


def _weight_quantized(q) -> set[str]:
    return {n for n, m in q.named_modules() if get_weight_quant(m, "weight") is not None}


def test_a_drop_that_holds_gives_plain_ptq(setup):
    model, calib, evaluate = setup
    guarded = ptq_guarded(model, calib, make_config(), evaluate=evaluate, max_drop=0.05)
    assert guarded.float_layers == [] and guarded.single_drops == {}
    assert guarded.metric == evaluate(ptq(model, calib, make_config()))
    assert guarded.baseline == evaluate(model)


def test_two_bit_weights_give_up_the_most_sensitive_layers_until_the_drop_holds(setup):
    model, calib, evaluate = setup
    config = make_config(bits=2)
    plain = evaluate(ptq(model, calib, config))
    guarded = ptq_guarded(model, calib, config, evaluate=evaluate, max_drop=0.01)
    assert guarded.baseline - plain > 0.01  # the unguarded result breaks the budget
    assert guarded.drop <= 0.01
    assert guarded.metric == evaluate(guarded.model)  # the figure is of the model returned
    drops = guarded.single_drops
    k = len(guarded.float_layers)
    assert 1 <= k < len(drops)
    # the layers given up are the k most sensitive, most sensitive first
    assert guarded.float_layers == sorted(drops, key=lambda n: -drops[n])[:k]
    assert _weight_quantized(guarded.model) == set(drops) - set(guarded.float_layers)
    # one fewer layer in float did not hold (or it would have stopped there)
    assert [t[0] for t in guarded.tried] == list(range(k + 1))
    assert all(guarded.baseline - metric > 0.01 for _, metric in guarded.tried[:-1])
    assert "kept in float: " + guarded.float_layers[0] in guarded.format()


def test_ptq_with_max_drop_warns_which_layers_stayed_float(setup):
    model, calib, _ = setup

    def evaluate(m):  # only conv1 costs accuracy when quantized
        return 0.9 - 0.2 * ("conv1" in _weight_quantized(m))

    with pytest.warns(PenjingWarning, match=r"kept 1 layer\(s\) in float to hold the drop "
                      r"within 0.01: conv1 \(quantized alone it cost 0.2000\)"):
        q = ptq(model, calib, make_config(), max_drop=0.01, evaluate=evaluate)
    assert _weight_quantized(q) == {"conv2", "fc1", "fc2"}


def test_a_drop_no_layer_can_hold_is_an_error_naming_the_best(setup):
    model, calib, _ = setup

    def evaluate(m):  # any quantized layer costs more than allowed
        return 0.9 - 0.1 * len(_weight_quantized(m))

    with pytest.raises(AccuracyGuardError, match=r"cannot keep the drop within 0.05.*"
                       r"best found, with 3 of 4 layers in float .* scores 0.8000"):
        ptq_guarded(model, calib, make_config(), evaluate=evaluate, max_drop=0.05)


def test_bad_guard_arguments(setup):
    model, calib, evaluate = setup
    with pytest.raises(TypeError, match="needs evaluate="):
        ptq(model, calib, max_drop=0.01)
    with pytest.raises(ValueError, match="max_drop must be a number >= 0.*got -1"):
        ptq(model, calib, max_drop=-1, evaluate=evaluate)
