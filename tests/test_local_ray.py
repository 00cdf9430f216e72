"""The local Ray of a real ``stylid run`` (a subprocess, as a user starts it): every listener on loopback, no
credential written anywhere, and no process of it left after the driver is SIGKILLed."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import sys
import time

import boto3
import pandas as pd
import psutil
import pytest
from PIL import Image

from jobs import ray_reaper
from stylid_core.sample_data import load_photo
from tests.pipelines.netcheck import RAY_LISTENERS, ListenerWatch
from tests.processes import alive, process_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the Ray temp folder of the runs started here (their environment has no RAY_TMPDIR: Ray's rule gives this)
RAY_TEMP = os.path.join(os.environ.get("TMPDIR") or "/tmp", "ray")
#: planted credentials, each given one way; none may appear in any file the run or its Ray session writes
PLANTED = {
    "env_secret": "envSECRETvalue0123456789abcdef",
    "env_token": "envSESSIONtoken0123456789abcdef",
    "env_key_id": "AKIAPLANTEDKEYID0001",
    "set_key": "AKIAPLANTEDSETKEY0002",
    "set_secret": "setSECRETvalue0123456789abcdef",
}


def stylid_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would give ``stylid``: this checkout importable, and none of the test
    session's Ray settings (``init_ray`` must keep the local Ray on loopback by itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_")) and k != ray_reaper.TOKEN_ENV}
    env.update({"PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", **extra})
    return env


def start_stylid(args: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip


def small_photos(folder: str, n: int, side: int = 160) -> list[dict]:
    os.makedirs(folder, exist_ok=True)
    rows = []
    for k in range(n):
        stem = ("obama", "biden", "grace_hopper")[k % 3]
        img = Image.fromarray(load_photo(stem))
        scale = side / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)))
        path = os.path.join(folder, f"{stem}-{k}.jpg")
        img.save(path, quality=90)
        rows.append({"image_id": f"{stem}-{k}", "image_uri": path})
    return rows


def session_dir_of(driver_pid: int, since: float) -> str:
    """The Ray session folder a driver started (Ray names it ``session_<date>_<driver pid>``)."""
    found = [d for d in glob.glob(os.path.join(RAY_TEMP, f"session_*_{driver_pid}")) if os.path.getmtime(d) >= since]
    assert len(found) == 1, f"expected one Ray session folder of pid {driver_pid}, found {found}"
    return found[0]


def files_containing(roots: list[str], needles: list[str]) -> dict[str, list[str]]:
    """needle -> files under ``roots`` whose bytes contain it."""
    hits: dict[str, list[str]] = {}
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                for n in needles:
                    if n.encode() in data:
                        hits.setdefault(n, []).append(path)
    return hits


@pytest.fixture(scope="module")
def s3_run(s3_endpoint, tmp_path_factory):
    """One ``stylid run`` reading its manifest and images from S3 and writing there, with credentials planted in
    the environment and in ``--set io.storage_options``; its listening sockets are watched while it runs."""
    tmp = tmp_path_factory.mktemp("localray")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="secrets-in")
    s3.create_bucket(Bucket="secrets-out")
    rows = []
    for row in small_photos(str(tmp / "photos"), 4):
        key = f"photos/{os.path.basename(row['image_uri'])}"
        s3.upload_file(row["image_uri"], "secrets-in", key)
        rows.append({"image_id": row["image_id"], "image_uri": f"s3://secrets-in/{key}"})
    pd.DataFrame(rows).to_parquet(tmp / "manifest.parquet", index=False)
    s3.upload_file(str(tmp / "manifest.parquet"), "secrets-in", "manifest.parquet")
    env = stylid_env(AWS_ENDPOINT_URL=s3_endpoint, AWS_DEFAULT_REGION="us-east-1",
                     AWS_ACCESS_KEY_ID=PLANTED["env_key_id"], AWS_SECRET_ACCESS_KEY=PLANTED["env_secret"],
                     AWS_SESSION_TOKEN=PLANTED["env_token"])  # fmt: skip
    args = ["run", "--manifest", "s3://secrets-in/manifest.parquet", "--output", "s3://secrets-out/run/",
            "--num-cpus", "2", "--set", f"io.storage_options.key={PLANTED['set_key']}",
            "--set", f"io.storage_options.secret={PLANTED['set_secret']}"]  # fmt: skip
    log_path = str(tmp / "stylid.log")
    started = time.time()
    proc = start_stylid(args, env, log_path)
    with ListenerWatch(proc.pid) as watch:
        code = proc.wait(timeout=240)
    with open(log_path) as f:
        log = f.read()
    assert code == 0, log[-3000:]
    out = tmp / "bucket"
    for obj in s3.list_objects_v2(Bucket="secrets-out")["Contents"]:
        target = out / obj["Key"]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("secrets-out", obj["Key"], str(target))
    return {"watch": watch, "session": session_dir_of(proc.pid, started), "output": str(out), "log": log_path,
            "ids": [r["image_id"] for r in rows]}  # fmt: skip


def test_every_listener_of_the_runs_ray_is_on_loopback(s3_run):
    watch = s3_run["watch"]
    names = watch.names()
    missing = [n for n in RAY_LISTENERS if n not in names]
    assert not missing, f"never saw {missing} listening; saw {sorted(names)}"
    assert any(n.startswith("ray::") and "Agent" not in n for n in names), f"no worker listened: {sorted(names)}"
    bad = watch.not_loopback()
    assert not bad, f"Ray processes listening beyond loopback (pid, name, address, port): {bad}"


def test_no_planted_credential_in_any_file_the_run_wrote(s3_run):
    ids = pd.concat(pd.read_parquet(f) for f in glob.glob(f"{s3_run['output']}/run/metrics/*.parquet"))["image_id"]
    assert sorted(ids) == sorted(s3_run["ids"])  # the credentials did their work: every row read and written
    roots = [s3_run["session"], s3_run["output"], os.path.dirname(s3_run["log"])]
    hits = files_containing(roots, list(PLANTED.values()))
    assert not hits, f"credentials written to: { {k: v[:5] for k, v in hits.items()} }"
    with open(f"{s3_run['output']}/run/run.json") as f:
        assert '"secret": "<redacted>"' in f.read()  # the option is recorded as given, its value not


@pytest.mark.slow
def test_no_process_of_the_local_ray_survives_a_sigkilled_driver(tmp_path):
    rows = small_photos(str(tmp_path / "photos"), 30)
    pd.DataFrame(rows).to_parquet(tmp_path / "manifest.parquet", index=False)
    args = ["run", "--manifest", str(tmp_path / "manifest.parquet"), "--output", str(tmp_path / "out"),
            "--num-cpus", "2", "--no-report"]  # fmt: skip
    proc = start_stylid(args, stylid_env(), str(tmp_path / "stylid.log"))
    try:
        deadline = time.time() + 180
        seen: dict[int, psutil.Process] = {}
        named: dict[int, str] = {}  # each process's last name seen (a worker is renamed when it becomes an
        # actor): one may end before the kill (a stage actor once its input is read), and a gone one has no name
        while time.time() < deadline:  # until the stage actors work (mid-run), every process of the tree noted
            assert proc.poll() is None, open(tmp_path / "stylid.log").read()[-3000:]
            for p in process_tree(proc.pid):
                seen.setdefault(p.pid, p)
            for pid, p in seen.items():
                with contextlib.suppress(psutil.Error):
                    named[pid] = p.name()
            names = {named[pid] for pid, p in seen.items() if pid in named and alive(p)}
            # an image stored: the actors are mid-run (the metrics shard is written once the rows are all done)
            if any("MapWorker" in n for n in names) and glob.glob(str(tmp_path / "out" / "images" / "*.png")):
                break
            time.sleep(0.3)
        else:
            pytest.fail("the run never reached its stage actors")
        names = set(named.values())
        for expected in ("raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent"):
            assert expected in names, f"{expected} not seen among {sorted(names)}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(alive(p) for p in seen.values() if p.pid != proc.pid):
            time.sleep(0.5)
        left = sorted((p.pid, named.get(p.pid)) for p in seen.values() if p.pid != proc.pid and alive(p))
        assert not left, f"processes of the killed driver's Ray still alive after 30 s: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in seen.values():  # nothing of this test may outlive it, whatever the outcome
            if p.pid != proc.pid and alive(p):
                p.kill()


def _sleeper(env: dict[str, str], ignore_term: bool = False) -> subprocess.Popen:
    code = "import signal, time\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
    return subprocess.Popen([sys.executable, "-c", code + "time.sleep(120)"], env=env)


def test_next_start_ends_leftovers_of_sessions_whose_driver_is_gone(tmp_path):
    """The fallback when driver and watchdog were killed together: processes of a session whose owner is dead
    are ended (SIGKILL for those ignoring SIGTERM); a session whose owner lives is left alone."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead_owner = ray_reaper.SessionRecord(token="dead-owner-token", owner_pid=gone.pid, owner_started=time.time())
    live_owner = ray_reaper.new_record()
    procs = {
        "term": _sleeper({**os.environ, ray_reaper.TOKEN_ENV: dead_owner.token}),
        "stubborn": _sleeper({**os.environ, ray_reaper.TOKEN_ENV: dead_owner.token}, ignore_term=True),
        "other": _sleeper({**os.environ, ray_reaper.TOKEN_ENV: live_owner.token}),
    }
    try:
        time.sleep(1.0)  # let the stubborn one install its handler
        ray_reaper.save_record(dead_owner, str(tmp_path))
        ray_reaper.save_record(live_owner, str(tmp_path))
        assert ray_reaper.reap_orphaned_sessions(str(tmp_path)) == 2
        # (the reaper collected their exit status, so Popen cannot tell the signal: that they are gone is the point)
        for name in ("term", "stubborn"):
            assert not psutil.pid_exists(procs[name].pid) or procs[name].poll() is not None, name
        assert procs["other"].poll() is None and psutil.Process(procs["other"].pid).status() != psutil.STATUS_ZOMBIE
        assert os.listdir(tmp_path / "stylid-sessions") == [f"{live_owner.token}.json"]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
