"""What every ``stylid`` command shares (``jobs.config``, ``jobs.output``): ``--set``, ``--num-cpus`` and
``--address``; the output lifecycle (config check, ``_SUCCESS`` cleared at open and written last, ``run.json``
with ``job``); ``stylid score``'s preflight; ``--overwrite`` under the writer lease; the metrics version of
``_config.json``."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
from PIL import Image

import jobs.customize
import jobs.run
import jobs.score
import jobs.train_customizer
from jobs.cli import main
from jobs.output import CONFIG_RECORD, check_output_config, close_output, open_output
from stylid_core.config import ConfigError, JobConfig
from stylid_core.lease import LeaseHeld, OutputLease
from stylid_core.metrics import METRICS_VERSION
from stylid_core.sample_data import load_photo

NULL = ["--config", "stylize_null"]


class RayStarted(Exception):
    """Raised in place of starting Ray: the command got past its checks."""


def _no_ray(monkeypatch) -> list[tuple]:
    """Every command's ``init_ray`` replaced by one that records its arguments and raises ``RayStarted``."""
    calls: list[tuple] = []

    def init_ray(*args, **kwargs):
        calls.append(args)
        raise RayStarted

    for module in (jobs.run, jobs.score, jobs.customize, jobs.train_customizer):
        monkeypatch.setattr(module, "init_ray", init_ray)
    return calls


def _photo(path, stem: str = "biden", side: int = 96) -> str:
    img = Image.fromarray(load_photo(stem))
    img.resize((side, side)).save(path)
    return str(path)


@pytest.fixture
def argvs(tmp_path) -> dict[str, list[str]]:
    """A valid command line of each job that writes (its inputs small files under ``tmp_path``)."""
    photo = _photo(tmp_path / "a.png")
    pairs = str(tmp_path / "pairs.parquet")
    pd.DataFrame({"image_id": ["a"], "source_uri": [photo], "output_uri": [photo]}).to_parquet(pairs)
    refs = str(tmp_path / "refs.parquet")
    pd.DataFrame({"image_id": ["a"], "reference_uri": [photo], "prompt": ["x"]}).to_parquet(refs)
    train = str(tmp_path / "train.parquet")
    pd.DataFrame({"image_uri": [photo]}).to_parquet(train)
    return {
        "run": ["run", "--output", str(tmp_path / "run"), *NULL],
        "score": ["score", "--manifest", pairs, "--output", str(tmp_path / "score")],
        "customize": ["customize", "--config", "customize_tiny", "--manifest", refs, "--output",
                      str(tmp_path / "customize")],
        "train-customizer": ["train-customizer", "--config", "train_facesnap_tiny", "--manifest", train,
                             "--storage-path", str(tmp_path / "ckpt")],
    }  # fmt: skip


@pytest.mark.parametrize("command", ["run", "score", "customize", "train-customizer"])
def test_every_command_takes_num_cpus_and_address_to_ray(command, argvs, monkeypatch):
    calls = _no_ray(monkeypatch)
    with pytest.raises(RayStarted):
        main([*argvs[command], "--num-cpus", "3", "--address", "127.0.0.1:6379"])
    assert calls == [("127.0.0.1:6379", 3)]


