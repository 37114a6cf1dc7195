"""A real two-node job on one machine (issue 13). Each node is a network namespace this module creates (and deletes),
with its own address on a veth pair between the two and nothing else but loopback, so rendezvous and collectives can
only cross that link. The ranks start the way a cluster with a hostfile starts them: the `deepspeed` launcher on node
0 reads the hostfile and runs pdsh, which ssh-es into an sshd inside each namespace. Then node 1's rank is killed
mid-run: node 0 must exit within the collective timeout, and `--resume` must finish the run.

Skipped, with the reason, where the machine cannot (not root, no network namespaces, pdsh/sshd not installable)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, default_sigint, free_port, launcher_env, tiny_train_config
from test_reliability import wait_for_steps

from ds_pld.checkpoints import read_checkpoint_meta
from ds_pld.training.metrics import read_metrics

pytestmark = pytest.mark.slow

TRAIN = str(ROOT / "launch" / "train.py")
CLUSTER = ROOT / "tests" / "cluster"
LINK = "pld0"  # the veth end's name inside each namespace: GLOO_SOCKET_IFNAME names the only link gloo may use
COLLECTIVE_TIMEOUT_S = 60  # DS_PLD_DIST_TIMEOUT_S on both nodes: how long a rank waits for a dead peer
MAX_STEPS = 120
CHECKPOINT_EVERY = 20
HANG_GUARD_S = 600  # only against a hang


@dataclass(frozen=True)
class Node:
    netns: str
    address: str


@dataclass(frozen=True)
class TwoNodes:
    """Two namespaces joined by a veth pair, an sshd in each, a hostfile naming both and the environment that makes
    pdsh/ssh use this module's key (never the user's ~/.ssh)."""

    nodes: tuple[Node, Node]
    state: Path

    @property
    def hostfile(self) -> Path:
        return self.state / "hostfile"

    def launcher_env(self) -> dict[str, str]:
        env = launcher_env()
        env["PDSH_SSH_ARGS_APPEND"] = (f"-F /dev/null -i {self.state / 'id'} -o IdentitiesOnly=yes "
                                       "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
        env["DS_ENV_FILE"] = str(self.state / "ds_env")  # DeepSpeed exports its lines on every node
        return env

    def start(self, config: Path, out: Path, log: Path, *flags: str) -> subprocess.Popen:
        """`deepspeed --hostfile ... train.py` on node 0, in its own session."""
        cmd = ["ip", "netns", "exec", self.nodes[0].netns, sys.executable, "-m", "deepspeed.launcher.runner",
               "--hostfile", str(self.hostfile), "--launcher", "pdsh", "--no_ssh_check",
               "--master_addr", self.nodes[0].address, "--master_port", str(free_port()),
               TRAIN, "--deepspeed_config", str(config), "--output_dir", str(out), *flags]
        with open(log, "w") as handle:
            return subprocess.Popen(cmd, cwd=ROOT, env=self.launcher_env(), stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=default_sigint)

    def ranks(self, node: Node) -> list[psutil.Process]:
        """The training processes running inside `node`'s namespace."""
        pids = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True).stdout.split()
        ranks = []
        for pid in pids:
            try:
                proc = psutil.Process(int(pid))
                cmdline = proc.cmdline()
            except psutil.Error:
                continue
            if any(arg.startswith("--local_rank") for arg in cmdline) and not any("deepspeed.launcher" in arg
                                                                                   for arg in cmdline):
                ranks.append(proc)  # the rank itself, not the pdsh/ssh/launcher processes that carry its command
        return ranks


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)


