"""Polling: when each SIM is read, and which SIMs this replica owns."""
