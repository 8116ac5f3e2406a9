"""The examples run and find what they should."""

import runpy
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_jelly_beans(capsys, monkeypatch):
    torch.set_default_dtype(torch.float32)  # as a user runs it (the fixture restores float64)
    monkeypatch.setattr(sys, "argv", ["jelly_beans.py", "-n", "300"])
    runpy.run_path(str(EXAMPLES / "jelly_beans.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "converged" in out
    accuracy = float(out.split("beans sorted into their true flavour:")[1].split("%")[0])
    assert accuracy > 90


def test_sprinkler(capsys, monkeypatch):
    torch.set_default_dtype(torch.float32)
    monkeypatch.setattr(sys, "argv", ["sprinkler.py"])
    runpy.run_path(str(EXAMPLES / "sprinkler.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "converged" in out and "wet: closed form" in out
    wet = out.split("wet grass")[1].split("]")[0].strip(" [").split(",")
    assert abs(float(wet[1]) - 0.9) < 0.05 and abs(float(wet[3]) - 0.99) < 0.02


def test_casino(capsys, monkeypatch):
    torch.set_default_dtype(torch.float32)
    monkeypatch.setattr(sys, "argv", ["casino.py", "--rolls", "2000"])
    runpy.run_path(str(EXAMPLES / "casino.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "converged" in out
    six = float(out.split("  loaded [")[2].split("]")[0].split(",")[5])
    accuracy = float(out.split("called right by the posterior:")[1].split("%")[0])
    assert six > 0.4 and accuracy > 75
