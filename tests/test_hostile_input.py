"""Hostile and careless input (issue 25): nothing hangs, nothing is lost or doubled, nothing outside the output is
touched, and a bad config fails in one line. Each test would fail on the code before its fix."""

from __future__ import annotations

import os
import threading

import pytest

from stylid_core.storage import StorageError, read_bytes


def _read_within(uri: str, seconds: float = 5.0, **kwargs) -> BaseException | bytes:
    """``read_bytes(uri)`` in a thread; what it returned or raised, or fails the test if it is still running."""
    box: list = []

    def target() -> None:
        try:
            box.append(read_bytes(uri, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"read_bytes({uri!r}) still running after {seconds} s"
    return box[0]


@pytest.mark.parametrize("prefix", ["", "file://"])
def test_a_fifo_is_refused_unread_instead_of_hanging(tmp_path, prefix):
    fifo = tmp_path / "style.png"
    os.mkfifo(fifo)
    result = _read_within(f"{prefix}{fifo}", max_bytes=1000)
    assert isinstance(result, StorageError) and result.status == "missing"
    assert str(result).startswith(f"{prefix}{fifo}: ") and "FIFO" in str(result)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_device_files_are_refused_unread(device):
    for max_bytes in (1000, None):
        result = _read_within(device, max_bytes=max_bytes)
        assert isinstance(result, StorageError) and result.status == "missing", result
        assert str(result).startswith(f"{device}: not a regular file (a character device)")


def test_a_read_is_bounded_by_the_bytes_read_not_the_size_reported(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/hostile/big.bin", b"x" * 5000)
    fs.size = lambda path: 0  # a server (or a special file) that reports no size
    try:
        result = _read_within("memory://hostile/big.bin", max_bytes=1000)
    finally:
        del fs.size
        fs.rm("/hostile/big.bin")
    assert isinstance(result, StorageError) and result.status == "too_large", result
    assert str(result).startswith("memory://hostile/big.bin: ")
    # a regular local file within the limit still reads whole, one over it is refused
    ok = tmp_path / "ok.bin"
    ok.write_bytes(b"y" * 1000)
    assert _read_within(str(ok), max_bytes=1000) == b"y" * 1000
    assert _read_within(str(ok), max_bytes=999).status == "too_large"


def test_storage_errors_start_with_the_uri(tmp_path):
    missing = str(tmp_path / "nope.jpg")
    assert str(_read_within(missing)).startswith(f"{missing}: not found")
    assert str(_read_within(str(tmp_path))).startswith(f"{tmp_path}: is a directory")


def test_image_keys_are_distinct_for_distinct_ids():
    from pipelines.schema import object_key

    first = object_key("a/b")
    assert object_key(first) != first  # the file-safe form of a/b, itself a valid id, no longer shares its file
    ids = ["a/b", first, "a_b", "a_b-c14cddc0", "a\\b", "a b", "a/b/", "../../escape", "/abs", "x\x00y", "\u202eabc",
           "é", "e\u0301", "A", "a", ".", "..", "id", "x" * 5000, "x" * 5001, "x" * 128, "x" * 129]  # fmt: skip
    keys = [object_key(i) for i in ids]
    assert len(set(keys)) == len(ids), [k for k in keys if keys.count(k) > 1]
    for key in keys:
        assert "/" not in key and "\\" not in key and key not in (".", "..") and len(key) <= 128
    assert object_key("plain-id_1.v2") == "plain-id_1.v2"  # an ordinary safe id is its own key


def _two_shard_output(out: str) -> list[str]:
    """An output of two one-row shard pairs (what compact merges); returns the shard names."""
    import pyarrow as pa

    from stylid_core.ledger import write_shard_pair

    names = []
    for image_id in ("a", "b"):
        metrics = pa.table({"image_id": [image_id], "status": ["ok"]})
        faces = pa.table({"image_id": [image_id], "face_index": [0]})
        names.append(write_shard_pair(out, faces, metrics, {}))
    return names


@pytest.mark.parametrize(
    "journal",
    [
        {"replaces": ["../../victim/a.txt"]},  # a committed journal: compact deletes what it replaces
        {"replaces": ["/VICTIM"]},
        {"replaces": ["..\\..\\victim\\a.txt"]},
        {"shard": "../../victim/a.parquet", "replaces": []},  # an uncommitted one: compact deletes its faces shard
        {"replaces": "part-x.parquet"},
        {"replaces": [7]},
    ],
)
def test_compact_refuses_a_journal_naming_a_file_outside_the_output(tmp_path, capsys, journal):
    import json

    from jobs.cli import main

    out = str(tmp_path / "deep" / "out")
    shards = _two_shard_output(out)
    victim = tmp_path / "deep" / "victim" / "a.txt"
    victim.parent.mkdir(parents=True)
    victim.write_text("keep me")
    (tmp_path / "VICTIM").write_text("keep me")
    (tmp_path / "victim" / "a.parquet").parent.mkdir()
    (tmp_path / "victim" / "a.parquet").write_text("keep me")
    planted = {"shard": shards[0], **journal}
    if planted["replaces"] == ["/VICTIM"]:
        planted["replaces"] = [str(tmp_path / "VICTIM")]  # an absolute path
    journal_path = os.path.join(out, "metrics", "_compaction-part-planted.json")
    with open(journal_path, "w") as f:
        json.dump(planted, f)
    before = sorted(os.listdir(os.path.join(out, "metrics"))), sorted(os.listdir(os.path.join(out, "faces")))

    assert main(["compact", out, "--rows-per-shard", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"stylid compact: error: {journal_path}: ")
    assert victim.read_text() == "keep me" and (tmp_path / "VICTIM").read_text() == "keep me"
    assert (tmp_path / "victim" / "a.parquet").read_text() == "keep me"
    after = sorted(os.listdir(os.path.join(out, "metrics"))), sorted(os.listdir(os.path.join(out, "faces")))
    assert after == before  # nothing in the output was touched either


def test_compact_still_recovers_a_well_formed_journal(tmp_path):
    """The check refuses only names outside the output: an interrupted compaction's journal is still finished."""
    import json

    from stylid_core.ledger import compact, live_shards

    out = str(tmp_path / "out")
    shards = _two_shard_output(out)
    with open(os.path.join(out, "metrics", "_compaction-part-x.json"), "w") as f:
        json.dump({"shard": shards[0], "replaces": [shards[1]]}, f)  # committed: shards[1] is superseded
    assert live_shards(out, {}) == [shards[0]]
    result = compact(out, {}, rows_per_shard=10)
    assert result.recovered == 1 and sorted(os.listdir(os.path.join(out, "metrics"))) == [shards[0]]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["run", "--output", ""], "--output"),
        (["run", "--output", "  "], "--output"),
        (["run", "--manifest", ""], "--manifest"),  # was: the bundled sample, run into ./stylid-output
        (["score", "--manifest", "m.parquet", "--output", ""], "--output"),
        (["customize", "--config", "c.yaml", "--manifest", "m.parquet", "--output", ""], "--output"),
        (["compact", ""], "OUTPUT"),
        (["report", ""], "OUTPUT"),
    ],
)
def test_an_empty_path_argument_is_refused_in_one_line(tmp_path, monkeypatch, capsys, argv, flag):
    import jobs.customize
    import jobs.run
    import jobs.score
    from jobs.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    for module in (jobs.run, jobs.score, jobs.customize):
        monkeypatch.setattr(module, "init_ray", no_ray)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"stylid {argv[0]}: error: {flag} is empty (an unset variable?): give a folder or URI"
    assert os.listdir(tmp_path) == []  # nothing written into the current folder


def _refused_before_ray(monkeypatch, capsys, argv: list[str]) -> str:
    """``stylid argv`` with Ray's start replaced by a failure: asserts exit 2 and one line; returns the line."""
    import jobs.run
    import jobs.score
    from jobs.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(jobs.run, "init_ray", no_ray)
    monkeypatch.setattr(jobs.score, "init_ray", no_ray)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "override, message",
    [
        ("stylize.style_uri=123", "stylize.style_uri must be a string or null, got 123 (int)"),
        ("stylize.engine=nope", "stylize.engine must be one of classical, diffusion, identity, neural, got 'nope'"),
        ("stylize.options.bogus=1", "unknown option(s) of engine neural: stylize.options.bogus; known: batch_size"),
        ("stylize.options.preserve_color=maybe", "stylize.options.preserve_color must be true or false, got 'maybe'"),
        ("stylize.options.style_strength=7", "stylize.options of engine neural: style_strength must be in [0, 1]"),
        ("score.redetect=maybe", "score.redetect must be true or false, got 'maybe' (str)"),
        ("score.compare_without_mosaic=1", "score.compare_without_mosaic must be true or false, got 1 (int)"),
        ("stylize.mosaic.enabled=yes please", "stylize.mosaic.enabled must be true or false"),
        ("io.storage_options=notadict", "io.storage_options must be a mapping, got a str"),
        ("io.storage_options=[1]", "io.storage_options must be a mapping, got a list"),
        ("io.max_bytes=lots", "io.max_bytes must be an integer, got 'lots' (str)"),
        ("faces.providers=CPUExecutionProvider", "faces.providers must be a list"),
        ("resources.fused.num_cpus=all", "resources.fused.num_cpus must be a number, got 'all' (str)"),
    ],
)
def test_a_config_value_of_the_wrong_type_is_refused_in_one_line_before_ray(tmp_path, monkeypatch, capsys,
                                                                            override, message):  # fmt: skip
    err = _refused_before_ray(monkeypatch, capsys, ["run", "--output", str(tmp_path / "out"), "--set", override])
    assert err.startswith("stylid run: error: ") and message in err
    assert "manifest" not in err  # io.storage_options=notadict blamed the manifest
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("engine, option", [("classical", "levels=1"), ("identity", "x=1"), ("diffusion", "tiny=2")])
def test_every_built_in_engine_checks_its_options_before_ray(tmp_path, monkeypatch, capsys, engine, option):
    argv = ["run", "--output", str(tmp_path / "out"), "--set", f"stylize.engine={engine}",
            "--set", f"stylize.options.{option}"]  # fmt: skip
    err = _refused_before_ray(monkeypatch, capsys, argv)
    assert "stylize.options" in err and option.split("=")[0] in err


