"""Configuration: the YAML file and the web config, validated once where they enter.

The other layers import from here only: :func:`load_config` / :func:`config_from_mapping` give a
:class:`Config`, :func:`load_web_config` / :func:`web_config_from_mapping` a :class:`WebConfig`;
every problem is a line ``field.path: what is wrong`` in a :class:`ConfigError`.
"""

from twilio_wireless_exporter.config.credentials import (
    BasicCredentials,
    Credentials,
    OAuth2Credentials,
)
from twilio_wireless_exporter.config.errors import ConfigError
from twilio_wireless_exporter.config.loading import config_from_mapping, load_config, read_yaml_file
from twilio_wireless_exporter.config.models import (
    DEFAULT_BASE_URL,
    DEFAULT_TOKEN_URL,
    KORE_BASE_URL,
    RESERVED_LABEL_NAMES,
    SIM_STATUSES,
    AuthSettings,
    Config,
    DiscoverySettings,
    MetricsSettings,
    PollSettings,
    ShardSettings,
    SimSettings,
    StateSettings,
    TwilioSettings,
)
from twilio_wireless_exporter.config.types import Size, format_duration, parse_duration
from twilio_wireless_exporter.config.web import (
    TLSSettings,
    WebConfig,
    load_web_config,
    web_config_from_mapping,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_TOKEN_URL",
    "KORE_BASE_URL",
    "RESERVED_LABEL_NAMES",
    "SIM_STATUSES",
    "AuthSettings",
    "BasicCredentials",
    "Config",
    "ConfigError",
    "Credentials",
    "DiscoverySettings",
    "MetricsSettings",
    "OAuth2Credentials",
    "PollSettings",
    "ShardSettings",
    "SimSettings",
    "Size",
    "StateSettings",
    "TLSSettings",
    "TwilioSettings",
    "WebConfig",
    "config_from_mapping",
    "format_duration",
    "load_config",
    "load_web_config",
    "parse_duration",
    "read_yaml_file",
    "web_config_from_mapping",
]
