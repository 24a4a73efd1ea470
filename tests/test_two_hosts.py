"""Two machines for real: two network namespaces joined by a veth pair, each with its own address
and host name, and MPICH's mpiexec starting one rank on each over TCP. Where it would log in to the
other machine with ssh, it runs a small launcher script that enters the other namespace instead.

2 ranks on two hosts train bit for bit what 2 ranks on one host train, and a rank killed or hung on
the other host ends the job with a message naming it. The namespaces need root and `ip` (CI runs as root);
without them the tests skip. Only the namespaces' own addresses are used (10.77.0.1 and 10.77.0.2,
on a link no other network sees), and the namespaces are removed even when a test fails."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoint import load_checkpoint
from distributed import EXIT_RANK_LOST
from helpers import (MPI_ENV, MPIEXEC, mpi_flavour, needs_mpi, newest_checkpoint_resumes, numbers, same_arrays,
                     tiny_flags, wait_for_rank_pid, wait_for_steps, wait_until)
from helpers import data  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parent.parent
HOSTS = {"10.77.0.1": "hostA", "10.77.0.2": "hostB"}  # address: host name; the first is where mpiexec runs
# MPICH's network layer over libfabric's TCP provider. By default it finds that both "machines" share one
# kernel and passes the data through shared memory, never the link (checked: 15 KB on the link for a
# 10 MB Allreduce, against 10 MB with these)
TCP_ENV = dict(MPI_ENV, MPIR_CVAR_CH4_NETMOD="ofi", FI_PROVIDER="tcp")
LAUNCHER = """#!/bin/sh
# What ssh does for mpiexec, between namespaces: called as `launcher [options] HOST COMMAND`, runs
# COMMAND (one string for a shell, as ssh passes it) on HOST, that is in its namespace, under its name.
while [ "${1#-}" != "$1" ]; do shift; done
host=$1
shift
case $host in
%s
  *) echo "launcher: unknown host $host" >&2; exit 1 ;;
esac
exec ip netns exec "$ns" unshare --uts sh -c "hostname $name && exec $*"
"""


def sh(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


class Hosts:
    """Two namespaces (two "machines"), a launcher script for mpiexec, and how to start a job on them."""

    def __init__(self, tmp):
        tag = f"npg{os.getpid() % 100000}"  # names of this run alone (a veth name has at most 15 characters)
        self.ns = {addr: f"{tag}{name[-1]}" for addr, name in HOSTS.items()}
        self.veth = {addr: f"{tag}v{name[-1]}" for addr, name in HOSTS.items()}
        self.launcher = tmp / "launcher.sh"
        cases = "\n".join(f"  {addr}) ns={self.ns[addr]}; name={name} ;;" for addr, name in HOSTS.items())
        self.launcher.write_text(LAUNCHER % cases)
        self.launcher.chmod(0o755)

    def create(self):
        """Build the namespaces and the link between them; the error of the first step that fails, or None."""
        (a, ns_a), (b, ns_b) = self.ns.items()
        steps = [("netns", "add", ns_a), ("netns", "add", ns_b),
                 ("link", "add", self.veth[a], "type", "veth", "peer", "name", self.veth[b])]
        for addr, ns in self.ns.items():
            steps += [("link", "set", self.veth[addr], "netns", ns), ("-n", ns, "addr", "add", f"{addr}/24", "dev",
                      self.veth[addr]), ("-n", ns, "link", "set", "lo", "up"),
                      ("-n", ns, "link", "set", self.veth[addr], "up")]
        for step in steps:
            r = sh("ip", *step)
            if r.returncode:
                return f"ip {' '.join(step)}: {r.stderr.strip()}"
        return None

    def remove(self):
        """End every process left in the namespaces (this test's own), then remove them (and the link)."""
        for pid in self.processes():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        for ns in self.ns.values():
            sh("ip", "netns", "del", ns)
        sh("ip", "link", "del", next(iter(self.veth.values())))  # gone with its namespace, unless that failed

    def processes(self):
        """The pids of the processes still running in the namespaces."""
        return [pid for ns in self.ns.values() for pid in sh("ip", "netns", "pids", ns).stdout.split()]

    def wait_until_idle(self, ranks, timeout=10):
        """Wait until the ranks' processes have ended (their files closed: the save_dir's lock dropped) and no
        process is left on either host (an AssertionError after timeout seconds). mpiexec may return while a
        killed rank is still exiting."""
        wait_until(lambda: not any(running(pid) for pid in ranks) and not self.processes(), timeout,
                   "the end of the job's processes", poll=0.1)

    def bytes_sent(self, addr):
        """Bytes the host at addr has sent over its link so far."""
        out = sh("ip", "-n", self.ns[addr], "-s", "-j", "link", "show", "dev", self.veth[addr]).stdout
        return json.loads(out)[0]["stats64"]["tx"]["bytes"]

    def popen(self, argv):
        """mpiexec on the first host, one rank of train.py on each host."""
        first, name = next(iter(HOSTS.items()))
        cmd = ["ip", "netns", "exec", self.ns[first], "unshare", "--uts", "sh", "-c", f'hostname {name} && exec "$@"',
               "sh", MPIEXEC, "-launcher", "ssh", "-launcher-exec", str(self.launcher),
               "-hosts", ",".join(f"{addr}:1" for addr in HOSTS), "-n", "2", sys.executable, "train.py", *argv]
        return subprocess.Popen(cmd, cwd=REPO, env=TCP_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)


def running(pid):
    """Whether a thread of process pid is still running or exiting: the process's files (and so the
    save_dir's lock) are closed when its last thread ends, which can be after its first is a zombie."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    return True
        except OSError:
            pass
    return False


def why_no_namespaces():
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command here"
    if MPIEXEC is None or mpi_flavour() != "mpich":
        return "needs MPICH's mpiexec (its launcher is pointed at the namespaces)"
    return None


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = why_no_namespaces()
    if reason:
        pytest.skip(reason)
    h = Hosts(tmp_path_factory.mktemp("hosts"))
    try:
        error = h.create()
        if error:
            pytest.skip(f"cannot make network namespaces here ({error})")
        yield h
    finally:
        h.remove()


def run(proc, timeout=120):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, out + err  # MPICH sends the ranks' stderr to stdout


@needs_mpi
def test_two_ranks_on_two_hosts_train_bit_for_bit_what_two_ranks_on_one_host_train(hosts, data, tmp_path):
    """--workers 1: a rank alone on its machine gets all its cores and by default as many workers,
    whose partial sums then round otherwise than one worker's."""
    flags = dict(max_steps=30, log_interval=5, eval_interval=10, save_interval=10, batch_size=7,  # 4 + 3 rows
                 workers=1)
    one_host, two_hosts = str(tmp_path / "one_host"), str(tmp_path / "two_hosts")
    local = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "train.py", *tiny_flags(data, one_host, **flags)],
                           cwd=REPO, env=MPI_ENV, capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stdout + local.stderr
    sent = hosts.bytes_sent("10.77.0.1")
    rc, output = run(hosts.popen(tiny_flags(data, two_hosts, **flags)))
    assert rc == 0, output
    assert "2 MPI ranks on 2 machines (rank=pid: hostA: 0=" in output and "; hostB: 1=" in output, output
    assert numbers(two_hosts) == numbers(one_host)
    # the gradient sums crossed the link: in each of the 30 steps' Allreduce, rank 0 sends at least
    # half of the gradients (float32) to rank 1
    n_params = sum(a.size for a in load_checkpoint(os.path.join(two_hosts, "checkpoint_final.npz")).params.values())
    assert hosts.bytes_sent("10.77.0.1") - sent > 30 * 4 * n_params / 2
    same_arrays(os.path.join(two_hosts, "checkpoint_final.npz"), os.path.join(one_host, "checkpoint_final.npz"))


