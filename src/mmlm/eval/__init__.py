"""Evaluation: metrics are pure functions of predictions and references."""
