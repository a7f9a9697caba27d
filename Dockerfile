# syntax=docker/dockerfile:1
# twilio-wireless-exporter: Prometheus exporter for Twilio Programmable Wireless.
#
#   docker build -t twilio-wireless-exporter .
#   (without Docker or a registry, on a base made from Debian packages: .ci/image-smoke)
#   docker run --rm -p 10311:10311 twilio-wireless-exporter --demo --web.listen-address :10311
#   docker run --rm -p 10311:10311 \
#       -v "$PWD/config.yaml:/etc/twilio-wireless-exporter/config.yaml:ro" \
#       -e TWILIO_ACCOUNT_SID -e TWILIO_AUTH_TOKEN twilio-wireless-exporter
#
# Configuration: /etc/twilio-wireless-exporter/config.yaml (see config.example.yaml, shipped
# next to it). Secrets: environment (TWILIO_ACCOUNT_SID + TWILIO_AUTH_TOKEN, or TWILIO_API_KEY +
# TWILIO_API_SECRET) or files such as Docker/Kubernetes secrets under /run/secrets referenced by
# the *_file options. Nothing secret is baked into the image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the package and its dependencies into a virtual environment -------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md config.example.yaml ./
COPY exporter ./exporter
# pip reads an optional pip.conf given as a build secret (an index mirror, a proxy's CA path),
# never stored in a layer: `--secret id=pip.conf,src=FILE`; without it, pip's defaults apply.
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf,required=false \
    /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/twilio-wireless-exporter --version

# --- runtime: the virtual environment only, run as an unprivileged user ----------------------
FROM ${PYTHON_IMAGE}
# A numeric, unprivileged user (USER below) that Kubernetes can verify for runAsNonRoot.
RUN groupadd --system --gid 10311 exporter \
    && useradd --system --uid 10311 --gid exporter --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin exporter \
    && mkdir -p /etc/twilio-wireless-exporter
COPY --from=build /opt/venv /opt/venv
COPY config.example.yaml /etc/twilio-wireless-exporter/config.example.yaml
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10311:10311
EXPOSE 10311
# The health check asks /-/healthy over HTTP, then HTTPS when --web.config.file turns TLS on; a
# 401 from basic auth counts as alive (no password needed). It assumes the default port: with
# another --web.listen-address, give the check that address as its argument.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-m", "twilio_wireless_exporter.web.healthcheck", "127.0.0.1:10311"]
ENTRYPOINT ["twilio-wireless-exporter"]
CMD ["--config", "/etc/twilio-wireless-exporter/config.yaml", "--web.listen-address", ":10311"]
