"""A real SLURM cluster on this machine for the cluster test tier (tests/cluster/test_cluster.py).

What :meth:`Cluster.up` builds, all of it private to one test session:

* munged with its own key and socket; slurmctld and three slurmd from Debian's packages, own slurm.conf, ports,
  spool, state and logs (``SLURM_CONF`` points the client commands at it);
* node ``<this host>`` (partition ``one``): a slurmd in this machine's network namespace;
* nodes ``usp-node1`` and ``usp-node2`` (partition ``two``): one network namespace each, joined with this host by a
  bridge in a namespace of its own (a switch), on addresses the test picks (10.213.X.0/24, none in use here; no
  route anywhere else), each with its own hostname
  (UTS namespace) and a private mount namespace in which /etc/hosts names the nodes and /etc/ssh/ssh_config uses a
  key made for the test; :meth:`Cluster.start_sshd` adds an sshd per node for pdsh/ssh launches.

Every process it starts carries ``USP_SCALE_CLUSTER_TAG`` in its environment (jobs inherit it from the submitting
environment, job steps from slurmd), so :meth:`Cluster.down` stops exactly those, then deletes the namespaces and
the bridge. A session that died without tearing down is cleaned up by the next one (its tag's process is gone).
A lock file keeps two sessions on one machine from running at once.

Facts this relies on: Debian's SLURM runs several slurmd on one host (``NodeName=... Port=...``, ``slurmd -N``);
slurmd must be entered into a namespace with ``nsenter --net`` (``ip netns exec`` remounts /sys and slurmd then
misses the cgroup filesystem; with ``proctrack/linuxproc`` and ``task/none`` no cgroup plugin is needed);
SLURM holds a requeued job about 120 s (``Reason=BeginTime``): :meth:`Cluster.wait_job` releases it with
``scontrol update JobId=N StartTime=now``.
"""
from __future__ import annotations

import fcntl
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
LOCK = "/tmp/usp_scale_cluster.lock"
NODES = ("usp-node1", "usp-node2")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
TOOLS = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "sdiag", "srun", "scancel", "munged", "ssh",
         "ssh-keygen", "pdsh", "ip", "nsenter", "unshare", "mount")
APT = "slurmctld slurmd slurm-client munge openssh-server openssh-client pdsh"
T0 = time.time()


