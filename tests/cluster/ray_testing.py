"""Helpers the real-Ray tests share: a free port for a test cluster's GCS, and polling until
something appears, bounded by a timeout."""

import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(find, timeout=60.0):
    """``find()``'s first truthy result, polled every 0.2 s; an AssertionError after
    ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"nothing found by {find.__name__} within {timeout} s")
