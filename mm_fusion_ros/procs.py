"""Starting and stopping the node executables as separate processes (demo, live benchmark, tests).

ROS-free on purpose: the parent never has to import rclpy to run a pipeline.
Every child gets the environment that keeps DDS on this machine
(``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``), its own ``ROS_DOMAIN_ID`` shared
by the whole pipeline, and the shipped Fast DDS profile
(``config/fastdds_shm.xml``: a shared-memory segment large enough for a
640x480 rgb8 frame). A child is stopped by its PID only: SIGINT (the clean
path, the node prints its statistics), then SIGTERM, then SIGKILL.

Each child writes stdout and stderr to a log file, never to a pipe that could
fill up and block it. Nodes print one ``mm_fusion_stats {json}`` line at exit;
``NodeProcess.stats()`` reads it back.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE = "mm_fusion_ros"
PROFILE_ENV = "FASTDDS_DEFAULT_PROFILES_FILE"
STATS_PREFIX = "mm_fusion_stats "
_running: dict[int, "NodeProcess"] = {}


def print_stats(stats: dict) -> None:
    """A node's one statistics line at exit, which ``NodeProcess.stats`` reads back from its log."""
    print(STATS_PREFIX + json.dumps(stats), flush=True)


def config_file(name: str) -> Path:
    """A file shipped in config/: the source checkout's, else the installed share/mm_fusion_ros/config
    (a pip install's prefix, or a colcon install found through the ament index)."""
    candidates = [Path(__file__).resolve().parents[1] / "config" / name,
                  Path(sys.prefix) / "share" / PACKAGE / "config" / name]
    for path in candidates:
        if path.is_file():
            return path
    try:  # a colcon install (a robot): share/ lies in the ament prefix, not in the interpreter's
        from ament_index_python.packages import get_package_share_directory
        path = Path(get_package_share_directory(PACKAGE)) / "config" / name
    except Exception:  # noqa: BLE001 - no ament index here, or the package is not installed in it
        pass
    else:
        if path.is_file():
            return path
        candidates.append(path)
    raise FileNotFoundError(f"config file {name!r} not found; looked in {', '.join(str(p.parent) for p in candidates)}")


def isolated_domain_id() -> int:
    """A domain for this run: the caller's ROS_DOMAIN_ID if set, else one derived from our PID (1..100)."""
    value = os.environ.get("ROS_DOMAIN_ID", "")
    return int(value) if value.isdigit() else 1 + os.getpid() % 100


def ros_env(domain_id: int | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a process that starts ROS 2 here (also apply it to os.environ before importing rclpy)."""
    env = dict(os.environ if base is None else base)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_LOCALHOST_ONLY", None)  # deprecated, and it conflicts with the discovery range on Kilted
    env["ROS_DOMAIN_ID"] = str(isolated_domain_id() if domain_id is None else domain_id)
    env.setdefault(PROFILE_ENV, str(config_file("fastdds_shm.xml")))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def executable(name: str) -> str:
    """A console script of this package: next to this Python (a venv), in a colcon install's
    ``lib/mm_fusion_ros`` (where ``ros2 run`` looks), else on PATH."""
    candidates = [Path(sys.executable).parent / name]
    candidates += [Path(prefix) / "lib" / PACKAGE / name
                   for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if prefix]
    for path in candidates:
        if path.is_file():
            return str(path)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"executable {name!r} not found next to {sys.executable}, in an ament prefix or "
                                f"on PATH; install the package (pip install -e . or colcon build)")
    return found


def format_param(value: Any) -> str:
    """A value as ``-p name:=value`` expects it (YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_param(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value) if value == "" or value.strip() != value or value.lower() in (
            "true", "false", "yes", "no", "on", "off", "y", "n", "null", "~") or _is_number(value) else value
    return repr(value) if isinstance(value, float) else str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def node_command(name: str, params_file: str | Path | None = None,
                 overrides: dict[str, Any] | None = None, node_name: str | None = None) -> list[str]:
    """``name --ros-args [--params-file F] [-r __node:=N] [-p k:=v ...]``."""
    cmd = [executable(name), "--ros-args"]
    if params_file is not None:
        cmd += ["--params-file", str(params_file)]
    if node_name is not None:  # a second instance of the same executable needs its own node name
        cmd += ["-r", f"__node:={node_name}"]
    for key, value in (overrides or {}).items():
        cmd += ["-p", f"{key}:={format_param(value)}"]
    return cmd


@dataclass
class NodeProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    returncode: int | None = field(default=None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stats(self) -> dict | None:
        """The node's ``mm_fusion_stats`` line, parsed; None if it did not print one."""
        for line in reversed(self.log().splitlines()):
            if line.startswith(STATS_PREFIX):
                try:
                    return json.loads(line[len(STATS_PREFIX):])
                except json.JSONDecodeError:
                    return None
        return None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGINT, then SIGTERM, then SIGKILL, each to this PID only; returns the exit status."""
        self.returncode = stop_process(self.popen, timeout)
        _running.pop(self.popen.pid, None)
        return self.returncode


def stop_process(popen: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGINT (a node's or a server's clean shutdown), then SIGTERM, then SIGKILL, each to this PID only;
    returns the exit status."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if popen.poll() is not None:
            break
        try:
            os.kill(popen.pid, sig)
        except ProcessLookupError:
            break
        try:
            popen.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return popen.wait()


def start_node(name: str, log_dir: str | Path, *, params_file: str | Path | None = None,
               overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None,
               label: str | None = None, node_name: str | None = None) -> NodeProcess:
    """Start the console script ``name`` with ``--ros-args``; output goes to ``log_dir/<label>.log``."""
    label = label or name
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{label}.log"
    cmd = node_command(name, params_file, overrides, node_name)
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        # Own session: a Ctrl-C in the terminal reaches the parent, which then stops the children in order.
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env if env is not None else ros_env(), start_new_session=True)
    proc = NodeProcess(label, popen, log_path)
    _running[popen.pid] = proc
    return proc


def stop_all(procs: list[NodeProcess], timeout: float = 10.0) -> dict[str, int]:
    """Stop in reverse start order (consumers outlive their producers' last messages)."""
    return {p.name: p.stop(timeout) for p in reversed(procs)}


def wait_for_log(proc: NodeProcess, text: str, timeout: float) -> bool:
    """Poll the process log for ``text``; False on timeout or if the process exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proc.log():
            return True
        if not proc.alive():
            return text in proc.log()
        time.sleep(0.1)
    return False


@atexit.register
def _stop_leftovers() -> None:
    # A parent that dies of an exception must not leave nodes publishing on the machine.
    for proc in list(_running.values()):
        proc.stop(timeout=3.0)
