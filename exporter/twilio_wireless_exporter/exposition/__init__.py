"""Exposition: the fleet state as metric families, and the renderers of /metrics.

Data flows one way: ``families`` (per-SIM samples) and ``collector`` (the private registry of
fleet-wide and self metrics) are put side by side by ``renderer`` (incremental) or
``reference`` (stock generators); ``formats`` names the encodings the web layer negotiates.
"""