@pytest.mark.parametrize("command", ["run", "score", "customize", "train-customizer"])
def test_every_command_applies_set_before_ray(command, argvs, monkeypatch, capsys):
    calls = _no_ray(monkeypatch)
    assert main([*argvs[command], "--set", "bogus_key=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"stylid {command}: error: unknown config key(s)") and "bogus_key" in err
    assert len(err.splitlines()) == 1 and calls == []


def test_set_reaches_the_customize_and_train_configs(tmp_path):
    from jobs.config import load_config

    assert load_config("customize", "customize_tiny", ["default_num_images=2"]).default_num_images == 2
    # a command's own flag is taken as it is (no YAML parsing of a path), after --set
    train = load_config("train", "train_facesnap_tiny", ["max_steps=3", "manifest=a.parquet"],
                        {"manifest": "/x: y #z.parquet", "num_workers": None})  # fmt: skip
    assert (train.max_steps, train.manifest) == (3, "/x: y #z.parquet")


def test_score_preflight_refuses_a_bad_manifest_in_one_line_before_ray(tmp_path, monkeypatch, capsys):
    calls = _no_ray(monkeypatch)
    missing = str(tmp_path / "nope.parquet")
    assert main(["score", "--manifest", missing, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stylid score: error: ") and missing in err and len(err.splitlines()) == 1
    photo = _photo(tmp_path / "a.png")
    twice = str(tmp_path / "twice.parquet")
    pd.DataFrame({"image_id": ["a", "a"], "source_uri": [photo] * 2, "output_uri": [photo] * 2}).to_parquet(twice)
    assert main(["score", "--manifest", twice, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stylid score: error: ") and "'a'" in err and len(err.splitlines()) == 1
    assert calls == [] and not (tmp_path / "out").exists()


def test_score_preflight_refuses_an_output_it_cannot_write_in_one_line_before_ray(argvs, tmp_path, monkeypatch,
                                                                                   capsys):  # fmt: skip
    calls = _no_ray(monkeypatch)
    (tmp_path / "a-file").write_text("not a folder")
    argv = [*argvs["score"][:3], "--output", str(tmp_path / "a-file" / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"stylid score: error: output {tmp_path / 'a-file' / 'out'} is not writable")
    assert len(err.splitlines()) == 1 and calls == []


def test_success_is_cleared_at_open_and_written_after_run_json_and_the_report(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    open(os.path.join(out, "_SUCCESS"), "w").close()  # a finished earlier run of the same config
    run = open_output("run", JobConfig(), out)
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))
    seen = {}

    def report(run_json: dict) -> str:
        seen["run.json"] = json.load(open(os.path.join(out, "run.json")))
        seen["success"] = os.path.exists(os.path.join(out, "_SUCCESS"))
        return os.path.join(out, "report.html")

    info = close_output(run, {"summary": {"rows": 0}}, report)
    assert seen["success"] is False and seen["run.json"]["summary"] == {"rows": 0}  # run.json, report, _SUCCESS
    assert os.path.exists(os.path.join(out, "_SUCCESS")) and info["report"].endswith("report.html")
    for key in ("job", "metrics_version", "config", "config_hash", "versions", "started", "finished"):
        assert key in seen["run.json"], key
    assert seen["run.json"]["job"] == "run" and seen["run.json"]["started"] <= seen["run.json"]["finished"]


def _metrics_shard(out: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(out, "metrics"), exist_ok=True)
    pq.write_table(pa.table({"image_id": ["x"], "status": ["ok"]}), os.path.join(out, "metrics", "part-0.parquet"))


def test_overwrite_is_refused_while_another_run_holds_the_lease(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    first = JobConfig.from_dict({"stylize": {"options": {"style_strength": 0.5}}})
    check_output_config(out, first, overwrite=False)
    _metrics_shard(out)  # the first run's rows, while it still writes
    lease = OutputLease(out, settle_s=0.01)
    lease.acquire()
    try:
        with pytest.raises(LeaseHeld):
            check_output_config(out, JobConfig(), overwrite=True)
        assert os.path.exists(os.path.join(out, "metrics", "part-0.parquet"))  # nothing removed
        calls = _no_ray(monkeypatch)
        assert main(["run", "--output", out, "--overwrite"]) == 2  # the CLI: one line, before Ray
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"stylid run: error: {out} is being written by another run (pid {os.getpid()}")
        assert len(err.splitlines()) == 1 and calls == []
        assert os.path.exists(os.path.join(out, "metrics", "part-0.parquet"))
    finally:
        lease.release()
    check_output_config(out, JobConfig(), overwrite=True)  # the lease given back: the overwrite goes ahead
    assert not os.path.exists(os.path.join(out, "metrics"))
    assert not os.path.exists(os.path.join(out, "_writer.json"))  # and gives the lease back


def test_config_record_holds_the_metrics_version_and_a_crashed_output_of_another_is_refused(tmp_path):
    out = str(tmp_path / "out")
    config = JobConfig()
    check_output_config(out, config, overwrite=False, job="run")
    record = json.load(open(os.path.join(out, CONFIG_RECORD)))
    assert record["metrics_version"] == METRICS_VERSION and record["job"] == "run"
    # a run of an older stylid (same config hash, another metrics version) crashed before its run.json
    record["metrics_version"] = METRICS_VERSION - 1
    json.dump(record, open(os.path.join(out, CONFIG_RECORD), "w"))
    _metrics_shard(out)
    with pytest.raises(ConfigError, match=f"metrics version {METRICS_VERSION - 1} \\(this stylid writes"):
        check_output_config(out, config, overwrite=False)
    check_output_config(out, config, overwrite=True)
    assert not os.path.exists(os.path.join(out, "metrics"))
    assert json.load(open(os.path.join(out, CONFIG_RECORD)))["metrics_version"] == METRICS_VERSION
    check_output_config(out, config, overwrite=False)  # resumable again
    # a record of a stylid before it recorded a version is taken as it is (and updated)
    json.dump({"config_hash": config.config_hash()}, open(os.path.join(out, CONFIG_RECORD), "w"))
    check_output_config(out, config, overwrite=False)
    assert json.load(open(os.path.join(out, CONFIG_RECORD)))["metrics_version"] == METRICS_VERSION


def test_run_and_score_write_run_json_with_their_job(ray_session, tmp_path):
    """``stylid run`` on the null stylizer, then ``stylid score`` of its output: each ``run.json`` names its job."""
    from jobs.config import load_config

    manifest = str(tmp_path / "m.parquet")
    photos = [_photo(tmp_path / "a.png"), _photo(tmp_path / "b.png", "obama")]
    pd.DataFrame({"image_id": ["a", "b"], "image_uri": photos}).to_parquet(manifest)
    run_out, score_out = str(tmp_path / "run"), str(tmp_path / "score")
    info = jobs.run.run_job(load_config("run", "stylize_null"), run_out, manifest, report=False)
    config, gate = load_config("score", "nightly_score", ["faces.backend=centered"])
    scored = jobs.score.run_score_job(config, gate, run_out, score_out, report=False)
    for out, job, returned in ((run_out, "run", info), (score_out, "score", scored)):
        written = json.load(open(os.path.join(out, "run.json")))
        assert written["job"] == job and written["metrics_version"] == METRICS_VERSION
        assert written["config_hash"] == returned["config_hash"] and written["config"]["io"]["storage_options"] == {}
        assert written["summary"]["rows"] == 2 and written["this_run"]["processed"] == 2
        assert os.path.getmtime(os.path.join(out, "_SUCCESS")) >= os.path.getmtime(os.path.join(out, "run.json"))
        assert json.load(open(os.path.join(out, CONFIG_RECORD)))["job"] == job