@needs_mpi
def test_a_rank_killed_on_the_other_host_ends_the_job_naming_it(hosts, data, tmp_path):
    """kill -9 of rank 1, on hostB: mpiexec's proxy there sees it die, and mpiexec ends the job at once
    naming the pid and the host; rank 0's first log line maps the pid to rank 1 on hostB."""
    save_dir = str(tmp_path / "ck")
    proc = hosts.popen(tiny_flags(data, save_dir, max_steps=1_000_000, log_interval=50, eval_interval=0,
                                  save_interval=50))
    try:
        pid = wait_for_rank_pid(save_dir, 1)
        wait_for_steps(save_dir, 120)  # checkpoints at steps 50 and 100 written, the run going on
        os.kill(pid, signal.SIGKILL)
        t = time.monotonic()
        rc, output = run(proc, timeout=60)
    finally:
        proc.kill()
    assert rc != 0 and time.monotonic() - t < 30
    assert f"hostB: 1={pid}" in output, output
    assert f"PID {pid} RUNNING AT 10.77.0.2" in output, output
    hosts.wait_until_idle([wait_for_rank_pid(save_dir, 0), pid])
    newest_checkpoint_resumes(data, save_dir)


@needs_mpi
def test_a_rank_hung_on_the_other_host_ends_the_job_after_rank_timeout(hosts, data, tmp_path):
    """A rank that stops answering on hostB (SIGSTOP; a machine off the network looks the same): no launcher
    notices, and rank 0 cannot see the other machine's processes, so its watchdog ends the job naming the
    ranks elsewhere and the checkpoint to resume from. Ends the job: had rank 0 only exited, mpiexec
    would wait for the stopped rank on the other machine forever."""
    save_dir = str(tmp_path / "ck")
    proc = hosts.popen(tiny_flags(data, save_dir, max_steps=1_000_000, log_interval=50, eval_interval=0,
                                  save_interval=50, rank_timeout=2))
    try:
        pid = wait_for_rank_pid(save_dir, 1)
        wait_for_steps(save_dir, 120)
        os.kill(pid, signal.SIGSTOP)
        t = time.monotonic()
        rc, output = run(proc, timeout=60)
    finally:
        proc.kill()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert rc == EXIT_RANK_LOST and 2 <= time.monotonic() - t < 30
    hosts.wait_until_idle([wait_for_rank_pid(save_dir, 0), pid])
    newest = newest_checkpoint_resumes(data, save_dir)
    assert ("error: no answer from the other ranks for 2 s: one of ranks 1, on other machines, died or hangs, "
            f"so the MPI job stops (seen by rank 0). Resume from {newest}") in output, output
