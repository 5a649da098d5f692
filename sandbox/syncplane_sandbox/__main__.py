"""``python -m syncplane_sandbox`` — run both emulators until interrupted."""

import sys

from syncplane_sandbox.server import main

sys.exit(main())
