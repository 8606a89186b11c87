"""colcon builds this package as a robot does, and the install holds what ``ros2 run`` and ``ros2 launch`` need.

The working tree is copied into a temporary workspace's ``src/`` (so colcon writes nothing into the
repository) and built with ``colcon build --packages-select mm_fusion_ros`` (colcon-core and
colcon-ros from PyPI, the ``dev`` extra). Then, in the environment that the install's own
``local_setup.sh`` makes (as ``source install/setup.bash`` does on a robot), the installed console
script runs and the installed copy of the package, not the editable one in the venv, is the one
imported; the ament index finds the share folder the way ``ros2 launch`` looks it up.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "mm_fusion_ros"
EXECUTABLES = ("fusion_node", "camera_node", "microphone_node", "sensor_sim_node", "sim_node", "bag_player",
               "mm-fusion")
SHARED = ("package.xml", "launch/robot.launch.py", "config/robot.yaml", "config/sim.yaml", "config/fastdds_shm.xml",
          "config/msg/audio_common_msgs/AudioData.msg", "config/msg/audio_common_msgs/AudioDataStamped.msg",
          "config/msg/audio_common_msgs/AudioInfo.msg", "config/msg/audio_common_msgs/mgonzs13/AudioStamped.msg")
# What is not source: the venv, git, build outputs of any tool, caches.
IGNORED = shutil.ignore_patterns(".git", ".venv", "artifacts", "build", "install", "log", "__pycache__", "*.pyc",
                                 "*.egg-info", ".pytest_cache", ".whl", ".gl")
COLCON = Path(sys.executable).parent / "colcon"
PY_DIR = f"python{sys.version_info.major}.{sys.version_info.minor}"

# In the install's environment: where the package, its console script's entry point, the ament
# index and the config lookups resolve.
PROBE = r"""
import json, sys
from importlib.metadata import distribution
import mm_fusion_ros, mm_fusion_ros.cli
from ament_index_python.packages import get_package_prefix, get_package_share_directory
from mm_fusion_ros import procs
from mm_fusion_ros.bag.typestore import msg_dir
scripts = {e.name: e.value for e in distribution("mm_fusion_ros").entry_points if e.group == "console_scripts"}
print(json.dumps({"package": mm_fusion_ros.__file__, "cli": mm_fusion_ros.cli.__file__,
                  "prefix": get_package_prefix("mm_fusion_ros"), "share": get_package_share_directory("mm_fusion_ros"),
                  "profile": str(procs.config_file("fastdds_shm.xml")),
                  "robot_yaml": str(procs.config_file("robot.yaml")),
                  "msg_dir": str(msg_dir()), "scripts": scripts}))
"""


def _console_scripts() -> set[str]:
    """The console_scripts setup.py declares, read from its text (running setup.py would need setuptools' CLI)."""
    import ast
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    return {ast.literal_eval(v).split("=")[0].strip() for v in value.elts}
    raise AssertionError("setup.py declares no console_scripts")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    if not COLCON.is_file():
        pytest.fail(f"{COLCON} is missing: colcon-core and colcon-ros are in the dev extra (pip install -e '.[dev]')")
    ws = tmp_path_factory.mktemp("colcon_ws")
    shutil.copytree(REPO, ws / "src" / PACKAGE, ignore=IGNORED, symlinks=True)
    env = {k: v for k, v in os.environ.items() if k not in ("AMENT_PREFIX_PATH", "COLCON_PREFIX_PATH", "PYTHONPATH")}
    env.update(COLCON_HOME=str(ws / ".colcon"), PATH=f"{COLCON.parent}{os.pathsep}{env.get('PATH', '')}")
    cmd = [str(COLCON), "--log-base", str(ws / "log"), "build", "--base-paths", str(ws / "src"),
           "--build-base", str(ws / "build"), "--install-base", str(ws / "install"),
           "--packages-select", PACKAGE]
    result = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"colcon build failed:\n{result.stdout}\n{result.stderr}"
    assert f"Finished <<< {PACKAGE}" in result.stdout, result.stdout
    return ws


def _in_install(ws: Path, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``command`` in bash after sourcing the install's local_setup.sh, with nothing of ours inherited."""
    env = {k: v for k, v in os.environ.items() if k not in ("AMENT_PREFIX_PATH", "COLCON_PREFIX_PATH", "PYTHONPATH")}
    return subprocess.run(["bash", "-c", f"set -e; . {ws / 'install' / 'local_setup.sh'}; {command}"], cwd=ws / "log",
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_install_holds_the_executables_launch_files_config_and_ament_index(workspace):
    prefix = workspace / "install" / PACKAGE
    assert set(EXECUTABLES) == _console_scripts()   # every entry point, and the list here is complete
    for name in EXECUTABLES:
        exe = prefix / "lib" / PACKAGE / name         # where ros2 run looks
        assert exe.is_file() and os.access(exe, os.X_OK), exe
        assert exe.read_text().startswith("#!") and f"'{name}'" in exe.read_text(), exe
    share = prefix / "share" / PACKAGE
    for rel in SHARED:                                # where ros2 launch and the nodes look
        assert filecmp.cmp(share / rel, REPO / rel, shallow=False), rel
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE).is_file()
    site = prefix / "lib" / PY_DIR / "site-packages"
    assert (site / PACKAGE / "ros" / "fusion_node.py").is_file() and (site / PACKAGE / "sim" / "cell.py").is_file()
    assert not (site / "test").exists() and not (site / "tools").exists()   # no stray top-level packages
    # The build leaves the source tree alone (on a robot it is the checkout): no build/ or egg-info in it.
    assert not (workspace / "src" / PACKAGE / "build").exists()
    assert not list((workspace / "src" / PACKAGE).glob("*.egg-info"))


def test_installed_console_script_runs_from_the_install(workspace):
    import json

    prefix = workspace / "install" / PACKAGE
    result = _in_install(workspace, f"{prefix / 'lib' / PACKAGE / 'mm-fusion'} --help")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage: mm-fusion" in result.stdout and "replay" in result.stdout, result.stdout
    probe = _in_install(workspace, f"{sys.executable} -c '{PROBE}'")
    assert probe.returncode == 0, probe.stdout + probe.stderr
    where = json.loads(probe.stdout.strip().splitlines()[-1])
    site = prefix / "lib" / PY_DIR / "site-packages" / PACKAGE
    # The install's copy is the one imported (not the venv's editable checkout), entry points included.
    assert Path(where["package"]) == site / "__init__.py" and Path(where["cli"]) == site / "cli.py"
    assert set(where["scripts"]) == set(EXECUTABLES) and where["scripts"]["mm-fusion"] == "mm_fusion_ros.cli:main"
    # ros2 run / ros2 launch resolve the package through the ament index to this install.
    assert Path(where["prefix"]) == prefix and Path(where["share"]) == prefix / "share" / PACKAGE
    # The installed code finds its shipped files in the install's share, not in a checkout.
    assert Path(where["profile"]) == prefix / "share" / PACKAGE / "config" / "fastdds_shm.xml"
    assert Path(where["robot_yaml"]) == prefix / "share" / PACKAGE / "config" / "robot.yaml"
    assert Path(where["msg_dir"]) == prefix / "share" / PACKAGE / "config" / "msg"

