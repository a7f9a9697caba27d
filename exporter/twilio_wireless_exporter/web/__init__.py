"""The HTTP side: the aiohttp application, its security (TLS, basic auth) and the health check."""
