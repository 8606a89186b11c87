"""The live pipeline over real DDS, every node its own process, as on a robot.

camera_node (a 640x480 MJPG video at 30 Hz, rgb8), microphone_node (a 16 kHz
WAV in 20 ms chunks), sensor_sim_node twice (LiDAR 10 Hz / 360 beams, and IMU
200 Hz with the arm's joint states at 100 Hz, so that the LiDAR can be stopped alone) -> fusion_node at 100 Hz,
started as the console script with ``--params-file config/robot.yaml`` and
overrides -> a monitor node in this process. One run is shared by all the
assertions below: rate, finiteness and limits, e-stop, watchdog, no lost
messages, clean SIGINT shutdown. Everything on loopback in an isolated domain
(conftest + mm_fusion_ros.procs).

Select with ``-m integration``; it also runs in ``make test``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install '.[ros]')")

from mm_fusion_ros.config import MODALITIES, load_config  # noqa: E402
from mm_fusion_ros.live_demo import (LivePipeline, Monitor, apply_ros_env, audio_type_here,  # noqa: E402
                                     fusion_env, make_video, make_wav)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
ROBOT_YAML = REPO / "config" / "robot.yaml"
RATE_WINDOW_S = 5.0
_ESTOP_LOG = re.compile(r"\[(\d+\.\d+)\] \[fusion_node\]: e-stop asserted")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Start the pipeline, drive it through the scenario, stop it; hand the observations to the tests."""
    from sensor_msgs.msg import LaserScan

    from mm_fusion_ros.engine import ensure_onnx
    from mm_fusion_ros.runtime import load_model

    tmp = tmp_path_factory.mktemp("live")
    cfg = load_config(ROBOT_YAML)
    artifacts = tmp / "artifacts"
    ensure_onnx(load_model(cfg), artifacts, log=lambda m: None)   # once, so the node starts without exporting
    video = make_video(tmp / "camera.avi", seconds=2.0)
    wav = make_wav(tmp / "microphone.wav", seconds=3.0)
    stats_path = tmp / "fusion_stats.json"
    # Its own domain, outside conftest's 100-199 (other test processes on this machine use those) and
    # the Makefile's 42: a stranger's fusion_node on our domain would publish into our monitor.
    domain = 1 + (os.getpid() + int(time.time())) % 99
    pipeline = LivePipeline(tmp / "logs", ROBOT_YAML, domain_id=41 if domain == 42 else domain)
    apply_ros_env(pipeline.env)
    audio_type = audio_type_here(cfg.inputs.audio.type)
    monitor = Monitor(cfg)
    scans = monitor.watch(cfg.inputs.lidar.topic, LaserScan)
    out: dict = {"cfg": cfg, "monitor": monitor, "pipeline": pipeline}
    try:
        # Reliable subscriptions here (the sensor nodes publish reliable): this test counts every message, and
        # best effort may drop one on a loaded machine. The default best-effort inputs are measured by
        # `make bench-live` (nothing lost in 5 min) and tested against a best-effort driver in test_fusion_node.
        reliable = {f"inputs.{m}.qos": "reliable" for m in MODALITIES}
        fusion = pipeline.start("fusion_node", {"engine.artifact_dir": str(artifacts), "safety.start_enabled": True,
                                                "inputs.audio.type": audio_type, **reliable},
                                env=fusion_env(stats_path))
        assert monitor.wait_for(lambda: monitor.diagnostics_seen > 0, 120, alive=pipeline.check_alive), \
            f"fusion_node did not start:\n{fusion.log()[-3000:]}"
        pipeline.start("camera_node", {"source": str(video), "wait_for_subscribers": 1})
        pipeline.start("microphone_node", {"source": str(wav), "type": audio_type, "wait_for_subscribers": 1})
        pipeline.start("sensor_sim_node", {"lidar.enabled": False, "wait_for_subscribers": 1}, label="sim_imu",
                       node_name="sim_imu")
        # Two subscribers on /scan: fusion_node and the monitor here.
        pipeline.start("sensor_sim_node", {"imu.enabled": False, "joint_states.enabled": False,
                                           "wait_for_subscribers": 2}, label="sim_lidar", node_name="sim_lidar")
        monitor.reports.clear()
        assert monitor.wait_for(lambda: monitor.reports.get("mm_fusion: inputs", (1,))[0] == 0
                                and monitor.reports.get("mm_fusion: safety", (1,))[0] == 0, 30,
                                alive=pipeline.check_alive), f"inputs never all fresh: {monitor.reports}"

        # 1. the rate, on the command topics
        monitor.recording = True
        out["rate_t0"] = monitor.now()
        time.sleep(RATE_WINDOW_S)
        out["rate_t1"] = monitor.now()

        # 2. e-stop, then release (button up, then the enable service)
        out["estop_sent"] = monitor.publish_estop(True)
        time.sleep(0.5)
        out["enable_while_asserted"] = monitor.set_enabled(True)
        monitor.publish_estop(False)
        time.sleep(0.1)
        out["enable_requested"] = monitor.now()
        out["enable_after_release"] = monitor.set_enabled(True)
        out["released_at"] = monitor.now()
        time.sleep(0.5)

        # 3. the LiDAR driver dies
        out["scans_before_stop"] = len(scans)
        pipeline.stop("sim_lidar")
        time.sleep(cfg.inputs.lidar.max_age + 0.5)
        out["last_scan"] = scans[-1]   # read late: the last scans may still have been on their way
        out["safety_report"] = monitor.reports.get("mm_fusion: safety")
        out["watchdog_end"] = monitor.now()
        monitor.recording = False

        # 4. the rest, producers first; then fusion_node by SIGINT
        for label in ("sim_imu", "microphone_node", "camera_node"):
            pipeline.stop(label)
        time.sleep(0.5)
        out["fusion_exit"] = pipeline.stop("fusion_node")
        out["fusion_log"] = fusion.log()
        out["stats"] = fusion.stats() or {}
        out["published"] = {}
        for label in ("camera_node", "microphone_node", "sim_imu", "sim_lidar"):
            out["published"].update((pipeline.procs[label].stats() or {}).get("published", {}))
        yield out
    finally:
        pipeline.stop_all()
        monitor.close()


