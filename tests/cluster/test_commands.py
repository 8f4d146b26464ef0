"""cluster.commands: the mpirun argv builders, the ssh-style agent's argument parser, and the
failed-rank parser on mpirun's real messages. Pure: no processes."""

import pytest

from shardgrad.cluster import commands

PROGRAM = ["python", "train.py"]


def test_plain_mpirun():
    assert commands.mpirun_argv(PROGRAM, 4) == ["mpirun", "-n", "4", "python", "train.py"]
    assert commands.mpirun_argv(PROGRAM, 2, as_root=True, oversubscribe=True) == [
        "mpirun", "-n", "2", "--allow-run-as-root", "--oversubscribe", "python", "train.py"]


def test_mpirun_with_hosts_agent_and_exports():
    argv = commands.mpirun_argv(PROGRAM, 2, hosts=["a", "b", "c"], agent="my-ssh -q",
                                export=["SHARDGRAD_PROGRESS"], options=["--map-by", "node"],
                                mpirun="/opt/bin/mpirun")
    assert argv == ["/opt/bin/mpirun", "-n", "2", "--host", "a:1,b:1,c:1",
                    "--prtemca", "plm_ssh_agent", "my-ssh -q", "-x", "SHARDGRAD_PROGRESS",
                    "--map-by", "node", "python", "train.py"]


def test_ray_program_runs_in_the_launch_directory():
    argv = commands.ray_program_argv(["h0", "h1"], PROGRAM, as_root=True, wdir="/work/here",
                                     python="/py")
    assert argv == ["mpirun", "-n", "2", "--allow-run-as-root", "--host", "h0:1,h1:1",
                    "--prtemca", "plm_ssh_agent", f"/py -S {commands.AGENT}",
                    *commands.RAY_MPIRUN_OPTIONS, "--wdir", "/work/here", "python", "train.py"]
    train = commands.ray_job_argv(["h0"], "c.toml", "out", python="/py")
    assert train[-7:] == ["/py", "-m", "shardgrad", "train", "c.toml", "--out", "out"]


@pytest.mark.parametrize("argv, message", [
    (["launch", "-n", "2"], "launch needs the program to run after --"),
    (["launch", "-n", "0", "--", "python", "x.py"], "-n 0: the number of ranks"),
    (["launch", "-n", "2", "--set", "cluster.cpus_per_rank=0", "--launcher", "ray", "--",
      "python", "x.py"], "cluster.cpus_per_rank"),
])
def test_launch_usage_errors_are_one_line(argv, message, capsys):
    from shardgrad import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("shardgrad launch: error: ") and message in err


@pytest.mark.parametrize("n, hosts, match", [(0, (), "at least one"),
                                             (3, ("a", "b"), "3 hosts")])
def test_mpirun_rejects(n, hosts, match):
    with pytest.raises(ValueError, match=match):
        commands.mpirun_argv(PROGRAM, n, hosts=hosts)


def test_train_argv():
    assert commands.train_argv("c.toml", "/runs/x", python="py") == [
        "py", "-m", "shardgrad", "train", "c.toml", "--out", "/runs/x"]
    assert commands.train_argv("c.toml", "/runs/x", "/runs/x", python="py")[-2:] == [
        "--resume", "/runs/x"]


def test_ray_job_argv_puts_rank_i_on_host_i_through_the_agent():
    argv = commands.ray_job_argv(["sg-1a-0", "sg-1a-1"], "/tmp/c.toml", "/runs/x", as_root=True,
                                 export=["SHARDGRAD_PROGRESS"], python="/py")
    assert argv == ["mpirun", "-n", "2", "--allow-run-as-root", "--host", "sg-1a-0:1,sg-1a-1:1",
                    "--prtemca", "plm_ssh_agent", f"/py -S {commands.AGENT}",
                    "-x", "SHARDGRAD_PROGRESS", *commands.RAY_MPIRUN_OPTIONS,
                    "/py", "-S", commands.RANK,
                    "/py", "-m", "shardgrad", "train", "/tmp/c.toml", "--out", "/runs/x"]
    assert argv[argv.index("--map-by") + 1] == "node"
    assert "^han" in argv
    # not each rank bound to its fake node's first core: two ranks of one machine shared one
    assert argv[argv.index("--bind-to") + 1] == "none"


