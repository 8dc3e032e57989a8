"""``python -m meshca``."""

import sys

from meshca.cli import main

sys.exit(main())
