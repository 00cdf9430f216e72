"""A two-node Ray cluster (``ray start`` head + worker) inside a Linux namespace of its own, and a job submitted to
it with ``ray job submit --working-dir``, as a user submits stylid to a cluster.

``unshare -n -p -f --mount-proc`` gives the script a network namespace with only loopback (nothing it starts can
be reached from outside, whatever Ray binds) and a PID namespace (the script is PID 1 there: when it exits, the
kernel ends every process started inside). ``/tmp/ray`` is bind-mounted to a private folder inside the namespace,
so the cluster's ``ray_current_cluster`` file never makes another local ``ray.init()`` on this machine try to join
it. The head has no CPU: every stage runs on the worker node, so a finished job proves the worker joined and did
the work. Needs root (or unprivileged user namespaces) and iproute2; ``namespace_unavailable`` says why not.

``submit_in_namespace(command, ...)`` takes the job's command line, so ``stylid run`` and ``stylid score`` are
submitted the same way.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)

SCRIPT = r"""
set -eu
ip link set lo up
mount --bind "$RAY_PRIVATE_TMP" /tmp/ray
cd "$REPO"
export PATH="$VENV_BIN:$PATH" RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER RAY_ADDRESS STYLID_LOCAL_RAY
echo "== interfaces"; ip -o link show | awk '{print $2}'
ray start --head --node-ip-address=127.0.0.1 --port=6379 --num-cpus=0 --include-dashboard=true \
    --dashboard-host=127.0.0.1 --dashboard-port=8265 --disable-usage-stats >/dev/null
ray start --address=127.0.0.1:6379 --node-ip-address=127.0.0.1 --num-cpus="$WORKER_CPUS" \
    --temp-dir=/tmp/ray/worker-node >/dev/null  # its own session folder: two nodes of one host shared one, and both
#   runtime-env agents unpacked the working dir into it at once (a driver once found pipelines/chain.py missing)
echo "== listeners"; ss -ltnH | awk '{print $4}' | sort -u | tr '\n' ' '; echo
echo "== job"
set +e
ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env-json "$RUNTIME_ENV" \
  -- bash -c "$JOB_COMMAND"
code=$?
echo "== job exit code $code"
ray stop --force >/dev/null 2>&1
exit $code
"""


def namespace_unavailable() -> str | None:
    """Why the namespace cannot be made here (None when it can)."""
    for tool in ("unshare", "ip", "ss", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    probe = subprocess.run(["unshare", "-n", "-p", "-f", "--mount-proc", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n -p -f --mount-proc failed: {probe.stderr.strip()[:200]} (needs root or user namespaces)"
    return None


@dataclass
class Submission:
    """What one submission printed and returned."""

    returncode: int
    log: str
    listeners: list[str]
    interfaces: list[str]
    ray_dir: str  # the cluster's private /tmp/ray (its session logs), on this side of the namespace


def submit_in_namespace(
    command: list[str] | str, runtime_env: dict | None = None, worker_cpus: int = 2, timeout: float = 240
) -> Submission:
    """Start the cluster, submit ``command`` from the repo root with ``--working-dir .``, wait, stop everything.

    ``command`` is the job's entrypoint: argv (quoted with ``shlex``) or a shell line (``a && b``), which the job
    runs through a shell as ``ray job submit`` does."""
    ray_dir = tempfile.mkdtemp(prefix="stylid-ns-ray-")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        "REPO": REPO, "VENV_BIN": VENV_BIN, "RAY_PRIVATE_TMP": ray_dir, "WORKER_CPUS": str(worker_cpus),
        "RUNTIME_ENV": json.dumps(runtime_env or {"env_vars": {"HF_HUB_OFFLINE": "1"}}),
        "JOB_COMMAND": command if isinstance(command, str) else shlex.join(command),
    })  # fmt: skip
    proc = subprocess.run(["unshare", "-n", "-p", "-f", "--mount-proc", "bash", "-c", SCRIPT], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    log = proc.stdout + proc.stderr
    lines = log.splitlines()

    def after(marker: str) -> list[str]:
        for k, line in enumerate(lines):
            if line.startswith(marker):
                out = []
                for nxt in lines[k + 1 :]:
                    if nxt.startswith("== "):
                        break
                    out += nxt.split()
                return out
        return []

    return Submission(proc.returncode, log, after("== listeners"), after("== interfaces"), ray_dir)