def test_ray_program_argv_without_hosts_starts_the_ranks_here():
    argv = commands.ray_program_argv([], ["prog"], as_root=True, export=["SHARDGRAD_PROGRESS"],
                                     ranks=3, wdir="/w")
    assert argv == ["mpirun", "-n", "3", "--allow-run-as-root", "--oversubscribe", "-x",
                    "SHARDGRAD_PROGRESS", "--wdir", "/w", "prog"]


@pytest.mark.parametrize("argv, host, command", [
    # Open MPI 5 (PRRTE): host, then the daemon's shell command in words
    (["sg-ab-1", "PRTE_PREFIX=/p;export", "PRTE_PREFIX;/p/bin/prted", "--tree-spawn"],
     "sg-ab-1", "PRTE_PREFIX=/p;export PRTE_PREFIX;/p/bin/prted --tree-spawn"),
    # MPICH's Hydra: -x first
    (["-x", "node7", "/bin/hydra_pmi_proxy", "--control-port", "h:1"],
     "node7", "/bin/hydra_pmi_proxy --control-port h:1"),
    # ssh options with values, glued values, user@host and --
    (["-o", "StrictHostKeyChecking=no", "-p", "22", "-qT", "-oBatchMode=yes", "-l", "me",
      "--", "me@n2", "echo", "hi"], "n2", "echo hi"),
])
def test_ssh_target(argv, host, command):
    assert commands.ssh_target(argv) == (host, command)


@pytest.mark.parametrize("argv", [[], ["-x"], ["host"], ["-p", "22", "host"]])
def test_ssh_target_needs_host_and_command(argv):
    with pytest.raises(ValueError, match="HOST COMMAND"):
        commands.ssh_target(argv)


KILLED = """\
[vm:00000] *** An error occurred in Socket closed
[vm:00000] *** reported by process [1429536769,0]
rank 0 failed: Exception: MPI_ERR_OTHER
--------------------------------------------------------------------------
prterun noticed that process rank 1 with PID 820 on node vm exited on
signal 9 (Killed).
--------------------------------------------------------------------------
"""
EXITED = """\
prterun detected that one or more processes exited with non-zero status,
thus causing the job to be terminated. The first process to do so was:

   Process name: [prterun-vm-13325@1,1]
   Exit code:    3
"""
RAISED = """\
rank 1 failed: InjectedFault: injected fault at step 30 (debug.fail_at_step=30, ...)
--------------------------------------------------------------------------
MPI_ABORT was invoked on rank 1 in communicator MPI_COMM_WORLD
  Proc: [[58766,1],1]
  Errorcode: 1
prterun has exited due to process rank 1 with PID 0 on node vm calling
"abort". This may have caused other processes in the application to be
"""


@pytest.mark.parametrize("output, rank", [
    (KILLED, 1), (EXITED, 1), (RAISED, 1),
    ("rank 3 failed: CommError: allreduce(sum) of 8 bytes on rank 3 did not complete", 3),
    ("MPI_ABORT was invoked on rank 2 in communicator MPI_COMM_WORLD", 2),
    ("all good\n", None),
    # the peer that waited aborts (and is named by prterun), the hung or killed rank is meant
    ("rank 0 failed: CommError: allreduce(sum) of 8 bytes on rank 0 did not complete within "
     "3 s (parallel.timeout_s): rank 2 hangs: no heartbeat from its pid 9 for 3.8 s\n"
     "prterun has exited due to process rank 0 with PID 0 on node vm calling", 2),
    ("rank 1 was killed by SIGKILL (pid 7)\nprterun has exited due to process rank 0 with "
     "PID 0 on node vm calling", 1),
    ("rank 3 was terminated by SIGTERM\nMPI_ABORT was invoked on rank 3", 3),
])
def test_failed_rank(output, rank):
    assert commands.failed_rank(output) == rank


def test_ray_ranks_on_one_node_share_one_daemon():
    # all ranks under the one host's daemon (shared memory between them, not TCP), by slot
    argv = commands.ray_job_argv(["sg-1a-0"], "/tmp/c.toml", "/runs/x", ranks=3, python="/py")
    assert argv[argv.index("-n") + 1] == "3"
    assert argv[argv.index("--host") + 1] == "sg-1a-0:3"
    assert argv[argv.index("--map-by") + 1] == "slot" and argv.count("--map-by") == 1
    assert argv[argv.index("--bind-to") + 1] == "none"
