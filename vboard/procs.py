"""Stopping the processes the harness starts (brokers, fleets), one way everywhere."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float, group: bool = False
) -> None:
    """SIGTERM and wait up to `timeout` s, then SIGKILL. group=True signals the process's whole
    process group (it was started with start_new_session=True), children included."""
    if proc.poll() is not None:
        return

    def send(sig: signal.Signals) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()
