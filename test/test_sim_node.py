"""sim_node, the ROS 2 shell over the simulated cell (mm_fusion_ros/ros/sim_node.py).

In-process, over real rclpy (one context per test, as test_nodes.py): parameters; bad commands; every sensor
topic's type, rate, stamps and delivery latency; the e-stop; episodes, the hold and the reset service. Then the
closed loop over real DDS with every node its own process (as test_integration.py): sim_node and
``fusion_node --params-file config/sim.yaml`` on sim time, in an isolated loopback-only domain.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

rclpy = pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install '.[ros]')")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import CompressedImage, Imu, JointState, LaserScan  # noqa: E402
from std_msgs.msg import Bool, Float64MultiArray, String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from mm_fusion_ros import procs  # noqa: E402
from mm_fusion_ros.config import MODALITIES, ConfigError, load_config  # noqa: E402
from mm_fusion_ros.ros import convert  # noqa: E402
from mm_fusion_ros.ros.params import (NODE_CONFIGS, SimNodeParameters, audio_message_types,  # noqa: E402
                                      build_config, declare_config, declared_names)
from mm_fusion_ros.sim.config import load_cell_config  # noqa: E402
from mm_fusion_ros.sim.panda import JOINT_NAMES, READY_Q  # noqa: E402
from test_nodes import args, wait_until  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIM_YAML = REPO / "config" / "sim.yaml"
CELL = load_cell_config(SIM_YAML)
STEP_S = SimNodeParameters().node.step_s
START = CELL.episode.start_time_s


def ros_args(**overrides) -> list[str]:
    return args(SIM_YAML, **overrides)


def matched(*publishers, settle_s: float = 0.5) -> bool:
    """Every publisher sees sim_node's subscription, plus the time the subscription needs to see it back
    (a volatile reader drops samples from a writer it has not matched yet; see qos.SubscriberGate)."""
    if not wait_until(lambda: all(p.get_subscription_count() >= 1 for p in publishers)):
        return False
    time.sleep(settle_s)
    return True


def start_sim(context, **overrides):
    """A SimNode spinning in the background. No intruder by default: a test that moves the arm must not
    fail its episode for moving while someone reaches into the cell."""
    from mm_fusion_ros.ros.sim_node import SimNode
    sim = SimNode(context=context, cli_args=ros_args(**{"intruder.probability": 0.0, **overrides}))
    sim.spin_in_background()
    return sim


def stamp(msg) -> float:
    return convert.stamp_to_s(msg.header.stamp)


class Listener:
    """A node recording (message, DDS source timestamp) per topic, on its own executor thread."""

    def __init__(self, context, topics: dict, qos=None):
        self.node = rclpy.create_node(f"sim_listener_{id(self)}", context=context)
        self.msgs: dict[str, list] = {name: [] for name in topics}
        for name, (topic, msg_type) in topics.items():
            self.node.create_subscription(
                msg_type, topic, lambda m, info, name=name: self.msgs[name].append((m, info["source_timestamp"])),
                qos or 1000)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self):
        try:
            self.executor.spin()
        except Exception:  # the context went down at the end of a test
            pass

    def close(self):
        self.executor.shutdown(timeout_sec=1.0)
        self.thread.join(timeout=2.0)
        self.node.destroy_node()


def joint_series(listener: Listener, name: str = "joints"):
    """(stamps, positions (n, 7), velocities (n, 7)) of the JointState messages received so far."""
    msgs = [m for m, _ in list(listener.msgs[name])]
    return (np.array([stamp(m) for m in msgs]), np.array([list(m.position) for m in msgs]),
            np.array([list(m.velocity) for m in msgs]))


# ---------------------------------------------------------------- parameters

def test_sim_yaml_block_mirrors_the_defaults_and_bad_parameters_name_the_key(context):
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    block = flat(yaml.safe_load(SIM_YAML.read_text())["sim_node"]["ros__parameters"])
    params = build_config(NODE_CONFIGS["sim_node"], block)
    assert params == SimNodeParameters()              # the YAML and the dataclass defaults agree
    assert params.cell() == load_cell_config(SIM_YAML)   # the same block, read as mm-fusion record reads it
    assert set(block) <= declared_names("sim_node") and "node.rate_factor" in block
    for override, message in [({"node.rate_factor": 0.0}, "node.rate_factor: must be in (0, 100]"),
                              ({"node.step_s": 0.0035}, "node.step_s: must be a whole number of physics steps"),
                              ({"node.topics.command": "mm fusion/action"}, "node.topics.command: must be a ROS topic"),
                              ({"node.rate": 2.0}, "node.rate (did you mean node.rate_factor?)"),
                              ({"camera.rate_hz": 0.0}, "camera.rate_hz: must be in (0,")]:
        node = rclpy.create_node("sim_node", context=context, cli_args=ros_args(**override),
                                 automatically_declare_parameters_from_overrides=True)
        try:
            with pytest.raises(ConfigError) as err:
                declare_config(node, SimNodeParameters)
            assert message in str(err.value)
        finally:
            node.destroy_node()
    done = subprocess.run(procs.node_command("sim_node", SIM_YAML, {"node.episodes": -1}), env=procs.ros_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "bad config: node.episodes: must be >= 0" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


# ---------------------------------------------------------------- commands

def test_bad_commands_are_dropped_and_counted_and_the_arm_holds_until_a_good_one(context):
    sim = start_sim(context)
    listener = Listener(context, {"joints": ("/joint_states", JointState)})
    io = rclpy.create_node("commander", context=context)
    pub = io.create_publisher(Float64MultiArray, "/mm_fusion/action", 10)
    wrong_length, non_finite = [0.4] * 6, [0.4, math.nan, 0.0, 0.0, 0.0, 0.0, 0.0]
    good = [0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]

    def send(values: list, n: int) -> None:
        for i in range(n):   # 100 Hz, as fusion_node sends
            pub.publish(Float64MultiArray(data=values[i % len(values)]))
            time.sleep(0.01)

    try:
        assert matched(pub) and wait_until(lambda: len(listener.msgs["joints"]) >= 10)
        t_bad = sim.now_s()
        send([wrong_length, non_finite], 30)
        assert wait_until(lambda: sum(sim.bad_commands.values()) == 30)
        t_good = sim.now_s()
        send([good], 30)
        assert wait_until(lambda: sim.commands_applied == 30)
        t_good_end = sim.now_s()
        send([wrong_length, non_finite], 40)   # 0.4 s of nothing but bad commands: the good one must age out
        assert wait_until(lambda: sum(sim.bad_commands.values()) == 70)
        t_end = sim.now_s()

        assert dict(sim.bad_commands) == {"wrong_length": 35, "non_finite": 35}
        assert sim.commands_applied == 30 and sim.commands_received == 100
        assert "70 bad (non_finite 35, wrong_length 35)" in sim.status_line()   # the periodic log line
        assert sim.stats()["commands"]["bad"] == {"wrong_length": 35, "non_finite": 35}   # the exit statistics
        assert sim.cell.stats.command_timeouts >= 1   # the good command timed out while bad ones kept coming

        t, q, v = joint_series(listener)
        bad_only = (t > t_bad) & (t < t_good)
        assert bad_only.sum() >= 20 and np.abs(v[bad_only]).max() < 0.05     # held still (encoder noise 0.005 rad/s)
        assert np.abs(q[bad_only] - q[bad_only][0]).max() < 0.002
        moving = (t > t_good + 0.05) & (t < t_good_end)
        assert moving.sum() >= 15
        assert np.allclose(v[moving, 0], 0.4, atol=0.05)                       # joint 1 at the commanded speed
        assert np.abs(v[moving, 1:]).max() < 0.05                              # the others still
        travelled = q[moving, 0][-1] - q[moving, 0][0]
        assert travelled == pytest.approx(0.4 * (t[moving][-1] - t[moving][0]), rel=0.2)   # in that direction
        # Timed out (100 ms after the last good one) and braked; bad commands never refreshed it.
        held = (t > t_good_end + CELL.safety.command_timeout_s + 0.06) & (t < t_end)
        assert held.sum() >= 15 and np.abs(v[held]).max() < 0.05   # encoder noise is 0.005 rad/s
    finally:
        sim.close()
        listener.close()
        io.destroy_node()


# ---------------------------------------------------------------- sensors

def test_every_sensor_topic_publishes_its_type_at_its_rate_stamped_at_capture_and_sent_on_receipt(context):
    import cv2

    kind, audio_type, info_type = audio_message_types(SimNodeParameters().node.audio_type)   # as microphone_node
    topics = {"camera": ("/camera/image_raw/compressed", CompressedImage),
              "audio": ("/audio/audio_stamped", audio_type), "lidar": ("/scan", LaserScan), "imu": ("/imu/data", Imu), "joint_states": ("/joint_states", JointState),
              "clock": ("/clock", Clock)}
    listener = Listener(context, topics)
    infos: list = []
    if info_type is not None:
        listener.node.create_subscription(info_type, "/audio/audio_info", infos.append, QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    sim = start_sim(context, **{"node.wait_for_subscribers": 1})   # the clock starts once we listen
    window = (START + 0.5, START + 2.5)   # 2 s of sim time, after every publisher has surely matched
    try:
        assert wait_until(lambda: listener.msgs["clock"] and
                          convert.stamp_to_s(listener.msgs["clock"][-1][0].clock) > window[1] + 0.2, 30)
        rtf = sim.real_time_factor()
    finally:
        sim.close()
        listener.close()
    msgs = {name: list(v) for name, v in listener.msgs.items()}
    clock = np.array([convert.stamp_to_s(m.clock) for m, _ in msgs["clock"]])
    clock_src = np.array([src for _, src in msgs["clock"]], dtype=np.int64)
    assert clock[0] == START and np.allclose(np.diff(clock), STEP_S, atol=1e-9)   # every step, monotonic
    # rate_factor 1: never faster than real time. How close to it a loaded machine keeps is a figure
    # (bench/sim_loop.py), not asserted; the counts below are per sim second and do not depend on it.
    assert 0 < rtf <= 1.05, rtf

    rates = {"camera": CELL.camera.rate_hz, "audio": 1 / CELL.audio.chunk_s, "lidar": CELL.lidar.rate_hz,
             "imu": CELL.imu.rate_hz, "joint_states": CELL.joint_states.rate_hz}
    # Capture -> publication, in sim time: the cell's latency models, never less, at most one step more.
    audio_s, scan_s = CELL.audio.chunk_s, 1 / CELL.lidar.rate_hz
    latency = {"camera": CELL.camera.latency_s, "audio": tuple(audio_s + x for x in CELL.audio.latency_s),
               "lidar": tuple(scan_s + x for x in CELL.lidar.latency_s), "imu": CELL.imu.latency_s,
               "joint_states": CELL.joint_states.latency_s}
    for name, rate in rates.items():
        stamps = np.array([stamp(m) for m, _ in msgs[name]])
        assert (stamps >= START).all() and (stamps <= clock[-1]).all(), name   # sim time, not wall time (~1.8e9 s)
        assert (np.diff(stamps) > 0).all(), name
        n = int(((stamps >= window[0]) & (stamps < window[1])).sum())
        expected = rate * (window[1] - window[0])
        assert abs(n - expected) <= max(1.0, 0.02 * expected), (name, n, expected)
        assert np.median(np.diff(stamps)) == pytest.approx(1 / rate, abs=CELL.physics.timestep), name
        # The /clock value current when the message was published (publication order: DDS source timestamps).
        src = np.array([s for _, s in msgs[name]], dtype=np.int64)
        assert (src > 0).all()
        published_at = clock[np.searchsorted(clock_src, src, side="right") - 1]
        age = published_at - stamps
        assert (age > 0).all(), (name, age.min())          # captured before received
        lo, hi = latency[name]
        assert age.min() >= lo - 1e-9 and age.max() <= hi + STEP_S + 1e-9, (name, age.min(), age.max())

    cam = msgs["camera"][0][0]
    assert "jpeg" in cam.format and cam.header.frame_id == "camera_optical_frame"
    pixels = cv2.imdecode(np.frombuffer(bytes(cam.data), np.uint8), cv2.IMREAD_COLOR)
    assert pixels.shape == (CELL.camera.height, CELL.camera.width, 3) and pixels.std() > 5   # a scene, not a blank
    assert convert.camera_from_compressed(cam).encoding == "jpeg"

    chunks = [m for m, _ in msgs["audio"]]
    if kind == "image_pcm":
        samples = [convert.audio_from_image_pcm(m, CELL.audio.sample_rate) for m in chunks]
        assert all(m.encoding == "16SC1" and m.height == 1 for m in chunks)
    else:
        fmt = convert.audio_format_from_info(infos[-1])
        assert (fmt.sample_rate, fmt.channels, fmt.sample_format) == (CELL.audio.sample_rate, 1, "S16LE")
        samples = [convert.audio_from_audio_data_stamped(m, fmt, fmt) for m in chunks]
    assert all(len(s.samples) == 320 and s.sample_rate == 16000 for s in samples)
    assert np.allclose(np.diff([s.stamp for s in samples]), CELL.audio.chunk_s, atol=1e-6)   # back to back
    assert 0 < np.std(np.concatenate([s.samples for s in samples])) < 0.5

    scan = msgs["lidar"][0][0]
    assert len(scan.ranges) == 360 and scan.angle_min == pytest.approx(-math.pi)
    assert scan.angle_increment == pytest.approx(2 * math.pi / 360) and scan.range_max == CELL.lidar.range_max
    lidar = convert.lidar_from_laser_scan(scan, load_config(SIM_YAML).model.lidar)
    assert lidar.ranges.shape == (360,)
    finite = np.isfinite(np.asarray(scan.ranges))
    assert finite.any() and (np.asarray(scan.ranges)[finite] <= CELL.lidar.range_max).all()

    imu = convert.imu_from_msg(msgs["imu"][-1][0])
    assert np.linalg.norm(imu.accel) == pytest.approx(9.81, abs=0.5)   # still arm: gravity, as a real IMU reports
    assert np.abs(imu.gyro).max() < 0.05

    joints = msgs["joint_states"][-1][0]
    assert list(joints.name) == list(JOINT_NAMES)
    assert len(joints.position) == len(joints.velocity) == len(joints.effort) == 7
    assert np.abs(np.array(joints.position) - READY_Q).max() < 0.06   # the episode's start pose, held
    assert np.isfinite(np.array(joints.effort)).all()   # the servo's torque (~0 at rest: links are gravity-compensated)


# ---------------------------------------------------------------- e-stop

def test_estop_stops_the_arm_from_the_next_step_and_holds_it_until_released(context):
    sim = start_sim(context)
    listener = Listener(context, {"joints": ("/joint_states", JointState)})
    io = rclpy.create_node("estop_io", context=context)
    cmd_pub = io.create_publisher(Float64MultiArray, "/mm_fusion/action", 10)
    estop_pub = io.create_publisher(Bool, "/mm_fusion/estop", 10)
    command = np.array([0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5])
    moving = command != 0
    stop = threading.Event()

    def feed():   # commands keep coming throughout, as from a policy that does not know about the stop
        while not stop.wait(0.01):
            cmd_pub.publish(Float64MultiArray(data=command.tolist()))

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        assert matched(cmd_pub, estop_pub)
        feeder.start()

        def at_speed() -> bool:
            _, _, v = joint_series(listener)
            return len(v) >= 10 and np.allclose(v[-10:], command, atol=0.05)

        assert wait_until(at_speed)
        t_sent = sim.now_s()   # the sim clock when the button is pressed
        estop_pub.publish(Bool(data=True))
        assert wait_until(lambda: sim.estop_events)
        applied, asserted = sim.estop_events[0]
        # The arm is stopped in the callback, so from the next physics step on; how long the Bool took to
        # cross DDS is a timing figure of the machine (bench/estop_latency.py), not asserted here.
        assert asserted and applied >= t_sent, applied - t_sent
        applied_before = sim.commands_applied
        assert wait_until(lambda: sim.now_s() > applied + 0.3)
        t_release = sim.now_s()
        applied_held, ignored_held = sim.commands_applied, sim.ignored_commands["estop"]
        estop_pub.publish(Bool(data=False))
        assert wait_until(lambda: sim.now_s() > t_release + 0.3)
        t, q, v = joint_series(listener)

        before = (t > applied - 0.05) & (t <= applied)
        assert before.sum() >= 3 and np.allclose(v[before], command, atol=0.05)   # at speed until then
        braking = (t >= applied + 0.010) & (t < applied + 0.05)
        assert braking.sum() >= 3
        # One control tick after the stop the arm has lost most of its speed ...
        assert (np.abs(v[braking][:, moving]) <= 0.5 * np.abs(command[moving])).all(), v[braking][:, moving]
        # ... and then stands still while the commands keep coming, until the release.
        still = (t >= applied + 0.05) & (t < t_release)
        assert still.sum() >= 20 and np.abs(v[still]).max() < 0.05
        assert np.abs(q[still] - q[still][0]).max() < 0.01
        assert applied_held == applied_before and ignored_held >= 20   # dropped while asserted, counted
        assert sim.estop_events[-1][1] is False
        resumed = t > t_release + 0.1
        assert resumed.sum() >= 10 and np.allclose(v[resumed][-5:], command, atol=0.05)   # moving again
        assert sim.commands_applied > applied_before
    finally:
        stop.set()
        if feeder.is_alive():
            feeder.join(timeout=1.0)
        sim.close()
        listener.close()
        io.destroy_node()


# ---------------------------------------------------------------- episodes

def test_episode_end_is_published_then_held_and_the_reset_service_starts_the_next(context):
    latched = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    listener = Listener(context, {"episode": ("/sim/episode", String)}, qos=latched)
    more = Listener(context, {"joints": ("/joint_states", JointState), "clock": ("/clock", Clock)})
    sim = start_sim(context, **{"episode.time_limit_s": 1.0, "node.auto_reset": False, "node.rate_factor": 2.0,
                                "node.episodes": 3})
    io = rclpy.create_node("reset_io", context=context)
    reset = io.create_client(Trigger, "/sim/reset")
    io_executor = SingleThreadedExecutor(context=context)
    io_executor.add_node(io)

    def call_reset():
        assert reset.wait_for_service(timeout_sec=5.0)
        future = reset.call_async(Trigger.Request())
        io_executor.spin_until_future_complete(future, timeout_sec=5.0)
        return future.result()

    def episodes() -> list[dict]:
        return [json.loads(m.data) for m, _ in list(listener.msgs["episode"])]

    try:
        assert wait_until(lambda: len(episodes()) == 1, 10)
        first = episodes()[0]
        assert (first["episode"], first["seed"], first["status"], first["reason"]) == (1, CELL.seed, "failure",
                                                                                         "timeout")
        assert first["duration"] == pytest.approx(1.0, abs=CELL.physics.timestep)
        assert first["clock_start"] == START and first["spec"]["seed"] == CELL.seed
        assert {"target_colour", "buttons", "click_depth"} <= set(first["spec"]) and "max_joint_speed" in first["stats"]

        # Held: the clock goes on, the sensors repeat the final state, no new episode starts by itself.
        end = first["clock_end"]
        assert wait_until(lambda: sim.now_s() > end + 1.5, 10)
        assert len(episodes()) == 1 and sim.episodes_done == 1
        t, q, _ = joint_series(more)
        held = t > end + 0.05
        assert held.sum() >= 100 and (np.diff(t[held]) > 0).all()
        assert (q[held] == q[held][0]).all()   # the same reading, restamped

        answer = call_reset()
        assert answer.success and f"seed {CELL.seed + 1}" in answer.message
        assert wait_until(lambda: len(episodes()) == 2, 10)   # it runs, and times out in turn
        second = episodes()[1]
        assert (second["seed"], second["reason"]) == (CELL.seed + 1, "timeout")
        assert second["clock_start"] >= end   # the clock never jumps back across episodes

        assert call_reset().success   # episode 3 ...
        assert wait_until(lambda: sim.outcomes.get("timeout") == 2 and sim.episode_running)
        assert call_reset().success   # ... reset while it runs: aborted, and the third ends the run
        assert wait_until(lambda: len(episodes()) == 3, 10)
        third = episodes()[2]
        assert (third["seed"], third["status"], third["reason"]) == (CELL.seed + 2, "aborted", "reset")
        assert wait_until(sim.stopping.is_set, 5)       # episodes: 3 reached -> the node shuts down
        clock = np.array([convert.stamp_to_s(m.clock) for m, _ in list(more.msgs["clock"])])
        assert (np.diff(clock) > 0).all()
    finally:
        sim.close()
        listener.close()
        more.close()
        io_executor.shutdown(timeout_sec=1.0)
        io.destroy_node()


def test_the_scripted_expert_drives_the_arm_to_a_success_and_the_node_stops_after_its_episodes(context):
    latched = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    listener = Listener(context, {"episode": ("/sim/episode", String)}, qos=latched)
    sim = start_sim(context, seed=1, **{"node.expert": True, "node.rate_factor": 4.0, "node.episodes": 1})
    io = rclpy.create_node("expert_io", context=context)
    pub = io.create_publisher(Float64MultiArray, "/mm_fusion/action", 10)
    try:
        assert matched(pub)
        pub.publish(Float64MultiArray(data=[1.0] * 7))   # the expert drives: a topic command is ignored
        assert wait_until(lambda: listener.msgs["episode"], 30)
        record = json.loads(listener.msgs["episode"][0][0].data)
        assert (record["seed"], record["status"], record["reason"]) == (1, "success", "success"), record
        assert record["duration"] < CELL.episode.time_limit_s and record["stats"]["commands"] > 100
        assert wait_until(sim.stopping.is_set, 5)        # episodes: 1
        assert sim.ignored_commands["expert"] == 1 and sim.commands_applied == 0
    finally:
        sim.close()
        listener.close()
        io.destroy_node()


# ---------------------------------------------------------------- the closed loop, separate processes

@pytest.mark.integration
def test_fusion_node_closes_the_loop_over_dds_with_every_input_fresh(tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray

    from mm_fusion_ros.engine import ensure_onnx
    from mm_fusion_ros.live_demo import LivePipeline, Monitor, apply_ros_env, audio_type_here
    from mm_fusion_ros.runtime import load_model

    cfg = load_config(SIM_YAML)   # the cell's fusion_node block: Panda joints, compressed camera, use_sim_time
    assert cfg.use_sim_time
    artifacts = tmp_path / "artifacts"
    # An untrained policy whose commands are large enough to measure the arm following them: seeded random
    # weights with the action's spread widened (the loop is under test here, not the policy).
    from mm_fusion_ros.model import save_checkpoint
    model = load_model(cfg)
    model.action_head.std.mul_(6.0)
    checkpoint = tmp_path / "wide.pt"
    save_checkpoint(model, checkpoint)
    ensure_onnx(model, artifacts, log=lambda m: None)
    # Its own domain, away from conftest's 100-199, the Makefile's 42 and test_integration's choice of the moment.
    domain = 1 + (os.getpid() + int(time.time()) + 50) % 99
    domain = 43 if domain == 42 else domain
    saved = {k: os.environ.get(k) for k in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_DOMAIN_ID", procs.PROFILE_ENV)}
    pipeline = LivePipeline(tmp_path / "logs", SIM_YAML, domain_id=domain)
    apply_ros_env(pipeline.env)
    monitor = Monitor(cfg)
    joints: list = []
    monitor.node.create_subscription(
        JointState, "/joint_states",
        lambda m: joints.append((stamp(m), np.array(m.position), np.array(m.velocity))), 1000)
    reports: list = []   # (level, message) of every "mm_fusion: inputs" report

    def on_diagnostics(msg) -> None:
        reports.extend((s.level[0], s.message) for s in msg.status if s.name == "mm_fusion: inputs")

    monitor.node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 100)
    try:
        fusion = pipeline.start("fusion_node", {"engine.artifact_dir": str(artifacts), "engine.backend": "onnxruntime",
                                                "checkpoint": str(checkpoint),
                                                "inputs.audio.type": audio_type_here(cfg.inputs.audio.type)})
        assert procs.wait_for_log(fusion, "ticking at", 120), f"fusion_node did not start:\n{fusion.log()[-3000:]}"
        sim = pipeline.start("sim_node", {"intruder.probability": 0.0, "node.wait_for_subscribers": 1})
        # A report window in which no tick masked any input and nothing was dropped.
        assert monitor.wait_for(lambda: monitor.reports.get("mm_fusion: inputs", (1,))[0] == 0, 30,
                                alive=pipeline.check_alive), f"inputs never all fresh: {monitor.reports}"
        fresh = monitor.reports["mm_fusion: inputs"][2]   # that window's values
        monitor.recording = True
        n_joints, n_reports = len(joints), len(reports)
        time.sleep(3.0)
        monitor.recording = False
        reports = reports[n_reports:]
        window = joints[n_joints:]
        ticks = list(monitor.ticks)
        actions = [(t, v) for t, v in monitor.commands]
        assert pipeline.stop("sim_node") == 0
        sim_stats = sim.stats() or {}
        assert pipeline.stop("fusion_node") == 0
        fusion_stats = fusion.stats() or {}
    finally:
        pipeline.stop_all()
        monitor.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    # Every input fresh: a whole report window with no input masked and nothing dropped (the wait above), and
    # over the recording every input used on most ticks. fusion_node's intake thread falls behind its clock
    # while a loaded 2-core machine runs something else (measured: IMU masked on 24 % of ticks beside a
    # recording, 0-2 % alone), which masks an input for those ticks: a figure of the load, so the bound
    # here is loose; bench/sim_loop.py measures the share on a quiet machine.
    assert all(float(fresh[f"{m}.mask_rate"]) == 0.0 for m in MODALITIES), fresh
    assert len(ticks) >= 100 and all(r.t >= START for r in ticks)   # ticking on sim time
    used = np.array([r.used for r in ticks])
    masked = {m: round(float(1 - used[:, i].mean()), 4) for i, m in enumerate(MODALITIES)}
    assert max(masked.values()) <= 0.5, (masked, [(r.t, r.message) for r in ticks if not all(r.used)][:5])
    assert np.mean([r.held for r in ticks]) <= 0.5

    # The arm moves, and as commanded: each joint_states velocity is the command fusion_node sent one to two
    # control ticks earlier (its tick time is the command's stamp, on the same sim clock).
    assert len(window) >= 200
    t = np.array([s for s, _, _ in window])
    q = np.stack([p for _, p, _ in window])
    v = np.stack([w for _, _, w in window])
    cmd_t = np.array([s for s, _ in actions])
    cmd_v = np.stack([a for _, a in actions])
    assert np.abs(cmd_v).max() > 0.05, "the policy never commanded a measurable motion"
    # Net displacement of the most moving joint, per stretch between episode resets (a reset jumps the pose).
    cuts = np.flatnonzero(np.abs(np.diff(q, axis=0)).max(axis=1) > 0.05) + 1
    travelled = max(float(np.abs(seg[-1] - seg[0]).max()) for seg in np.split(q, cuts) if len(seg) > 1)
    assert travelled > 0.02, travelled   # rad; the encoders' noise is 1e-4
    i = np.searchsorted(cmd_t, t - 0.015, side="right") - 1
    ok = i >= 0
    error = np.abs(v[ok] - cmd_v[i[ok]]).max(axis=1)     # how far the arm's velocity is from the command
    commanded = np.abs(cmd_v[i[ok]]).max(axis=1)         # ... and from standing still
    assert np.median(commanded) > 0.02, "the policy commanded no measurable motion"
    assert np.median(error) < 0.5 * np.median(commanded), (np.median(error), np.median(commanded))

    assert sim_stats["commands"]["applied"] >= 200 and not sim_stats["commands"]["bad"], sim_stats["commands"]
    # sim_node's clock slips (it fell more than 50 ms behind the wall clock) are a figure of the machine's
    # load, reported by bench/sim_loop.py and printed below, not asserted: the loop is what is under test.
    assert not fusion_stats["bad"] and all(fusion_stats["received"].get(m, 0) > 0 for m in MODALITIES)
    print(f"\nmasked share per input {masked}; inputs reports {[lvl for lvl, _ in reports]}; largest command "
          f"{np.abs(cmd_v).max():.3f} rad/s, moved {travelled:.3f} rad, |velocity - command| p50/p90 "
          f"{np.percentile(error, 50):.4f}/{np.percentile(error, 90):.4f} rad/s against |command| p50 "
          f"{np.median(commanded):.4f} rad/s")
    print(f"sim_node beside fusion_node: {sim_stats['real_time_factor']:.3f}x real time, CPU "
          f"{100 * sim_stats['cpu_share']:.0f}% of a core, step compute {sim_stats['step_compute_ms']} | "
          f"fusion_node ticks {fusion_stats['tick_ms']}, transport {fusion_stats['transport_ms']}")