def test_the_bundled_configs_still_load():
    from jobs.config import load_job_config

    for name in ("default", "stylize_null", "stylize_tiny", "stylize_sd15"):
        assert load_job_config(name).stylize.engine in ("neural", "identity", "diffusion")
    assert load_job_config("default", ["stylize.engine=classical", "stylize.options.levels=4"]).stylize.options


@pytest.mark.parametrize(
    "column",
    [
        lambda: __import__("pyarrow").array([["/a.png"], ["/b.png"]]),
        lambda: __import__("pyarrow").array([{"uri": "/a.png"}, {"uri": "/b.png"}]),
    ],
    ids=["list", "struct"],
)
def test_a_nested_image_uri_column_is_refused_in_one_line_before_ray(tmp_path, monkeypatch, capsys, column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"image_id": ["a", "b"], "image_uri": column()}), manifest)
    err = _refused_before_ray(monkeypatch, capsys, ["run", "--manifest", manifest, "--output", str(tmp_path / "o")])
    assert err.startswith(f"stylid run: error: manifest {manifest}: column 'image_uri' is of type ")
    pq.write_table(pa.table({"source_uri": column(), "output_uri": ["/x.png", "/y.png"]}), manifest)
    err = _refused_before_ray(monkeypatch, capsys, ["score", "--manifest", manifest, "--output", str(tmp_path / "s")])
    assert f"manifest {manifest}: column 'source_uri' is of type " in err


