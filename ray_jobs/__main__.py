"""``python -m ray_jobs`` runs the ``acodm`` CLI."""

import sys

from ray_jobs.cli import console_main

sys.exit(console_main())
