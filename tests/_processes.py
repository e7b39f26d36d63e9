"""Helpers for tests that start servers and process groups as subprocesses."""

import socket
import subprocess
import time

import httpx


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 90, *,
                       show_output: bool = True) -> None:
    """Poll url/health until it answers 200; fail if the process exits first, with its output
    (show_output=False where children may outlive it and hold the pipe, so reading would hang)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError("exited before serving" +
                                 (f":\n{proc.stdout.read()}" if show_output else ""))
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)