def test_a_refused_http_connection_is_a_retried_read_error_not_missing():
    import socket

    from stylid_core.storage import RetryPolicy

    with socket.socket() as probe:  # a port with nothing listening: bound, then closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}/x.jpg"
    tries = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.01)
    result = _read_within(uri, seconds=30, max_bytes=1000, retry=tries)
    assert isinstance(result, StorageError) and result.status == "read_error", result
    assert str(result).startswith(f"{uri}: ") and "not found" not in str(result)
    assert "still failing after 3 tries" in str(result)


def test_an_http_404_is_still_missing(tmp_path):
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "here.bin").write_bytes(b"12345")
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert _read_within(f"{base}/here.bin", max_bytes=1000) == b"12345"
        result = _read_within(f"{base}/gone.jpg", max_bytes=1000)
        assert isinstance(result, StorageError) and result.status == "missing", result
    finally:
        server.shutdown()
        server.server_close()


def test_a_manifest_on_an_unreachable_s3_endpoint_is_refused_in_one_line_before_ray(tmp_path, monkeypatch, capsys):
    import time

    import stylid_core.storage

    monkeypatch.setattr(stylid_core.storage, "DEFAULT_RETRY", stylid_core.storage.RetryPolicy(backoff_s=0.01))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    argv = ["run", "--manifest", "s3://bucket/m.parquet", "--output", str(tmp_path / "out"),
            "--set", "io.storage_options={endpoint_url: 'http://127.0.0.1:1'}"]  # fmt: skip
    started = time.monotonic()
    err = _refused_before_ray(monkeypatch, capsys, argv)
    assert err.startswith("stylid run: error: cannot read manifest s3://bucket/m.parquet: ")
    assert "EndpointConnectionError" in err and "still failing after" in err
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_an_unreachable_ray_address_is_refused_in_one_line(tmp_path, monkeypatch, capsys, form):
    import socket
    import time

    from jobs.cli import main

    with socket.socket() as probe:  # a port with nothing listening: bound, then closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = form.format(port=port)
    monkeypatch.setenv("RAY_ADDRESS", address)
    started = time.monotonic()
    code = main(["run", "--output", str(tmp_path / "out")])  # the bundled sample: the preflight passes
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"stylid run: error: the Ray cluster at {address} (RAY_ADDRESS) cannot be reached: ")
    assert time.monotonic() - started < 30


def test_a_port_that_accepts_but_is_no_ray_cluster_is_refused_in_seconds():
    """A listener that takes the connection and never speaks (a proxy, another service): the GCS probe gives up
    after its timeout instead of ray.init's 20 tries of 40 s."""
    import socket
    import time

    from jobs.ray_cluster import _gcs_problem

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        problem = _gcs_problem(address, timeout_s=1.0)
        assert problem == "no Ray cluster answered there within 1 s"
        assert time.monotonic() - started < 5


