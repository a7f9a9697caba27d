"""Configuration: the YAML file and the web config, validated once where they enter."""
