import subprocess
import sys

from coach_runtime.cli import main


def test_help_lists_each_package_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("profile", "plan", "edge", "cloud", "gesfi", "bench", "demo"):
        assert f"  {cmd}" in out


def test_version_and_unknown_command(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("coach ")
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'frobnicate'" in err


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "coach_runtime.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("coach ")
