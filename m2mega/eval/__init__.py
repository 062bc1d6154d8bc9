"""Evaluation metrics (accuracy, VSI-Bench MRA, per-task tables)."""

from .metrics import (
    MRA_THRESHOLDS,
    accuracy,
    aggregate,
    benchmark_averages,
    format_table,
    mean_relative_accuracy,
    mra_from_text,
)

GENERAL_BENCHMARKS = ("MathVista", "MathVision", "MathVerse", "DynaMath", "WeMath", "LogicVista")
SPATIAL_BENCHMARKS = ("CV-Bench", "VSI-Bench")

__all__ = [
    "GENERAL_BENCHMARKS",
    "MRA_THRESHOLDS",
    "SPATIAL_BENCHMARKS",
    "accuracy",
    "aggregate",
    "benchmark_averages",
    "format_table",
    "mean_relative_accuracy",
    "mra_from_text",
]