def test_a_loopback_address_says_which_address_ray_joins():
    """Ray joins a loopback GCS address through the machine's own address: the check tries that one and names it."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address

    from jobs.ray_cluster import check_reachable
    from stylid_core.config import ConfigError

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))  # loopback only: Ray's rewritten address finds nothing
        listener.listen(8)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        joined = canonicalize_bootstrap_address(address)
        with pytest.raises(ConfigError) as info:
            check_reachable(address, gcs_timeout_s=1.0)
    message = str(info.value)
    assert message.startswith(f"the Ray cluster at {address} (RAY_ADDRESS)")
    if joined != address:  # a machine with a network interface
        assert f"which Ray joins as {joined}, cannot be reached: connection refused" in message
    else:
        assert "no Ray cluster answered there within 1 s" in message


def test_a_live_ray_cluster_passes_the_check_at_once(tmp_path):
    """The check must not refuse a cluster that is there: a local Ray's GCS answers the probe in well under a
    second (run in a fresh process that starts that Ray and checks its address, with no loopback rewrite)."""
    import subprocess
    import sys

    code = (
        "import time\n"
        "from jobs.ray_cluster import _gcs_problem, check_reachable, init_ray\n"
        "import ray\n"
        "init_ray(num_cpus=1, quiet=True)\n"
        "address = ray.get_runtime_context().gcs_address\n"
        "started = time.monotonic()\n"
        "assert _gcs_problem(address, 10.0) is None\n"
        "check_reachable(address, gcs_timeout_s=10.0)\n"
        "print('PROBE', round(time.monotonic() - started, 3))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    seconds = float(done.stdout.split("PROBE", 1)[1].split()[0])
    assert seconds < 5, seconds


def _output_with_row_errors(out: str) -> dict[str, str]:
    """Three shard pairs: [a ok, b read_error, c write_error], [d missing, e ok], [f read_error]; each row one face
    row. Returns id -> status."""
    import pyarrow as pa

    from stylid_core.ledger import write_shard_pair

    shards = [{"a": "ok", "b": "read_error", "c": "write_error"}, {"d": "missing", "e": "ok"}, {"f": "read_error"}]
    for rows in shards:
        ids = list(rows)
        metrics = pa.table({"image_id": ids, "status": [rows[i] for i in ids], "error": ["x"] * len(ids)})
        faces = pa.table({"image_id": ids, "face_index": [0] * len(ids)})
        write_shard_pair(out, faces, metrics, {})
    return {i: s for rows in shards for i, s in rows.items()}


def _ledger_ids(out: str) -> tuple[list[str], list[str]]:
    from stylid_core.ledger import FACES, METRICS, iter_shards

    metrics = [i for t in iter_shards(out, METRICS, {}, ["image_id"]) for i in t.column("image_id").to_pylist()]
    faces = [i for t in iter_shards(out, FACES, {}, ["image_id"]) for i in t.column("image_id").to_pylist()]
    return sorted(metrics), sorted(faces)


def test_a_rerun_takes_transient_row_errors_out_of_the_ledger_and_keeps_the_rest(tmp_path):
    from stylid_core.ledger import release_retried_rows

    out = str(tmp_path / "out")
    _output_with_row_errors(out)
    assert release_retried_rows(out, {}) == 3  # b, c and f: read and write errors are retried
    assert _ledger_ids(out) == (["a", "d", "e"], ["a", "d", "e"])  # missing is permanent: d stays done
    assert not [n for n in os.listdir(os.path.join(out, "metrics")) if not n.endswith(".parquet")]
    assert sorted(os.listdir(os.path.join(out, "faces"))) == sorted(os.listdir(os.path.join(out, "metrics")))
    assert release_retried_rows(out, {}) == 0  # nothing left to retry


def test_the_plan_of_a_rerun_finds_the_retried_rows_pending(tmp_path):
    import pyarrow as pa

    from pipelines.manifest import ManifestReader
    from stylid_core.ledger import release_retried_rows
    from tests.pending import manifest_file, plan_rows

    out = str(tmp_path / "out")
    statuses = _output_with_row_errors(out)
    manifest = manifest_file(
        tmp_path / "m" / "manifest.parquet",
        pa.table({"image_id": list(statuses), "image_uri": [f"/in/{i}.png" for i in statuses]}),
    )
    done, pending = plan_rows(ManifestReader(manifest, None), out)
    assert len(pending) == 0  # before: an outage's rows counted as done for good
    release_retried_rows(out, {})
    done, pending = plan_rows(ManifestReader(manifest, None), out)
    assert sorted(pending.column("image_id").to_pylist()) == ["b", "c", "f"]
    assert sorted(done.to_pylist()) == ["a", "d", "e"]


def test_a_retried_row_whose_id_left_the_manifest_keeps_its_error_row(tmp_path):
    """Rows b and f failed with a transient error, then left the manifest: released, they would be pending nowhere
    and their record gone. Only c, still in the manifest, is released and planned again."""
    import pyarrow as pa

    from pipelines.manifest import ManifestReader
    from pipelines.runner import ledger
    from tests.pending import manifest_file, plan_rows

    out = str(tmp_path / "out")
    _output_with_row_errors(out)
    kept = ["a", "c", "d", "e", "g"]
    manifest = ManifestReader(
        manifest_file(tmp_path / "m" / "manifest.parquet",
                      pa.table({"image_id": kept, "image_uri": [f"/in/{i}.png" for i in kept]})),  # fmt: skip
        None,
    )
    assert ledger.release_retried_rows(out, {}, still_wanted=manifest.present_ids) == 1
    assert _ledger_ids(out) == (["a", "b", "d", "e", "f"], ["a", "b", "d", "e", "f"])
    done, pending = plan_rows(manifest, out)
    assert sorted(pending.column("image_id").to_pylist()) == ["c", "g"]
    assert ledger.release_retried_rows(out, {}, still_wanted=manifest.present_ids) == 0


@pytest.mark.parametrize("step", range(9))
def test_releasing_rows_interrupted_at_any_step_never_loses_or_doubles_a_row(tmp_path, monkeypatch, step):
    """Every put and delete of the release in turn raises: the ledger still holds each kept row once, and a later
    run (after ``stylid compact`` finishes an open journal) releases whatever is left."""
    import stylid_core.ledger as ledger

    class Interrupted(BaseException):
        pass

    out = str(tmp_path / "out")
    _output_with_row_errors(out)
    calls = [0]

    def dying(real):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == step + 1:
                raise Interrupted(step)
            return real(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(ledger, "write_bytes", dying(ledger.write_bytes))
    monkeypatch.setattr(ledger, "delete", dying(ledger.delete))
    try:
        ledger.release_retried_rows(out, {})
        interrupted = False
    except Interrupted:
        interrupted = True
    monkeypatch.undo()
    assert interrupted == (step < 8)  # 6 calls replace the first shard, 2 delete the third
    metrics, _ = _ledger_ids(out)
    assert len(metrics) == len(set(metrics)) and {"a", "d", "e"} <= set(metrics)
    ledger.compact(out, {}, rows_per_shard=2)  # finishes or undoes an open journal, merges nothing (>= half full)
    ledger.release_retried_rows(out, {})
    metrics, faces = _ledger_ids(out)
    assert metrics == ["a", "d", "e"] and faces == ["a", "d", "e"], (step, interrupted)


def test_rows_an_outage_failed_are_redone_by_the_rerun_once_storage_is_back(tmp_path, ray_session):
    """End to end on a local Ray: images behind an HTTP server that is down for the first run (read_error rows,
    exit 0) and up for the rerun, which redoes exactly those rows; each id is in the metrics once."""
    import functools
    import http.server
    import socket

    import numpy as np
    from PIL import Image

    from jobs.run import run_job
    from stylid_core.config import JobConfig
    from tests.stored_rows import stored_rows

    served = tmp_path / "served"
    served.mkdir()
    rng = np.random.default_rng(0)
    for name in ("x", "y"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(served / f"{name}.png")
    local = tmp_path / "local.png"
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(local)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rows = [{"image_id": n, "image_uri": f"http://127.0.0.1:{port}/{n}.png"} for n in ("x", "y")]
    rows.append({"image_id": "z", "image_uri": str(local)})
    manifest = str(tmp_path / "m.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), manifest)
    config = JobConfig.from_dict({"score": {"redetect": False, "compare_without_mosaic": False},
                                  "io": {"retries": 1}})  # fmt: skip
    out = str(tmp_path / "out")
    first = run_job(config, out, manifest, report=False)
    statuses = stored_rows(f"{out}/metrics").set_index("image_id")["status"].to_dict()
    assert statuses["x"] == statuses["y"] == "read_error" and statuses["z"] != "read_error"
    assert first["this_run"]["processed"] == 3

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        again = run_job(config, out, manifest, report=False)
    finally:
        server.shutdown()
        server.server_close()
    assert again["this_run"]["already_done"] == 1 and again["this_run"]["processed"] == 2
    metrics = stored_rows(f"{out}/metrics")
    assert sorted(metrics["image_id"]) == ["x", "y", "z"]  # once each
    assert "read_error" not in set(metrics["status"])
    assert again["summary"]["rows"] == 3


def test_a_rerun_with_another_config_after_a_crash_is_refused(tmp_path):
    """run.json is written at the end: a run killed before it left rows of its config and no record of it, and a
    rerun with another --set mixed two configs' rows. The config is now recorded before the first row."""
    from jobs.output import CONFIG_RECORD, check_output_config
    from stylid_core.config import ConfigError, JobConfig

    out = str(tmp_path / "out")
    first, other = JobConfig(), JobConfig.from_dict({"stylize": {"options": {"style_strength": 0.5}}})
    check_output_config(out, first, overwrite=False)  # the first run starts ...
    _output_with_row_errors(out)  # ... writes rows, and is killed before run.json
    assert not os.path.exists(os.path.join(out, "run.json"))
    with pytest.raises(ConfigError, match=f"another config \\(hash {first.config_hash()}, this one is"):
        check_output_config(out, other, overwrite=False)
    check_output_config(out, first, overwrite=False)  # the same config resumes
    check_output_config(out, other, overwrite=True)  # --overwrite starts over, recording the new config
    assert not os.path.exists(os.path.join(out, "metrics"))
    with pytest.raises(ConfigError, match=f"another config \\(hash {other.config_hash()}, "):
        check_output_config(out, first, overwrite=False)
    import json

    with open(os.path.join(out, CONFIG_RECORD)) as f:
        assert json.load(f)["config_hash"] == other.config_hash()


