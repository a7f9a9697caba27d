"""``python -m twilio_wireless_exporter``."""

import sys

from twilio_wireless_exporter.cli import main

sys.exit(main())
