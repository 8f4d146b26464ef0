"""mpirun's ssh for the Ray launcher:

  python -S .../shardgrad/cluster/ray_agent.py [SSH OPTIONS] HOST COMMAND...

runs COMMAND in the Ray actor that stands for HOST (cluster/ray_launch.py's ``Host``) and
relays its output and exit code over a TCP connection to the actor, whose address and the
job's token the launcher puts in SHARDGRAD_RAY_HOSTS for mpirun. Imports only the standard
library and is run by path: one agent starts per host, and importing shardgrad and ray and
joining the cluster as a driver took each agent 2-3 s, before any rank could start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence

# A frame from the actor: the stream (1 stdout, 2 stderr, 0 the exit code) and the length of
# the bytes that follow (for stream 0: the command's exit code, negative for a signal).
FRAME = struct.Struct("!Bi")
HOSTS_VARIABLE = "SHARDGRAD_RAY_HOSTS"

# ssh options that take a value (OpenSSH's getopt string, the letters followed by ':').
_SSH_VALUE_OPTIONS = set("BbcDEeFIiJLlmOoPpRSWw")


def ssh_target(argv: Sequence[str]) -> tuple[str, str]:
    """``(host, command)`` from the arguments an ssh-style agent gets: options first (``-x``,
    ``-T``, ``-o Key=Value``, ``-p 22``, ...), then the host, then the command words, joined by
    spaces for the remote shell as ssh does."""
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
        flags = argv[i][1:]
        for j, flag in enumerate(flags):
            if flag in _SSH_VALUE_OPTIONS:
                i += 1 if j + 1 < len(flags) else 2
                break
        else:
            i += 1
    if i < len(argv) and argv[i] == "--":
        i += 1
    if len(argv) - i < 2:
        raise ValueError(f"expected [OPTIONS] HOST COMMAND..., got {' '.join(argv)!r}")
    host = argv[i].rpartition("@")[2]
    return host, " ".join(argv[i + 1:])


def _exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def relay(sock: socket.socket) -> int | None:
    """Copy the actor's frames to our stdout and stderr; the command's exit code, or None when
    the connection ended first (the actor died)."""
    sinks = {1: sys.stdout.buffer, 2: sys.stderr.buffer}
    while True:
        head = _exactly(sock, FRAME.size)
        if head is None:
            return None
        stream, n = FRAME.unpack(head)
        if stream == 0:
            return n
        data = _exactly(sock, n)
        if data is None:
            return None
        sinks[stream].write(data)
        sinks[stream].flush()


def _say(message: str) -> None:
    print(f"shardgrad ray agent: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command; its exit code (128 + N for signal N), or 255 (ssh's code for a lost
    connection) when the host's actor cannot be reached or dies. SIGTERM, SIGHUP and SIGINT
    close the connection, which makes the actor kill the command."""
    try:
        host, command = ssh_target(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        _say(str(e))
        return 255
    # Read here, not through runtime.config: that would import shardgrad (see the docstring).
    try:
        job = json.loads(os.environ[HOSTS_VARIABLE])
        address = job["hosts"][host]
    except (KeyError, ValueError):
        _say(f"no Ray actor stands for host {host!r} in {HOSTS_VARIABLE} (the Ray launcher "
             f"sets it for mpirun)")
        return 255

    def interrupted(sig, frame):
        raise SystemExit(128 + sig)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, interrupted)
    try:
        sock = socket.create_connection(tuple(address), timeout=30)
    except OSError as e:
        _say(f"cannot reach the Ray actor of host {host} at {address[0]}:{address[1]}: {e}")
        return 255
    with sock:
        sock.settimeout(None)
        sock.sendall(json.dumps({"token": job["token"], "command": command}).encode() + b"\n")
        code = relay(sock)
    if code is None:
        _say(f"host {host}: the connection to its Ray actor was lost (the actor died)")
        return 255
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