def commands_between(monitor: Monitor, t0: float, t1: float) -> list[tuple[float, np.ndarray]]:
    return [(t, v) for t, v in monitor.commands if t0 <= t <= t1]


def test_one_command_per_tick_on_the_control_grid_never_faster_than_the_rate(run):
    """Each command is stamped with its tick's place on the control-period grid, no tick is published twice,
    and the node never runs ahead of its clock. The achieved rate itself (target: within 2 % of 100 Hz) is
    a timing figure: on a shared 2-core machine a loaded stretch skips ticks (as a timer does), so it is
    measured by `make bench-live` and quoted in the README, not asserted here."""
    cfg, monitor = run["cfg"], run["monitor"]
    window = commands_between(monitor, run["rate_t0"], run["rate_t1"])
    stamps = np.array([t for t, _ in window])
    period = 1.0 / cfg.control_rate_hz
    steps = np.diff(stamps) / period
    assert (steps > 0.5).all(), "a tick was published twice or out of order"
    assert np.abs(steps - np.round(steps)).max() < 1e-3, "command stamps off the control grid"
    span = run["rate_t1"] - run["rate_t0"]
    assert len(stamps) <= span * cfg.control_rate_hz + 2, f"{len(stamps)} commands in {span:.2f} s"
    # A floor far below any load seen (91 Hz at worst in CI): it ticks at all, at about its rate.
    assert len(stamps) >= 0.5 * span * cfg.control_rate_hz, f"{len(stamps)} commands in {span:.2f} s"
    assert len(monitor.actions) >= len(window)   # Float64MultiArray for forward_command_controller too


def test_every_action_is_finite_and_inside_the_limits(run):
    cfg, monitor = run["cfg"], run["monitor"]
    lower, upper = np.array(cfg.model.action.lower), np.array(cfg.model.action.upper)
    for name, series in (("joint_command", monitor.commands), ("action", monitor.actions)):
        values = np.stack([v for _, v in series])
        assert values.shape[1] == cfg.model.action.dof, name
        assert np.isfinite(values).all(), name
        assert (values >= lower).all() and (values <= upper).all(), name
    assert np.abs(np.stack([v for _, v in commands_between(monitor, run["rate_t0"], run["rate_t1"])])).max() > 0


