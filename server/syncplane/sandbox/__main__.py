"""``python -m syncplane.sandbox`` — run both emulators until interrupted."""

import sys

from syncplane.sandbox.server import main

sys.exit(main())
