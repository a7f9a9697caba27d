"""``python -m twilio_wireless_exporter``."""

import sys

from .cli import main

sys.exit(main())
