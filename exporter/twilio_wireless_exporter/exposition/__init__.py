"""Exposition: the metric families and the incremental renderer of /metrics."""