def subnet() -> str:
    """A 10.x.y.0/24 of this process's own, so parallel runs of the suite do not collide."""
    return f"10.{200 + os.getpid() % 50}.{os.getpid() // 50 % 250}"


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[TwoNodes]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces and sshd need root")
    install = subprocess.run(["bash", str(CLUSTER / "install_ssh.sh")], capture_output=True, text=True, timeout=600)
    if install.returncode != 0:
        pytest.skip(f"cannot install pdsh/openssh-server: {(install.stderr or install.stdout).strip()[-500:]}")
    tag = f"dspld{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", f"{tag}a"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()}")
    state = Path(tempfile.mkdtemp(prefix="dspld-2n-", dir="/tmp"))
    nodes = (Node(f"{tag}a", f"{subnet()}.1"), Node(f"{tag}b", f"{subnet()}.2"))
    sshds: list[subprocess.Popen] = []
    try:
        sh("ip", "netns", "add", nodes[1].netns)
        sh("ip", "link", "add", f"{tag}x", "type", "veth", "peer", "name", f"{tag}y")
        for node, end in zip(nodes, (f"{tag}x", f"{tag}y")):
            sh("ip", "link", "set", end, "netns", node.netns)
            sh("ip", "-n", node.netns, "link", "set", end, "name", LINK)
            sh("ip", "-n", node.netns, "addr", "add", f"{node.address}/24", "dev", LINK)
            sh("ip", "-n", node.netns, "link", "set", LINK, "up")
            sh("ip", "-n", node.netns, "link", "set", "lo", "up")
        for name in ("id", "host_key"):
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(state / name))
        shutil.copy(state / "id.pub", state / "authorized_keys")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
        for i, node in enumerate(nodes):
            sshds.append(subprocess.Popen(
                ["ip", "netns", "exec", node.netns, shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-f", "/dev/null",
                 "-E", str(state / f"sshd{i}.log"), "-o", f"ListenAddress={node.address}",
                 "-o", f"HostKey={state / 'host_key'}", "-o", f"AuthorizedKeysFile={state / 'authorized_keys'}",
                 "-o", "PermitRootLogin=prohibit-password", "-o", "StrictModes=no", "-o", "UsePAM=no",
                 "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
                 "-o", f"PidFile={state / f'sshd{i}.pid'}"]))
        (state / "hostfile").write_text("".join(f"{node.address} slots=1\n" for node in nodes))
        (state / "ds_env").write_text(
            f"PATH={os.environ['PATH']}\nOMP_NUM_THREADS=1\nGLOO_SOCKET_IFNAME={LINK}\n"
            f"DS_PLD_DIST_TIMEOUT_S={COLLECTIVE_TIMEOUT_S}\nWANDB_MODE=offline\nWANDB_SILENT=true\n")
        cluster = TwoNodes(nodes, state)
        deadline = time.monotonic() + 30
        while True:  # both sshd answer through pdsh, from node 0, as the launcher will ask them
            check = subprocess.run(["ip", "netns", "exec", nodes[0].netns, "pdsh", "-S", "-R", "ssh", "-w",
                                    ",".join(n.address for n in nodes), "ip -br addr"],
                                   env=cluster.launcher_env(), capture_output=True, text=True, timeout=60)
            if check.returncode == 0 and all(f"{n.address}: " in check.stdout for n in nodes):
                break
            assert time.monotonic() < deadline, f"sshd did not come up in the namespaces:\n{check.stderr}"
            time.sleep(0.5)
        for node in nodes:  # each node sees loopback and the link, nothing else
            lines = [line.split(":", 1)[1].split() for line in check.stdout.splitlines()
                     if line.startswith(f"{node.address}: ")]
            assert {words[0].split("@")[0] for words in lines if words} == {"lo", LINK}, check.stdout
        yield cluster
    finally:
        for sshd in sshds:
            sshd.terminate()
        for sshd in sshds:
            try:
                sshd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                sshd.kill()
        for node in nodes:
            for pid in subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True,
                                      text=True).stdout.split():
                try:
                    psutil.Process(int(pid)).kill()
                except psutil.Error:
                    pass
            subprocess.run(["ip", "netns", "del", node.netns], capture_output=True)  # takes the veth pair with it
        shutil.rmtree(state, ignore_errors=True)


def peers(node: Node, rank: psutil.Process) -> set[str]:
    """Remote addresses of the rank's established TCP connections, as `ss` sees them inside the rank's namespace
    (psutil would read the sockets table of this process's namespace instead)."""
    table = subprocess.run(["ip", "netns", "exec", node.netns, "ss", "-tnpH", "state", "established"],
                           capture_output=True, text=True, check=True).stdout
    hosts = {line.split()[3].rsplit(":", 1)[0] for line in table.splitlines() if f"pid={rank.pid}," in line}
    return {host.strip("[]").removeprefix("::ffff:") for host in hosts}  # IPv4-mapped IPv6 as plain IPv4


def test_two_node_job_survives_a_dead_node_and_resumes(two_nodes, prepared, tmp_path):
    node0, node1 = two_nodes.nodes
    config = tiny_train_config(tmp_path / "config.json", prepared,
                               {"max_steps": MAX_STEPS, "checkpoint_every": CHECKPOINT_EVERY, "eval_every": 10**6},
                               wandb={"enabled": False})
    out, log = tmp_path / "run", tmp_path / "first.log"
    launcher = two_nodes.start(config, out, log)
    try:
        wait_for_steps(out, 2 * CHECKPOINT_EVERY + 5, launcher, log)
        ranks0, ranks1 = two_nodes.ranks(node0), two_nodes.ranks(node1)
        assert len(ranks0) == 1 and len(ranks1) == 1, (ranks0, ranks1)
        # the collectives cross the veth link: node 0's rank talks to node 1's address, and to nothing outside
        remote = peers(node0, ranks0[0])
        assert node1.address in remote, remote
        assert remote <= {node0.address, node1.address}, remote
        ranks1[0].send_signal(signal.SIGKILL)  # node 1's rank dies without a word, like a node going down
        killed = time.monotonic()
        rc = launcher.wait(timeout=HANG_GUARD_S)
        waited = time.monotonic() - killed
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    text = log.read_text()
    print(f"node 0 gave up {waited:.1f} s after node 1's rank died (collective timeout {COLLECTIVE_TIMEOUT_S} s)")
    assert rc != 0, text[-3000:]
    assert waited < COLLECTIVE_TIMEOUT_S, f"node 0 took {waited:.0f} s to give up:\n{text[-3000:]}"
    assert not two_nodes.ranks(node0) and not two_nodes.ranks(node1), "a rank outlived the job"
    assert f"world size 2, master {node0.address}:" in text, text[-3000:]
    meta = read_checkpoint_meta(out / "checkpoints")
    assert meta is not None and meta["global_steps"] >= 2 * CHECKPOINT_EVERY and meta["world_size"] == 2, meta
    assert not (out / "final").exists()

    resume_log = tmp_path / "resume.log"
    resumed = two_nodes.start(config, out, resume_log, "--resume")
    try:
        rc = resumed.wait(timeout=HANG_GUARD_S)
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
    text = resume_log.read_text()
    assert rc == 0, text[-4000:]
    steps = [row["step"] for row in read_metrics(out / "metrics.jsonl")]
    assert steps == list(range(1, MAX_STEPS + 1))  # rows past the checkpoint were replaced by the resumed run's
    first_bar = re.search(rf"pretrain:\s+\d+%\|[^|]*\|\s*(\d+)/{MAX_STEPS}", text)
    assert first_bar and int(first_bar.group(1)) == meta["global_steps"], text[-3000:]  # it went on, not over
    assert (out / "final").is_dir() and (out / "summary.json").is_file()
