"""The command line (python -m slimops): profile and info."""

import json

import pytest

from slimops.__main__ import main


def test_profile_prints_a_row_per_width(capsys):
    assert main(["profile", "slim_cnn", "--input-size", "1", "3", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "slim_cnn, input (1, 3, 32, 32)" in out
    for w in ("0.25x", "0.5x", "0.75x", "1x"):
        assert w in out
    assert "paper MACs" not in out  # no paper figures for the demo model


def test_profile_shows_the_paper_next_to_the_measurement(capsys):
    assert main(["profile", "s_shufflenet"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("2x"))
    assert "5,401,816" in row and "48,960" in row and "524.00M" in row


def test_profile_unknown_model(capsys):
    assert main(["profile", "resnet1000"]) == 2
    assert "unknown model 'resnet1000'" in capsys.readouterr().err


def test_info_is_json(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu"] in ("C++", "reference")


def test_no_command_is_an_error():
    with pytest.raises(SystemExit):
        main([])
