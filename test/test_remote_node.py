"""fusion_node with ``engine.backend: remote`` against a real ``mm-fusion serve`` process (issue #13): the
server is killed mid-run (SIGKILL, by PID), the node rests within a tick, says so on /diagnostics, and
steps remotely again once a new server listens on the same address. Loopback only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install '.[ros]')")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402

from mm_fusion_ros import procs  # noqa: E402
from mm_fusion_ros.config import load_config  # noqa: E402
from test_fusion_node import _imu_feeder  # noqa: E402
from test_nodes import ROBOT_YAML, Spinner, args, wait_until  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(endpoint: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mm_fusion_ros.cli", "serve", "--config", str(ROBOT_YAML),
                             "--backend", "torch", "--bind", endpoint], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ready: list[str] = []
    reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=120)
    assert ready and ready[0].startswith(f"ready {endpoint}"), f"server did not start: {ready}"
    return proc


def engine_status(msgs: list) -> list:
    return [s for m in msgs for s in m.status if s.name.endswith("mm_fusion: engine")]


def test_killed_server_the_node_rests_within_a_tick_reports_it_and_resumes_with_a_new_one(context):
    from mm_fusion_ros.ros.fusion_node import FusionNode

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = start_server(endpoint)
    servers = [server]
    cfg = load_config(ROBOT_YAML)
    node = FusionNode(context=context, cli_args=args(**{
        "engine.backend": "remote", "engine.remote.endpoint": endpoint, "engine.remote.timeout_ms": 200.0,
        "safety.start_enabled": True, "inputs.required": ["imu"], "outputs.diagnostics_period_s": 0.2}))
    io = rclpy.create_node("io", context=context)
    commands: list[list[float]] = []
    diags: list = []
    io.create_subscription(JointState, cfg.outputs.joint_command_topic,
                           lambda m: commands.append(list(m.velocity)), 1000)
    io.create_subscription(DiagnosticArray, "/diagnostics", diags.append, 100)
    stop = threading.Event()
    feeder = _imu_feeder(io, cfg.inputs.imu.topic, stop)
    spinner = Spinner(context, io)
    rest = [0.0] * cfg.model.action.dof

    def moving() -> bool:
        return len(commands) >= 5 and all(c != rest and np.isfinite(c).all() for c in commands[-5:])

    try:
        assert node.state == "active", node.last_error
        assert node.runtime.engine.name == "remote"
        node.spin_in_background()
        assert wait_until(moving, timeout=30.0)   # stepping on the server
        assert wait_until(lambda: any(s.level == b"\x00" for s in engine_status(diags)), timeout=10.0)

        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        n = len(commands)
        assert wait_until(lambda: len(commands) >= n + 20, timeout=20.0)
        after = commands[n:n + 20]
        # At most the one tick already in flight when the server died carries an action; every later one rests.
        assert all(c == rest for c in after[1:]), after[:3]
        assert node.runtime.counters["infer_errors"] >= 19
        seen = len(diags)
        assert wait_until(lambda: any(s.level == b"\x02" and "policy server" in s.message
                                      for s in engine_status(diags[seen:])), timeout=10.0)

        server = start_server(endpoint)
        servers.append(server)
        n = len(commands)
        assert wait_until(lambda: len(commands) > n + 5 and moving(), timeout=30.0)   # stepping remotely again
        seen = len(diags)
        assert wait_until(lambda: any(s.level == b"\x00" for s in engine_status(diags[seen:])), timeout=10.0)
    finally:
        stop.set()
        feeder.join(timeout=2)
        spinner.stop()
        node.close()
        io.destroy_node()
        for proc in servers:
            procs.stop_process(proc)
