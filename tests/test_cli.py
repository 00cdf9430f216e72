"""The ``stylid`` command: help, a run through the CLI with --set, ``stylid report`` and bad --set handling."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from jobs.cli import main


def test_run_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--manifest", "--output", "--config", "--set", "--overwrite"):
        assert option in out


def test_report_help_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["report", "--help"])
    assert info.value.code == 0 and "output" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["paint"])
    assert info.value.code == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("faces.upsample=9", "faces.upsample must be in 0..4"),
        ("faces.colour=red", "unknown config key(s): faces.colour"),
        ("faces.upsample", "--set expects key=value"),
        ("stylize.mosaic.margin=-1", "stylize.mosaic.margin"),
    ],
)
def test_bad_set_exits_2_with_a_clear_message(override, message, capsys, tmp_path):
    code = main(["run", "--output", str(tmp_path / "out"), "--set", override])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("stylid run: error:") and message in err
    assert not os.path.exists(tmp_path / "out")  # refused before any work


def test_unknown_config_name_exits_2(capsys, tmp_path):
    assert main(["run", "--output", str(tmp_path / "out"), "--config", "nope"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cli_output(ray_session, tmp_path_factory):
    from PIL import Image

    from stylid_core.sample_data import load_photo

    tmp = tmp_path_factory.mktemp("cli")
    img = Image.fromarray(load_photo("biden"))
    img.resize((img.width // 2, img.height // 2)).save(tmp / "biden.jpg")
    manifest = tmp / "manifest.parquet"
    pd.DataFrame({"image_id": ["biden"], "image_uri": [str(tmp / "biden.jpg")]}).to_parquet(manifest)
    output = tmp / "out"
    code = main(["run", "--manifest", str(manifest), "--output", str(output), "--num-cpus", "2",
                 "--set", "score.redetect=false", "--set", "stylize.options.style_strength=0.8"])  # fmt: skip
    assert code == 0
    return output


def test_run_through_the_cli_applies_set_overrides(cli_output):
    with open(cli_output / "run.json") as f:
        run = json.load(f)
    assert run["config"]["score"]["redetect"] is False
    assert run["config"]["stylize"]["options"] == {"style_strength": 0.8}
    assert run["is_default_config"] is False
    assert os.listdir(cli_output / "images") == [f"biden-{run['config_hash']}.png"]
    assert (cli_output / "_SUCCESS").is_file()


def test_report_rewrites_report_html(cli_output, capsys):
    report = cli_output / "report.html"
    assert report.is_file()
    report.write_text("stale")
    assert main(["report", str(cli_output)]) == 0
    assert "report:" in capsys.readouterr().out
    html = report.read_text()
    assert html != "stale" and "<html" in html.lower() and "biden" in html
