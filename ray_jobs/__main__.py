"""``python -m ray_jobs`` runs the ``acodm`` CLI."""

import sys

from ray_jobs.cli import main

sys.exit(main())