def say(msg: str) -> None:
    """Progress line (pytest shows it with a failing test's output, so a CI log says where it stopped)."""
    print(f"[cluster {time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


def _run(cmd, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def no_core_dumps() -> None:
    """preexec_fn of every process the tier starts: a crashing launcher (torchrun aborting when its peer vanishes)
    must not drop a core file into the checkout. slurmd passes its limit on to the jobs
    (PropagateResourceLimits=NONE)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def why_not() -> Optional[str]:
    """None when this machine can host the cluster, else the reason to skip."""
    if os.environ.get("USP_SCALE_CLUSTER_TESTS", "1") == "0":
        return "USP_SCALE_CLUSTER_TESTS=0"
    if not sys.platform.startswith("linux"):
        return "needs Linux (network namespaces)"
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridge, slurmd)"
    missing = [t for t in TOOLS if not shutil.which(t)] + [p for p in ("/usr/sbin/sshd",) if not os.path.exists(p)]
    if missing:
        return f"missing {', '.join(missing)} (Debian: apt-get install {APT})"
    if (os.cpu_count() or 1) < 2:
        return "needs 2 CPUs"
    probe = f"uscprobe{os.getpid()}"[:15]
    r = _run(["ip", "netns", "add", probe], check=False)
    if r.returncode:
        return f"network namespaces unavailable: {r.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def cmdline(pid: int) -> List[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def tagged_pids(tag: str) -> List[int]:
    """Processes whose environment carries USP_SCALE_CLUSTER_TAG=tag (started by that session), not this one."""
    marker = f"USP_SCALE_CLUSTER_TAG={tag}".encode()
    own = {os.getpid(), os.getppid()}
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in own
            and marker in _environ(int(p)).split(b"\0")]


def _kill_all(pids, why: str) -> None:
    pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
    if pids:
        say(f"teardown: SIGKILL {len(pids)} {why}: {pids[:12]}")
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _stale_tags() -> List[str]:
    """Tags of earlier sessions whose pytest process is gone but whose namespaces are still there."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    tags = sorted({m.group(1) for m in re.finditer(r"^(usc\d+)[012]\b", out, re.M)})
    return [t for t in tags if not os.path.exists(f"/proc/{t[3:]}")]


def _remove_network(tag: str) -> None:
    for i in (1, 2, 0):
        ns = f"{tag}{i}"
        if os.path.exists(f"/run/netns/{ns}"):
            pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            _kill_all([int(p) for p in pids], f"processes left in namespace {ns}")
            _run(["ip", "netns", "del", ns], check=False)
    if os.path.exists(f"/sys/class/net/{tag}h"):
        _run(["ip", "link", "del", f"{tag}h"], check=False)


class Cluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tag = f"usc{os.getpid()}"
        self.procs: Dict[str, subprocess.Popen] = {}
        self.anchors: Dict[str, subprocess.Popen] = {}
        self.host = socket.gethostname().split(".")[0]
        self.made_run_sshd = False
        self._lock = None
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self.ssh = self.root / "ssh"

    # ------------------------------------------------------------------ set-up
    def _take_lock(self, wait_s: float = 600) -> None:
        self._lock = open(LOCK, "w")
        t = time.time()
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.time() - t > wait_s:
                    raise RuntimeError(f"another cluster tier holds {LOCK} for {wait_s:.0f} s")
                if time.time() - t < 1:
                    say(f"waiting for {LOCK}: another cluster test session runs on this machine")
                time.sleep(2)

    def _subnet(self) -> str:
        used = _run(["ip", "-4", "addr"]).stdout + _run(["ip", "-4", "route"]).stdout
        for x in range(1, 255):
            if f"10.213.{x}." not in used:
                return f"10.213.{x}"
        raise RuntimeError("no free 10.213.X.0/24 subnet")

    def ip(self, node: str) -> str:
        return f"{self.net}.{2 + NODES.index(node)}" if node in NODES else f"{self.net}.1"

    def env(self, **extra) -> dict:
        """Environment for daemons, client commands and jobs (sbatch exports it to the job)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SLURMD_")) and k not in
               ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "PYTEST_XDIST_WORKER", "PYTEST_CURRENT_TEST")}
        env.update(SLURM_CONF=str(self.conf), USP_SCALE_CLUSTER_TAG=self.tag, OMP_NUM_THREADS="1",
                   DS_ACCELERATOR="cpu", DS_BUILD_OPS="0", HF_HUB_OFFLINE="1", PYTHON=sys.executable,
                   PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
                   PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}")
        env.update(extra)
        return env

    def up(self) -> "Cluster":
        self._take_lock()
        for tag in _stale_tags():
            say(f"removing what the dead session {tag} left behind")
            _kill_all(tagged_pids(tag), f"processes of {tag}")
            _remove_network(tag)
        for d in ("munge", "state", "spool", "log", "ssh"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self.net = self._subnet()
        self._network()
        self._munge()
        self._slurm()
        say(f"cluster up: nodes {self.host} (partition one), {','.join(NODES)} (partition two) on {self.net}.0/24")
        return self

    def _network(self) -> None:
        # The switch: a bridge in a namespace of its own, so frames between the nodes never meet this machine's
        # firewall (br_netfilter + a FORWARD policy of DROP, as Docker sets up, would drop them on a host bridge).
        sw = f"{self.tag}0"
        say(f"network: switch namespace {sw} (bridge), this host {self.net}.1/24 on {self.tag}h, "
            f"nodes in namespaces {self.tag}1, {self.tag}2")
        _run(["ip", "netns", "add", sw])
        _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", sw, "link", "set", "br0", "up"])
        _run(["ip", "link", "add", f"{self.tag}h", "type", "veth", "peer", "name", f"{self.tag}s"])
        self._plug(f"{self.tag}s", "port0")
        _run(["ip", "addr", "add", f"{self.net}.1/24", "dev", f"{self.tag}h"])
        _run(["ip", "link", "set", f"{self.tag}h", "up"])
        hosts = ["127.0.0.1 localhost", f"{self.net}.1 {self.host}"] + [f"{self.ip(n)} {n}" for n in NODES]
        (self.root / "hosts").write_text("\n".join(hosts) + "\n")
        self._ssh_files()
        for i, node in enumerate(NODES, 1):
            ns, a, b = f"{self.tag}{i}", f"{self.tag}a{i}", f"{self.tag}b{i}"
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
            self._plug(b, self.port(node))
            _run(["ip", "link", "set", a, "netns", ns])
            _run(["ip", "-n", ns, "link", "set", a, "name", "usp0"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.ip(node)}/24", "dev", "usp0"])
            _run(["ip", "-n", ns, "link", "set", "usp0", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # The node: own hostname (UTS) and mount namespace (its /etc/hosts, its ssh client config), held by a
            # sleeping anchor process that every process of the node is entered into.
            binds = f"mount --bind {self.root}/hosts /etc/hosts"
            if os.path.exists("/etc/ssh/ssh_config"):
                binds += f" && mount --bind {self.ssh}/ssh_config /etc/ssh/ssh_config"
            p = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "unshare", "--mount", "--uts", "--propagation",
                                  "private", "bash", "-c", f"{binds} && hostname {node} && echo ready && "
                                  "exec sleep infinity"], stdout=subprocess.PIPE, text=True, env=self.env(),
                                 preexec_fn=no_core_dumps)
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"node {node}: could not set up its namespaces")
            self.anchors[node] = p

    def _plug(self, dev: str, port: str) -> None:
        """Move veth end ``dev`` into the switch namespace as ``port`` on its bridge."""
        sw = f"{self.tag}0"
        _run(["ip", "link", "set", dev, "netns", sw])
        _run(["ip", "-n", sw, "link", "set", dev, "name", port])
        _run(["ip", "-n", sw, "link", "set", port, "master", "br0", "up"])

    @staticmethod
    def port(node: str) -> str:
        """The node's port on the switch."""
        return f"port{1 + NODES.index(node)}"

    def _ssh_files(self) -> None:
        os.chmod(self.ssh, 0o700)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.ssh / "host_key"), "-C", "usp-host"])
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.ssh / "id_ed25519"), "-C", "usp-user"])
        shutil.copy(self.ssh / "id_ed25519.pub", self.ssh / "authorized_keys")
        hostkey = " ".join((self.ssh / "host_key.pub").read_text().split()[:2])
        (self.ssh / "known_hosts").write_text("".join(f"{n},{self.ip(n)} {hostkey}\n" for n in NODES))
        (self.ssh / "ssh_config").write_text(
            f"Host *\n    IdentityFile {self.ssh}/id_ed25519\n    UserKnownHostsFile {self.ssh}/known_hosts\n"
            "    StrictHostKeyChecking yes\n    BatchMode yes\n    LogLevel ERROR\n")
        for node in NODES:
            (self.ssh / f"sshd_{node}.conf").write_text(
                f"ListenAddress {self.ip(node)}\nHostKey {self.ssh}/host_key\n"
                f"AuthorizedKeysFile {self.ssh}/authorized_keys\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                f"PidFile {self.ssh}/sshd_{node}.pid\n")

    def _daemon(self, name: str, argv: list, node: Optional[str] = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.out", "w")
        p = subprocess.Popen(self.node_argv(node, argv) if node else argv, stdout=log, stderr=subprocess.STDOUT,
                             env=self.env(), cwd=self.root, preexec_fn=no_core_dumps)
        self.procs[name] = p
        return p

    def _munge(self) -> None:
        say("munged: own key and socket")
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        m = self.root / "munge"
        self.munge_socket = m / "sock"
        self._daemon("munged", ["munged", "-F", "-f", f"--socket={self.munge_socket}", f"--key-file={key}",
                                f"--pid-file={m}/pid", f"--log-file={m}/log", f"--seed-file={m}/seed"])
        self._wait(lambda: self.munge_socket.exists(), 20, "munged socket")

    def _slurm(self) -> None:
        ports = {n: free_port() for n in ("ctld", self.host, *NODES)}
        cpus = os.cpu_count()
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.ip(n)} Port={ports[n]} CPUs={cpus} State=UNKNOWN"
                          for n in (self.host, *NODES))
        r = self.root
        self.conf.write_text(f"""ClusterName=uspcluster
SlurmctldHost={self.host}({self.net}.1)
SlurmctldPort={ports['ctld']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/spool/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
PropagateResourceLimits=NONE
ReturnToService=2
SlurmdTimeout=20
SlurmctldTimeout=20
MessageTimeout=10
InactiveLimit=0
KillWait=10
MinJobAge=3600
{nodes}
PartitionName=one Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
PartitionName=two Nodes={','.join(NODES)} MaxTime=INFINITE State=UP
""")
        say(f"slurmctld on {self.net}.1:{ports['ctld']}; slurmd {self.host}, {', '.join(NODES)}")
        self._daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.scontrol("ping", check=False).returncode == 0, 30, "slurmctld")
        self._daemon(f"slurmd-{self.host}", ["slurmd", "-D", "-f", str(self.conf), "-N", self.host])
        for n in NODES:
            self.start_slurmd(n)
        self.wait_nodes_idle((self.host, *NODES), 60)

    def start_slurmd(self, node: str) -> None:
        self._daemon(f"slurmd-{node}", ["slurmd", "-D", "-f", str(self.conf), "-N", node], node=node)

    def start_sshd(self) -> None:
        """sshd in each namespace node (key login as root with the test's key), for pdsh/ssh launches."""
        if not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", mode=0o755)   # sshd's privilege-separation directory
            self.made_run_sshd = True
        for n in NODES:
            say(f"sshd on {n} ({self.ip(n)}:22)")
            self._daemon(f"sshd-{n}", ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.ssh / f"sshd_{n}.conf")], node=n)
        for n in NODES:
            self._wait(lambda n=n: self.on_node(NODES[0], ["ssh", n, "true"]).returncode == 0, 30, f"ssh to {n}")

    def stop_sshd(self) -> None:
        for n in NODES:
            self._stop(f"sshd-{n}")

    # ------------------------------------------------------------------ running things
    def node_argv(self, node: str, argv: list) -> list:
        """``argv`` as a process of ``node`` (its network, mount and UTS namespaces)."""
        return ["nsenter", "-t", str(self.anchors[node].pid), "-n", "-m", "-u", f"--wd={REPO}", *argv]

    def on_node(self, node: str, argv: list, timeout: float = 60, **env) -> subprocess.CompletedProcess:
        return subprocess.run(self.node_argv(node, argv), capture_output=True, text=True, timeout=timeout,
                              env=self.env(**env), preexec_fn=no_core_dumps)

    def popen_on_node(self, node: str, argv: list, log: Path, **env) -> subprocess.Popen:
        f = open(log, "w")
        return subprocess.Popen(self.node_argv(node, argv), stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                env=self.env(**env), start_new_session=True, preexec_fn=no_core_dumps)

    def node_pids(self, node: str) -> List[int]:
        ns = f"{self.tag}{1 + NODES.index(node)}"
        return [int(p) for p in _run(["ip", "netns", "pids", ns]).stdout.split()]

    @staticmethod
    def job_steps(jid: str) -> List[int]:
        """pids of the slurmstepd processes of job ``jid`` on any node (one pid namespace for all of them)."""
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/cmdline", "rb") as f:
                        if f.read().startswith(f"slurmstepd: [{jid}.".encode()):
                            pids.append(int(d))
                except OSError:
                    continue
        return pids

    def job_processes(self, node: str) -> List[str]:
        """The job processes still running on ``node`` (its slurmstepd and what they started), as "pid comm"."""
        found = []
        for pid in self.node_pids(node):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue  # ended meanwhile
            if comm == "slurmstepd" or "launchers/" in cmd or "torchrun" in cmd:
                found.append(f"{pid} {comm}")
        return found

    def scontrol(self, *args, check=True) -> subprocess.CompletedProcess:
        return _run(["scontrol", *args], check=check, env=self.env(), timeout=60)

    def sbatch(self, script: str, args: list, *, partition: str, nodes: int, ntasks_per_node: int,
               cpus_per_task: int, out: Path, name: str, extra=(), **env) -> str:
        cmd = ["sbatch", "--parsable", f"--partition={partition}", f"--nodes={nodes}",
               f"--ntasks-per-node={ntasks_per_node}", f"--cpus-per-task={cpus_per_task}", "--gpus-per-node=0",
               f"--job-name={name}", f"--output={out}/slurm-%j.out", *extra, script, *args]
        out.mkdir(parents=True, exist_ok=True)
        jid = _run(cmd, env=self.env(**env), cwd=REPO, timeout=60, preexec_fn=no_core_dumps).stdout.strip()
        jid = jid.split(";")[0]
        say(f"job {jid} ({name}): sbatch -p {partition} -N {nodes} {script} ...")
        return jid

    def job(self, jid: str) -> dict:
        r = self.scontrol("show", "job", "-o", jid, check=False)
        return dict(t.split("=", 1) for t in r.stdout.split() if "=" in t) if r.returncode == 0 else {}

    def wait_job(self, jid: str, timeout: float, until=TERMINAL, release: bool = True) -> dict:
        """Poll until the job's state is in ``until``; a requeued job held for BeginTime is released at once."""
        t, last = time.time(), None
        while time.time() - t < timeout:
            j = self.job(jid)
            state = (j.get("JobState"), j.get("Reason"))
            if state != last:
                say(f"job {jid}: {state[0]} ({state[1]}) restarts={j.get('Restarts')}"
                    + (f"; slurmctld's RPC retry queue: {self.agent_queue()}" if state[1] == "BeginTime" else ""))
                last = state
            if j.get("JobState") in until:
                return j
            if release and j.get("JobState") == "PENDING" and j.get("Reason") == "BeginTime" \
                    and not self.job_steps(jid) and self.agent_queue() == 0:
                # Released only once the previous run's steps are gone and slurmctld holds no undelivered RPC: a
                # requeued job keeps its id, and the kill of the old steps would also end new ones started before
                # it lands (seen in CI twice: a terminate that failed while a node was unreachable sat in
                # slurmctld's retry queue and, retried about 60 s later, ended the requeued job's new step).
                say(f"job {jid}: requeued and held ~120 s for BeginTime; scontrol update JobId={jid} StartTime=now")
                self.scontrol("update", f"JobId={jid}", "StartTime=now", check=False)
            time.sleep(0.5)
        raise TimeoutError(f"job {jid} not in {sorted(until)} after {timeout:.0f} s: {self.job(jid)}\n"
                           + self.log_tail())

    def agent_queue(self) -> int:
        """RPCs slurmctld still has to deliver (``sdiag``'s "Agent queue size": its retry list, e.g. a job's
        terminate message to a node that was unreachable, retried about every 60 s)."""
        r = _run(["sdiag"], env=self.env(), timeout=60)
        m = re.search(r"^\s*Agent queue size:\s*(\d+)", r.stdout, re.M)
        if not m:
            raise RuntimeError(f"sdiag printed no 'Agent queue size':\n{r.stdout[-2000:]}")
        return int(m.group(1))

    def node_state(self, node: str) -> str:
        r = _run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], check=False, env=self.env())
        return r.stdout.strip()

    def wait_nodes_idle(self, nodes, timeout: float) -> None:
        self._wait(lambda: all(self.node_state(n).startswith("idle") for n in nodes), timeout,
                   f"nodes {', '.join(nodes)} idle")

    def cut_link(self, node: str) -> None:
        say(f"cutting {node}'s link (its switch port {self.port(node)} down)")
        _run(["ip", "-n", f"{self.tag}0", "link", "set", self.port(node), "down"])

    def restore_link(self, node: str) -> None:
        say(f"restoring {node}'s link")
        _run(["ip", "-n", f"{self.tag}0", "link", "set", self.port(node), "up"])

    def log_tail(self, n: int = 25) -> str:
        parts = []
        for f in sorted(self.logs.glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def _wait(self, ok, timeout: float, what: str) -> None:
        t = time.time()
        while time.time() - t < timeout:
            try:
                if ok():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{what}: not ready after {timeout:.0f} s\n{self.log_tail()}")

    # ------------------------------------------------------------------ teardown
    def _stop(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    def down(self) -> None:
        """Stop every process this session started (and only those), then remove the network. Never raises."""
        say("teardown: cancelling jobs, stopping daemons, removing namespaces and bridge")
        steps = [self._cancel_jobs, *[lambda n=n: self._stop(n) for n in list(self.procs)],
                 lambda: _kill_all(tagged_pids(self.tag), "processes started by this session"),
                 *[lambda n=n: self._stop_anchor(n) for n in list(self.anchors)],
                 lambda: _remove_network(self.tag)]
        for step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 -- teardown goes on
                say(f"teardown step failed: {e}")
        if self.made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)
        if self._lock is not None:
            self._lock.close()

    def _cancel_jobs(self) -> None:
        if "slurmctld" not in self.procs:
            return
        _run(["scancel", "--full", "--user", "root"], check=False, env=self.env(), timeout=30)
        t = time.time()
        while time.time() - t < 20 and _run(["squeue", "-h"], check=False, env=self.env()).stdout.strip():
            time.sleep(0.5)

    def _stop_anchor(self, node: str) -> None:
        p = self.anchors.pop(node)
        p.kill()
        p.wait(10)