def _reverse_rewrite(manifest: str, ids: list[str]) -> None:
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    time.sleep(0.05)  # past the file system's timestamp granularity
    rows = list(reversed(ids))
    pq.write_table(pa.table({"image_id": rows, "image_uri": [f"/in/{i}.png" for i in rows]}), manifest)


def _manifest_of(tmp_path, n: int) -> tuple[str, list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"r{k:02d}" for k in range(n)]
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"image_id": ids, "image_uri": [f"/in/{i}.png" for i in ids]}), manifest,
                   row_group_size=8)  # fmt: skip
    return manifest, ids


def test_a_manifest_rewritten_while_a_resumed_run_plans_fails_instead_of_doubling_rows(tmp_path):
    """16 of 24 rows done; the same 24 rows rewritten in reverse order between the plan's passes. Done flags are
    by position: before, the run did 8 done rows again and never did 8 pending ones, and ended with _SUCCESS."""
    import pyarrow as pa

    from pipelines.manifest import ManifestReader
    from pipelines.plan import PendingRows, plan_pending
    from stylid_core.ledger import write_shard_pair

    manifest, ids = _manifest_of(tmp_path, 24)
    out = str(tmp_path / "out")
    done = pa.table({"image_id": ids[:16], "status": ["ok"] * 16})
    write_shard_pair(out, pa.table({"image_id": ids[:16]}), done, {})

    reader = ManifestReader(manifest, None)  # the plan begins
    _reverse_rewrite(manifest, ids)
    with pytest.raises(RuntimeError, match=f"manifest {manifest} changed while it was read: rewritten after"):
        plan_pending(reader, out, {}, block_rows=lambda n: 4)

    reader = ManifestReader(manifest, None)  # the streamed plan: the rewrite lands between the plan and the reads
    done_ids, pending = plan_pending(reader, out, {}, block_rows=lambda n: 4)
    assert isinstance(pending, PendingRows) and len(pending) == 8
    _reverse_rewrite(manifest, list(reversed(ids)))
    part = pending.slices[0]
    with pytest.raises(RuntimeError, match="rewritten after the plan"):
        pending.reader.read(part.path, part.row_groups, part.start, part.is_done)

    from tests.pending import plan_rows

    _, fresh = plan_rows(ManifestReader(manifest, None), out)  # a new plan reads the file as it is now
    assert sorted(fresh.column("image_id").to_pylist()) == ids[16:]


