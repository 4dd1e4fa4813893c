"""jaxcollab as an installed tool: the wheel carries its configs and the `jaxcollab` command, every command
answers --help, and a launch from another directory by config name writes its provenance."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from jaxcollab.__main__ import COMMANDS
from jaxcollab.configs import resolve

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_launch import SMALL  # noqa: E402


def run(args, cwd, pythonpath=None, timeout=600):
    env = {**os.environ}
    env.pop("XLA_FLAGS", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel `pip` builds from the checkout, unpacked as site-packages would hold it."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # setuptools writes build/ into the tree it builds: a copy keeps the checkout clean
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                                "__pycache__", ".*_cache"))
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("jaxcollab-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def test_wheel_carries_the_configs_and_the_console_script(installed):
    assert (installed / "jaxcollab" / "configs" / "semi.py").is_file()
    assert (installed / "jaxcollab" / "configs" / "full.py").is_file()
    (entry_points,) = installed.glob("jaxcollab-*.dist-info/entry_points.txt")
    assert "jaxcollab = jaxcollab.__main__:main" in entry_points.read_text()


def test_config_names_resolve_to_packaged_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("semi:smollm2").endswith(os.path.join("jaxcollab", "configs", "semi.py") + ":smollm2")
    assert resolve("full").endswith(os.path.join("jaxcollab", "configs", "full.py"))
    assert resolve("configs/semi.py:tiny_trace") == "configs/semi.py:tiny_trace"
    (tmp_path / "semi").write_text("")  # a file of that name in the working directory is not shadowed
    assert resolve("semi") == "semi"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help(command, installed, tmp_path):
    result = run(["-m", "jaxcollab", command, "--help"], cwd=tmp_path, pythonpath=str(installed))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower() or "flags:" in result.stdout


def test_unknown_command_is_a_usage_error(tmp_path):
    result = run(["-m", "jaxcollab", "lanch"], cwd=tmp_path)
    assert result.returncode == 2 and "unknown command 'lanch'" in result.stderr and "launch" in result.stderr


def test_launch_by_config_name_from_another_directory_records_provenance(installed, tmp_path):
    flags = [f"--config.{k}={v}" for k, v in SMALL.items()]
    result = run(["-m", "jaxcollab", "launch", "--config=semi", "--config.strategies=seq_lora", *flags,
                  f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, pythonpath=str(installed))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(results["strategies"]) == ["seq_lora"]
    provenance = results["provenance"]
    assert provenance["jaxcollab"] == "0.1.0" and provenance["git"] is None  # no checkout around the wheel
    assert provenance["libraries"]["jax"]
    module = run(["-c", "import jaxcollab; print(jaxcollab.__file__)"], cwd=tmp_path, pythonpath=str(installed))
    assert module.stdout.strip().startswith(str(installed))  # the unpacked wheel ran, not the checkout
