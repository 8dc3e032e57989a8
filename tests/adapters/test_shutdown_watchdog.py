"""The drain's last resort: a process still running at the grace's end is ended."""

from __future__ import annotations

import subprocess
import sys
import time

STUCK = """
import logging, threading, time
from meshca.adapters.shutdown import start_watchdog
logging.basicConfig(level="INFO")
start_watchdog(0.3, "the stop signal")
# A non-daemon thread stuck in a call: the interpreter would wait for it at exit.
threading.Thread(target=time.sleep, args=(60,)).start()
"""


def test_the_watchdog_ends_a_process_a_stuck_thread_holds() -> None:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", STUCK], capture_output=True, text=True, timeout=30)
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert "still running 0.3s after the stop signal: exiting now" in done.stderr
    assert took < 10, took
