"""mpirun's ssh for the Ray launcher:

  python -m shardgrad.cluster.ray_agent [SSH OPTIONS] HOST COMMAND...

runs COMMAND in the Ray actor that stands for HOST and relays its output and exit code
(cluster/ray_launch.py has the actor). Imports cluster.commands and cluster.ray_launch.
"""

from __future__ import annotations

import sys

from shardgrad.cluster.commands import ssh_target


def main(argv: list[str] | None = None) -> int:
    try:
        host, command = ssh_target(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"shardgrad ray agent: {e}", file=sys.stderr)
        return 255
    from shardgrad.cluster.ray_launch import run_on_host

    return run_on_host(host, command)


if __name__ == "__main__":
    sys.exit(main())
