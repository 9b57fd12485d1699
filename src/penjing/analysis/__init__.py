"""Measurement and reporting: tables and plots of what compression did, sensitivity
sweeps and the per-layer budgets planned from them."""

from __future__ import annotations

from penjing.analysis.budget import Budget, BudgetError, Plan, plan_budget
from penjing.analysis.report import format_table, paper_table, weight_histograms
from penjing.analysis.sensitivity import EvaluateError, SensitivityTable, sensitivity

__all__ = [
    "Budget",
    "BudgetError",
    "EvaluateError",
    "Plan",
    "SensitivityTable",
    "format_table",
    "paper_table",
    "plan_budget",
    "sensitivity",
    "weight_histograms",
]
