"""Configuration: the YAML file and the web config, validated once where they enter.

What the other layers use is here: :func:`load_config` / :func:`config_from_mapping` give a
:class:`Config`, :func:`load_web_config` / :func:`web_config_from_mapping` a :class:`WebConfig`;
every problem is a line ``field.path: what is wrong`` in a :class:`ConfigError`.
"""

from twilio_wireless_exporter.config.credentials import BasicCredentials, OAuth2Credentials
from twilio_wireless_exporter.config.errors import ConfigError
from twilio_wireless_exporter.config.loading import config_from_mapping, load_config
from twilio_wireless_exporter.config.models import (
    RESERVED_LABEL_NAMES,
    SIM_STATUSES,
    Config,
    ShardSettings,
)
from twilio_wireless_exporter.config.web import WebConfig, load_web_config, web_config_from_mapping

__all__ = [
    "RESERVED_LABEL_NAMES",
    "SIM_STATUSES",
    "BasicCredentials",
    "Config",
    "ConfigError",
    "OAuth2Credentials",
    "ShardSettings",
    "WebConfig",
    "config_from_mapping",
    "load_config",
    "load_web_config",
    "web_config_from_mapping",
]
