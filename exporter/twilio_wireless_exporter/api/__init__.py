"""The Wireless REST API: one transport, the typed records, authentication and request limits."""
