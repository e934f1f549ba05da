"""One `edgekd compress` for the fault suite, through the CLI's own error handling.

argv: the compress arguments. EDGEKD_KILL_AT / EDGEKD_FAULT_TRACE (edgekd.faults) pick a kill
point; EDGEKD_TEST_FSIZE limits the size of any file this process writes (RLIMIT_FSIZE, with
SIGXFSZ ignored so a write past it fails with EFBIG, as a full disk fails with ENOSPC)."""

import os
import resource
import signal
import sys

limit = os.environ.get("EDGEKD_TEST_FSIZE")
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))

from edgekd.cli import main  # noqa: E402

sys.exit(main(["compress", *sys.argv[1:]]))
