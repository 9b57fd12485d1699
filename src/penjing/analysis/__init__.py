"""Measurement and reporting: tables and plots of what compression did, sensitivity
sweeps and the per-layer budgets planned from them, and 95 % intervals of accuracies."""

from __future__ import annotations

from penjing.analysis.budget import Budget, BudgetError, Plan, plan_budget
from penjing.analysis.intervals import (
    Interval,
    accuracy_interval,
    correct,
    mean_sd,
    paired_difference,
    verdict,
    wilson,
)
from penjing.analysis.report import format_table, paper_table, weight_histograms
from penjing.analysis.sensitivity import EvaluateError, SensitivityTable, sensitivity
from penjing.core.counting import count_macs, count_params, latency

__all__ = [
    "Budget",
    "BudgetError",
    "EvaluateError",
    "Interval",
    "Plan",
    "SensitivityTable",
    "accuracy_interval",
    "correct",
    "count_macs",
    "count_params",
    "format_table",
    "latency",
    "mean_sd",
    "paired_difference",
    "paper_table",
    "plan_budget",
    "sensitivity",
    "verdict",
    "weight_histograms",
    "wilson",
]
