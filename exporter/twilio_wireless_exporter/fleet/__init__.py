"""Accounting and state: what the exporter knows about each SIM, pure but for the state file."""