def test_a_second_writer_of_an_output_is_refused_until_the_first_is_done(tmp_path):
    from stylid_core.lease import LEASE, LeaseHeld, OutputLease

    out = str(tmp_path / "out")
    first = OutputLease(out, settle_s=0.01)
    first.acquire()
    with pytest.raises(LeaseHeld) as info:
        OutputLease(out, settle_s=0.01).acquire()
    message = str(info.value)
    assert message.startswith(f"{out} is being written by another run (pid {os.getpid()} on ")
    assert len(message.splitlines()) == 1
    first.release()
    assert not os.path.exists(os.path.join(out, LEASE))
    with OutputLease(out, settle_s=0.01):  # free again
        assert os.path.exists(os.path.join(out, LEASE))


def test_a_stale_lease_is_taken_over(tmp_path):
    """A crashed run never locks its output: a lease of a dead process here, or one not renewed within the TTL
    (another host), is taken over; a fresh one of another host is not."""
    import json
    import socket
    import subprocess
    import sys
    import time

    from stylid_core.lease import LEASE, LeaseHeld, OutputLease

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    records = {
        "dead pid here": {"token": "t1", "host": socket.gethostname(), "pid": int(dead.stdout),
                          "heartbeat": time.time()},
        "expired": {"token": "t2", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 1000},
        "torn": "{not json",
    }  # fmt: skip
    for name, record in records.items():
        (out / LEASE).write_text(record if isinstance(record, str) else json.dumps(record))
        with OutputLease(str(out), settle_s=0.01):
            assert json.loads((out / LEASE).read_text())["pid"] == os.getpid(), name
    (out / LEASE).write_text(json.dumps({"token": "t3", "host": "elsewhere", "pid": 1, "heartbeat": time.time()}))
    with pytest.raises(LeaseHeld, match="pid 1 on elsewhere"):
        OutputLease(str(out), settle_s=0.01).acquire()