def test_estop_zeroes_the_output_from_the_next_tick(run):
    monitor = run["monitor"]
    received = [float(m) for m in _ESTOP_LOG.findall(run["fusion_log"])]
    assert received, "fusion_node never logged the e-stop"
    t_received = received[0]
    # How promptly the Bool crosses DDS is a timing figure (bench/estop_latency.py); here: it did, after it
    # was sent, and every tick that ran after the node latched it is at rest.
    assert t_received >= run["estop_sent"]
    # A command carries its tick's place on the grid, and a tick on a loaded machine runs a little after it:
    # one stamped just before the enable request may already have run enabled. So the window by stamp ends
    # 50 ms early, and the ticks the node itself reported as latched are checked one by one.
    after = commands_between(monitor, t_received, run["enable_requested"] - 0.05)
    assert len(after) >= 10                                   # the node kept ticking ...
    moving = [(round(t - t_received, 4), v.round(3).tolist()) for t, v in after if v.any()]
    assert not moving, f"commands after the e-stop was received: {moving[:5]}"   # the first tick is at rest
    latched = {round(r.t, 6) for r in monitor.ticks if "e-stop latched" in r.message}
    assert latched and latched >= {round(t, 6) for t, _ in after[1:]}, "ticks in the window not reported latched"
    moving_latched = [round(t - t_received, 4) for t, v in monitor.commands if round(t, 6) in latched and v.any()]
    assert not moving_latched, f"moving commands on ticks the node reported latched: {moving_latched[:5]}"
    assert run["enable_while_asserted"][0] is False           # the latch holds while the button is down
    assert run["enable_after_release"][0] is True
    resumed = [v for t, v in monitor.commands if t > run["released_at"] and v.any()]
    assert resumed, "commands did not resume after enable"


def test_a_stopped_sensor_is_masked_and_the_watchdog_holds_every_tick_past_max_age(run):
    cfg, monitor = run["cfg"], run["monitor"]
    max_age = cfg.inputs.lidar.max_age
    lidar = MODALITIES.index("lidar")
    # The newest scan any tick used is the driver's last one (the monitor's own /scan copy agrees).
    last = max(r.stamps[lidar] for r in monitor.ticks if r.used[lidar])
    assert abs(last - run["last_scan"]) < 1e-6
    ticks = [r for r in monitor.ticks if last < r.t <= run["watchdog_end"]]
    stale = [r for r in ticks if r.t - last > max_age]
    fresh = [r for r in ticks if r.t - last <= max_age]
    assert stale and fresh and all(r.used[lidar] for r in fresh)
    assert not any(r.used[lidar] for r in stale), "lidar still used after max_age"
    assert all(r.held for r in stale), "the watchdog did not hold every tick after max_age"
    # So the first tick past max_age is held: on the grid that is within max_age and one tick, unless the
    # machine skipped ticks (a timing figure, measured by bench-live, not asserted here).
    held = commands_between(monitor, stale[0].t, run["watchdog_end"])
    assert held and all(not v.any() for _, v in held)         # on_stale: zero
    level, message, _ = run["safety_report"]
    assert level == 2 and "lidar" in message


def test_no_sensor_message_is_lost(run):
    stats = run["stats"]
    assert set(run["published"]) == set(MODALITIES)
    for modality, published in run["published"].items():
        assert published > 0
        assert stats["received"].get(modality) == published, (modality, published, stats["received"])
    assert not stats["bad"]


def test_fusion_node_shuts_down_cleanly_on_sigint(run):
    assert run["fusion_exit"] == 0
    assert "Traceback" not in run["fusion_log"]
    assert run["stats"].get("ticks", 0) > RATE_WINDOW_S * run["cfg"].control_rate_hz


def test_the_arms_joint_states_reach_the_model(run):
    """sensor_sim_node's joint states, matched by name, are used by the ticks (not just received)."""
    monitor = run["monitor"]
    js = MODALITIES.index("joint_state")
    used = [r for r in monitor.ticks if run["rate_t0"] <= r.t <= run["rate_t1"] and r.used[js]]
    assert used, "no tick in the rate window used the joint states"
    assert all(0.0 <= r.t - r.stamps[js] <= run["cfg"].inputs.joint_state.max_age for r in used)
    assert not any(k.startswith("joint_state.") for k in run["stats"].get("bad", {}))
