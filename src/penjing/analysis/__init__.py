"""Measurement and reporting: tables and plots of what compression did."""

from __future__ import annotations

from penjing.analysis.report import format_table, paper_table, weight_histograms

__all__ = ["format_table", "paper_table", "weight_histograms"]