def test_of_two_runs_starting_together_exactly_one_writes(tmp_path):
    from stylid_core.lease import LeaseHeld, OutputLease

    def start(lease: OutputLease, barrier: threading.Barrier, results: list, k: int) -> None:
        barrier.wait()
        try:
            lease.acquire()
            results[k] = "held"
        except LeaseHeld:
            results[k] = "refused"

    for attempt in range(5):
        out = str(tmp_path / f"out{attempt}")
        leases = [OutputLease(out, settle_s=0.2) for _ in range(2)]
        results: list = [None, None]
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=start, args=(leases[k], barrier, results, k)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(results) == ["held", "refused"], (attempt, results)
        for k in range(2):
            if results[k] == "held":
                leases[k].release()


def test_a_job_into_an_output_another_run_writes_stops_before_its_plan(tmp_path):
    import json
    import time

    import pyarrow as pa

    from pipelines.manifest import ManifestReader
    from pipelines.runner import process_pending
    from stylid_core.lease import LEASE, LeaseHeld
    from tests.pending import manifest_file

    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE).write_text(json.dumps({"token": "t", "host": "other-node", "pid": 7, "heartbeat": time.time()}))
    built = []
    manifest = ManifestReader(
        manifest_file(tmp_path / "m.parquet", pa.table({"image_id": ["a"], "image_uri": ["/in/a.png"]})), None
    )
    with pytest.raises(LeaseHeld, match="being written by another run"):
        process_pending(manifest, str(out), {}, lambda rows, writers: built.append(rows), block_rows=lambda n: 1)
    assert built == [] and sorted(os.listdir(out)) == [LEASE]


