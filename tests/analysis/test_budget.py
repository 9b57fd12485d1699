"""Budgets planned from sensitivity curves: met exactly, sensitive layers spared."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from penjing.analysis import Budget, BudgetError, SensitivityTable, plan_budget
from penjing.analysis.budget import estimate_bytes

POINTS = [0.5, 0.8, 0.9, 0.95, 0.98]


def _table(**extra) -> SensitivityTable:
    # "robust" barely notices pruning; "fragile" collapses early: the planner must see it.
    return SensitivityTable(
        "accuracy", "sparsity", "weight", 0.97, POINTS,
        {"fragile": [0.96, 0.90, 0.70, 0.40, 0.20],
         "middle": [0.97, 0.965, 0.96, 0.93, 0.75],
         "robust": [0.97, 0.97, 0.969, 0.966, 0.95]},
        {"fragile": 5_000, "middle": 25_000, "robust": 400_000}, **extra)


def _bits_table() -> SensitivityTable:
    return SensitivityTable(
        "accuracy", "bits", "kmeans", 0.97, [6, 5, 4, 3, 2],
        {"fragile": [0.97, 0.97, 0.969, 0.96, 0.93],
         "middle": [0.97, 0.97, 0.97, 0.969, 0.965],
         "robust": [0.97, 0.97, 0.97, 0.97, 0.968]},
        {"fragile": 5_000, "middle": 25_000, "robust": 400_000})


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.93, 0.95])
def test_reaches_target_sparsity_exactly(sparsity):
    plan = plan_budget(_table(), Budget(sparsity=sparsity))
    total = 430_000
    assert sum(c.pruned for c in plan.layers.values()) == round(sparsity * total)
    for c in plan.layers.values():
        assert c.pruned == round(c.sparsity * c.weights)


def test_sensitive_layers_are_pruned_less():
    plan = plan_budget(_table(), Budget(sparsity=0.9))
    s = plan.sparsities
    assert s["fragile"] < s["middle"] < s["robust"]
    # and the predicted drop beats a uniform 90 %
    uniform = sum(0.97 - _table().values[name][2] for name in s)
    assert plan.predicted_drop < uniform


def test_params_and_macs_budgets_are_met():
    plan = plan_budget(_table(), Budget(params=20_000))
    assert sum(c.weights - c.pruned for c in plan.layers.values()) == 20_000
    macs = {"fragile": 5_000 * 100, "middle": 25_000 * 10, "robust": 400_000}
    plan = plan_budget(_table(macs=macs), Budget(macs=600_000))
    left = sum(macs[n] * (1 - c.sparsity) for n, c in plan.layers.items())
    assert left == pytest.approx(600_000, rel=1e-4)
    with pytest.raises(ValueError, match="needs table.macs"):
        plan_budget(_table(), Budget(macs=1000))


def test_max_drop_is_respected_and_used():
    plan = plan_budget(_table(), Budget(max_drop=0.02))
    assert plan.predicted_drop == pytest.approx(0.02)
    assert plan.sparsity > 0.9


def test_bytes_budget_plans_sparsity_and_bits():
    plan = plan_budget(_table(), Budget(bytes=12_000), bits=_bits_table())
    est = sum(estimate_bytes(c.weights, c.sparsity, c.bits) for c in plan.layers.values())
    assert est <= 12_000
    assert plan.bits["robust"] <= plan.bits["fragile"]
    assert plan.sparsities["robust"] > plan.sparsities["fragile"]


@pytest.mark.parametrize("budget", [Budget(sparsity=0.99), Budget(params=10)])
def test_unreachable_budgets_are_clear_errors(budget):
    with pytest.raises(BudgetError, match="add larger ratios"):
        plan_budget(_table(), budget)
    with pytest.raises(BudgetError, match="bytes budget 100 is below"):
        plan_budget(_table(), Budget(bytes=100), bits=_bits_table())


def test_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="exactly one of"):
        Budget(sparsity=0.5, params=3)
    with pytest.raises(ValueError, match="exactly one of"):
        Budget()
    with pytest.raises(ValueError, match=r"in \[0, 1\), got 1.0"):
        Budget(sparsity=1.0)
    with pytest.raises(ValueError, match="plans bits too"):
        plan_budget(_table(), Budget(bytes=5000))


def test_apply_prunes_the_planned_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 100), nn.ReLU(),
                          nn.Linear(100, 80))
    table = SensitivityTable("accuracy", "sparsity", "weight", 1.0, POINTS,
                             {"0": [1, 1, .9, .8, .5], "2": [1, .9, .6, .3, .1],
                              "4": [1, 1, 1, .99, .98]},
                             {"0": 5000, "2": 5000, "4": 8000})
    plan = plan_budget(table, Budget(sparsity=0.85))
    plan.apply_(model)
    zeros = sum(int((m.weight == 0).sum()) for m in model if isinstance(m, nn.Linear))
    assert zeros == round(0.85 * 18_000)
    for name, c in plan.layers.items():
        assert int((model.get_submodule(name).weight == 0).sum()) == c.pruned


def test_schedules_end_exactly_at_the_plan():
    plan = plan_budget(_table(), Budget(sparsity=0.9))
    rounds = plan.iterative(3)
    assert len(rounds) == 3 and rounds[-1] == pytest.approx(plan.sparsities)
    for name in plan.layers:
        steps = [r[name] for r in rounds]
        assert steps == sorted(steps)
    assert plan.agp(0, 100) == dict.fromkeys(plan.layers, 0.0)
    assert plan.agp(100, 100) == plan.sparsities
    assert plan.agp(500, 100) == plan.sparsities
    mid = plan.agp(50, 100)
    assert all(0 < mid[n] < plan.sparsities[n] for n in plan.layers if plan.sparsities[n] > 0)
