"""Local processes that the tests of every tier start (a `syncplane up`, a chart pod's container):
stopped the way a supervisor or a kubelet stops them, with a signal, then a grace period, then a kill."""

from __future__ import annotations

import signal
import subprocess

# Seconds a stopped process has to exit before it is killed: a bound, not a speed (the machine is shared).
STOP_GRACE = 30.0


def stop_process(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM, grace: float = STOP_GRACE,
                 ) -> None:
    """Send ``sig`` to ``proc`` if it still runs and wait up to ``grace`` seconds for it to exit; past
    that, kill it (SIGKILL) and reap it. A process that has already exited is left as it is."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