def test_a_full_or_read_only_output_ends_in_one_line(monkeypatch, capsys, tmp_path):
    """Item 17: disk full, a quota or a read-only output ends the job with one line naming the output and the cause
    (it was a ~300-line Ray traceback), found behind ``raise ... from`` and Ray's task errors (``.cause``)."""
    import errno as errno_module

    from jobs import cli

    class TaskError(Exception):  # the shape of ray.exceptions.RayTaskError: the worker's exception as .cause
        def __init__(self, cause):
            super().__init__("task failed")
            self.cause = cause

    full = OSError(errno_module.ENOSPC, "No space left on device", str(tmp_path / "metrics" / "part-1.parquet"))
    assert cli.storage_failure(TaskError(full)) is full
    assert cli.storage_failure(RuntimeError("x")) is None
    assert cli.storage_failure(OSError(errno_module.ENOENT, "gone")) is None  # not a full or read-only output

    real = cli.build_parser

    def failing_with(exc):
        class Parser:  # the real parser, the job replaced by one that fails with exc
            def parse_args(self, argv):
                args = real().parse_args(argv)
                args.func = lambda a: (_ for _ in ()).throw(exc)
                return args

        return Parser

    monkeypatch.setattr(cli, "build_parser", failing_with(TaskError(full)))
    assert cli.main(["run", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"stylid run: error: output {tmp_path}: No space left on device")
    monkeypatch.setattr(cli, "build_parser", failing_with(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # anything else is not hidden
        cli.main(["run", "--output", str(tmp_path)])


def test_a_config_path_from_another_folder_is_found_in_the_projects_configs(tmp_path, monkeypatch):
    """Issue 26 item 8: ``cd /tmp && stylid run --config configs/default.yaml`` looked for configs/configs/..."""
    from jobs.config import CONFIG_DIR, resolve_config_path
    from stylid_core.config import ConfigError

    monkeypatch.chdir(tmp_path)
    for name in ("configs/default.yaml", "default.yaml", "default"):
        assert resolve_config_path(name) == os.path.join(CONFIG_DIR, "default.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "default.yaml").write_text("name: mine\n")
    assert resolve_config_path("configs/default.yaml") == "configs/default.yaml"  # a file here wins
    with pytest.raises(ConfigError, match=r"nope.yaml. not found: not a file from .*, and .*nope.yaml does not"):
        resolve_config_path("configs/nope.yaml")


def test_two_stylid_run_processes_started_together_write_each_row_once(tmp_path):
    """Item 4 as a user meets it: two ``stylid run`` processes (each with its own local Ray) started at the same
    moment into one output. One is refused in one line (exit 2) while the other holds the output's lease, or, if
    the first was already done, the second finds every row done; either way every id is in the metrics once."""
    import contextlib
    import time

    import psutil
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.processes import note_tree
    from tests.stored_rows import stored_rows
    from tests.test_local_ray import small_photos, start_stylid, stylid_env

    rows = small_photos(str(tmp_path / "in"), 4)
    manifest, out = str(tmp_path / "m.parquet"), str(tmp_path / "out")
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    args = ["run", "--manifest", manifest, "--output", out, "--num-cpus", "1", "--no-report",
            "--set", "score.redetect=false", "--set", "score.compare_without_mosaic=false"]  # fmt: skip
    logs = [str(tmp_path / f"run{k}.log") for k in range(2)]
    procs = [start_stylid(args, stylid_env(), log) for log in logs]
    seen: dict = {}
    deadline = time.monotonic() + 400
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            for p in procs:
                note_tree(p.pid, seen)
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
    finally:
        for child in seen.values():  # what is left of either run's local Ray, by PID
            with contextlib.suppress(psutil.Error):
                child.kill()
    texts = [open(log, errors="replace").read() for log in logs]
    assert sorted(codes) in ([0, 2], [0, 0]), (codes, [t[-2000:] for t in texts])
    if 2 in codes:
        refused = texts[codes.index(2)]
        assert "is being written by another run" in refused
        assert "Traceback" not in refused
    metrics = stored_rows(os.path.join(out, "metrics"))
    assert sorted(metrics["image_id"]) == sorted(r["image_id"] for r in rows)  # once each, none lost


def test_manifest_kinds_many_teams_write_each_end_with_a_clear_status(tmp_path, monkeypatch):
    """docs/inputs.md, the manifest side: string columns as large_string and dictionary-encoded, ids blank or
    with a line break, URIs with spaces and percent signs, ``file://`` and relative paths, a scheme no filesystem
    here serves (``unsupported``, never retried) and a refused ``ftp://`` (a retried ``read_error``). Each row
    ends with its status, and every error names its URI."""
    import pyarrow as pa
    from PIL import Image

    from pipelines.stages import FusedCPUStage, prepare_manifest
    from pipelines.stylize import stylize_chain
    from stylid_core.config import JobConfig
    from stylid_core.ledger import RETRIED_STATUSES
    from stylid_core.sample_data import background

    for name in ("a b.png", "p%41.png", "plain.png"):
        Image.fromarray(background(64, 48)).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    cases = {  # id -> (uri, status)
        "space": (str(tmp_path / "a b.png"), "no_face"),
        "percent": (str(tmp_path / "p%41.png"), "no_face"),
        "file-uri": (f"file://{tmp_path / 'plain.png'}", "no_face"),
        "relative": ("plain.png", "no_face"),
        "line\nbreak": (str(tmp_path / "plain.png"), "no_face"),
        "gs": ("gs://bucket/x.png", "unsupported"),
        "unknown-scheme": ("nosuch://bucket/x.png", "unsupported"),
        "ftp": ("ftp://127.0.0.1:9/x.png", "read_error"),
    }
    ids = list(cases) + ["   "]
    uris = [u for u, _ in cases.values()] + [str(tmp_path / "plain.png")]
    table = pa.table({"image_id": pa.array(ids, pa.large_string()), "image_uri": pa.array(uris).dictionary_encode()})
    rows = prepare_manifest(table, None)
    assert rows.column("image_uri").to_pylist() == uris
    derived = rows.column("image_id").to_pylist()[-1]
    assert derived.strip() and derived != "   "  # a blank id gets one derived from its URI
    config = JobConfig.from_dict({"score": {"redetect": False, "compare_without_mosaic": False},
                                  "io": {"retries": 1}})  # fmt: skip
    stage = FusedCPUStage([(s.cls, s.kwargs) for s in stylize_chain(config, str(tmp_path / "out"), key_suffix="")])
    out = stage(rows.to_pandas()).to_pandas().set_index("image_id")
    assert len(out) == len(ids)
    for image_id, (uri, status) in cases.items():
        assert out.loc[image_id, "status"] == status, (image_id, out.loc[image_id, "error"])
        if status != "no_face":
            assert out.loc[image_id, "error"].startswith(uri)
    assert out.loc[derived, "status"] == "no_face"
    assert "unsupported" not in RETRIED_STATUSES and "read_error" in RETRIED_STATUSES


def test_compact_refuses_an_output_a_run_is_writing(tmp_path, capsys):
    """``stylid compact`` rewrites and deletes shards: under the writer lease, so it never compacts under a live
    run; once the run is gone (its lease released) it compacts."""
    import json
    import time

    from jobs.cli import main
    from stylid_core.lease import LEASE

    out = str(tmp_path / "out")
    _two_shard_output(out)
    before = sorted(os.listdir(os.path.join(out, "metrics")))
    record = {"token": "t", "host": "other-node", "pid": 7, "heartbeat": time.time()}
    with open(os.path.join(out, LEASE), "w") as f:
        json.dump(record, f)
    assert main(["compact", out, "--rows-per-shard", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is being written by another run" in err
    assert sorted(os.listdir(os.path.join(out, "metrics"))) == before
    os.remove(os.path.join(out, LEASE))
    assert main(["compact", out, "--rows-per-shard", "10"]) == 0
    assert sorted(os.listdir(os.path.join(out, "metrics"))) != before
    assert not os.path.exists(os.path.join(out, LEASE))  # given back
