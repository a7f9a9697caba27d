"""Prometheus exporter for Twilio / KORE Programmable Wireless data sessions."""

__version__ = "0.1.0"

__all__ = ["__version__"]
