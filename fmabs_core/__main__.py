"""``python -m fmabs_core``: the ``fmabs`` command, as jobs and the Slicer module launch it.

Leaves with ``os._exit`` after flushing: the interpreter's teardown with torch and MONAI loaded
takes seconds on a busy machine and a finished command has nothing left to clean up, so a cancelled
job is seen gone about as soon as its run is cancelled.
"""

import logging
import os
import sys

from fmabs_core.cli import main

if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
