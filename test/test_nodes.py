"""The ROS 2 nodes in-process, over real rclpy: parameters, intake vs. inference, safety topics, bad input,
and the sensor nodes' messages. (Separate processes and rates: test_integration.py.)"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

rclpy = pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install '.[ros]')")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from sensor_msgs.msg import Image, Imu, JointState, LaserScan  # noqa: E402
from std_msgs.msg import Bool, Float64MultiArray  # noqa: E402
from std_srvs.srv import SetBool  # noqa: E402

from mm_fusion_ros import procs  # noqa: E402
from mm_fusion_ros.config import MODALITIES, ConfigError, load_config  # noqa: E402
from mm_fusion_ros.engine import Engine  # noqa: E402
from mm_fusion_ros.live_demo import make_video, make_wav  # noqa: E402
from mm_fusion_ros.model import input_specs, output_specs  # noqa: E402
from mm_fusion_ros.ros import convert  # noqa: E402
from mm_fusion_ros.ros.params import NODE_CONFIGS, build_config, declare_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROBOT_YAML = REPO / "config" / "robot.yaml"


class FakeEngine(Engine):
    """Stands in for the network: a constant action, optionally slow or non-finite."""

    name = "fake"

    def __init__(self, model_cfg, delay_s: float = 0.0, action: float = 0.5, nonfinite: bool = False,
                 fail: bool = False):
        super().__init__(input_specs(model_cfg), output_specs(model_cfg))
        self.delay_s, self.action, self.nonfinite, self.fail = delay_s, action, nonfinite, fail
        self.calls = 0

    def run(self, inputs):
        if self.fail:
            raise RuntimeError("engine fell over")
        if self.delay_s:
            time.sleep(self.delay_s)
        out = {s.name: np.zeros(s.shape, s.dtype) for s in self.output_specs}
        out["action"][:] = np.nan if self.nonfinite else self.action
        out["new_state"][:] = inputs["state"]
        self.calls += 1
        return out


class Spinner:
    """Nodes spun on a background executor thread."""

    def __init__(self, context, *nodes):
        self.executor = SingleThreadedExecutor(context=context)
        for node in nodes:
            self.executor.add_node(node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self):
        try:
            self.executor.spin()
        except Exception:  # context shut down under us at the end of a test
            pass

    def stop(self):
        self.executor.shutdown(timeout_sec=1.0)
        self.thread.join(timeout=2.0)


def args(params_file: Path = ROBOT_YAML, **overrides) -> list[str]:
    """``--ros-args --params-file F -p k:=v ...`` for an in-process node."""
    out = ["--ros-args", "--params-file", str(params_file)]
    for key, value in overrides.items():
        out += ["-p", f"{key}:={procs.format_param(value)}"]
    return out


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def now_s(node) -> float:
    return node.get_clock().now().nanoseconds * 1e-9


def imu_msg(t: float, nan: bool = False) -> Imu:
    msg = Imu()
    msg.header.stamp.sec, msg.header.stamp.nanosec = convert.s_to_stamp_fields(t) if t > 0 else (0, 0)
    msg.linear_acceleration.z = float("nan") if nan else 9.81
    return msg


def image_msg(t: float, width: int = 640, height: int = 480, short: bool = False) -> Image:
    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = convert.s_to_stamp_fields(t)
    msg.height, msg.width, msg.encoding, msg.step = height, width, "rgb8", width * 3
    msg.data = bytes(width * 3 * height - (7 if short else 0))
    return msg


def joint_msg(t: float, names=tuple(f"joint_{i}" for i in range(1, 8)), velocity: bool = True,
              nan: bool = False) -> JointState:
    """As joint_state_broadcaster publishes it (names in whatever order the driver has them)."""
    msg = JointState()
    msg.header.stamp.sec, msg.header.stamp.nanosec = convert.s_to_stamp_fields(t)
    msg.name = list(names)
    msg.position = [float("nan") if nan else 0.1 * i for i in range(len(names))]
    msg.velocity = [0.0] * len(names) if velocity else []
    return msg


def scan_msg(t: float, increment: float) -> LaserScan:
    msg = LaserScan()
    msg.header.stamp.sec, msg.header.stamp.nanosec = convert.s_to_stamp_fields(t)
    msg.angle_min, msg.angle_increment = -np.pi, increment
    msg.angle_max = -np.pi + 359 * 2 * np.pi / 360
    msg.range_min, msg.range_max = 0.05, 30.0
    msg.ranges = [1.0] * 360
    return msg


# ---------------------------------------------------------------- parameters

def test_declared_parameters_read_back_the_params_file(context):
    node = rclpy.create_node("fusion_node", context=context, cli_args=args(),
                             automatically_declare_parameters_from_overrides=True)
    try:
        assert declare_config(node, NODE_CONFIGS["fusion_node"]) == load_config(ROBOT_YAML)
        assert node.has_parameter("inputs.camera.topic") and node.has_parameter("safety.max_acceleration")
    finally:
        node.destroy_node()
    node = rclpy.create_node("fusion_node", context=context,
                             cli_args=args(control_rate_hz=50, **{"inputs.required": ["imu"]}),
                             automatically_declare_parameters_from_overrides=True)
    try:
        cfg = declare_config(node, NODE_CONFIGS["fusion_node"])
        assert cfg.control_rate_hz == 50.0 and cfg.inputs.required == ("imu",)
    finally:
        node.destroy_node()


def test_sensor_node_blocks_in_robot_yaml_mirror_the_dataclass_defaults():
    doc = yaml.safe_load(ROBOT_YAML.read_text())
    for name in ("camera_node", "microphone_node", "sensor_sim_node"):
        def flat(d, prefix=""):
            out = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
            return out
        assert build_config(NODE_CONFIGS[name], flat(doc[name]["ros__parameters"])) == NODE_CONFIGS[name]()


@pytest.mark.parametrize("override, message", [
    ({"joint_states.names": ["joint_1", "joint_1"]}, "joint_states.names: must be unique joint names"),
    ({"joint_states.names": []}, "joint_states.names"),
    ({"joint_states.rate_hz": 0.0}, "joint_states.rate_hz: must be in (0, 2000] Hz"),
    ({"joint_states.topic": "joint states"}, "joint_states.topic"),
])
def test_bad_sensor_sim_joint_states_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        build_config(NODE_CONFIGS["sensor_sim_node"], override)
    assert message in str(err.value)


@pytest.mark.parametrize("override, message", [
    ({"inputs.camera.topik": "/x"}, "inputs.camera.topik (did you mean inputs.camera.topic?)"),
    ({"control_rate_hz": -5.0}, "control_rate_hz: must be in (0, 2000]"),
    ({"safety.on_stale": "coast"}, "safety.on_stale: must be one of ['zero', 'hold_last']"),
])
def test_bad_parameters_are_refused_naming_the_key(context, override, message):
    node = rclpy.create_node("fusion_node", context=context, cli_args=args(**override),
                             automatically_declare_parameters_from_overrides=True)
    try:
        with pytest.raises(ConfigError) as err:
            declare_config(node, NODE_CONFIGS["fusion_node"])
        assert message in str(err.value)
    finally:
        node.destroy_node()


def test_node_executable_with_a_bad_config_exits_2_naming_the_key(tmp_path):
    cmd = procs.node_command("camera_node", ROBOT_YAML, {"fps": -1.0})
    done = subprocess.run(cmd, env=procs.ros_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "bad config: fps: must be in [0, 1000], got -1.0" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


# ---------------------------------------------------------------- fusion_node in-process

# These tests count every message they send (from reliable publishers): the subscriptions are made reliable
# too, so that what best effort may drop on a loaded machine is not mistaken for a lost message. The default
# best-effort subscriptions are tested against a best-effort driver in test_fusion_node.py.
RELIABLE_INPUTS = {f"inputs.{m}.qos": "reliable" for m in MODALITIES}


def make_fusion(context, engine, **overrides):
    from mm_fusion_ros.ros.fusion_node import FusionNode
    return FusionNode(context=context, engine=engine, cli_args=args(**{**RELIABLE_INPUTS, **overrides}))


def test_slow_inference_does_not_lose_sensor_messages(context):
    cfg = load_config(ROBOT_YAML)
    engine = FakeEngine(cfg.model, delay_s=0.2)
    # Queues that a 200 ms tick on the intake thread would overflow (40 IMU samples, 6-7 frames, 2 scans,
    # 20 joint states arrive meanwhile), but deep enough to ride out the intake thread being scheduled late
    # for up to ~90 ms on a loaded machine, which is not what this test is about.
    node = make_fusion(context, engine, **{"inputs.imu.depth": 20, "inputs.camera.depth": 3,
                                           "inputs.lidar.depth": 1, "inputs.joint_state.depth": 10})
    node.spin_in_background()
    talker = rclpy.create_node("talker", context=context)
    pubs = {"imu": talker.create_publisher(Imu, cfg.inputs.imu.topic, 200),
            "camera": talker.create_publisher(Image, cfg.inputs.camera.topic, 10),
            "lidar": talker.create_publisher(LaserScan, cfg.inputs.lidar.topic, 10),
            "joint_state": talker.create_publisher(JointState, cfg.inputs.joint_state.topic, 100)}
    try:
        assert wait_until(lambda: all(p.get_subscription_count() >= 1 for p in pubs.values()))
        time.sleep(0.5)   # the subscriptions' side of the match settles a little later (see qos.SubscriberGate)
        sent = {"imu": 0, "camera": 0, "lidar": 0, "joint_state": 0}
        start = time.monotonic()
        for i in range(400):  # 2 s of IMU at 200 Hz, a 640x480 frame at ~33 Hz, a scan at 10 Hz, joints at 100 Hz
            t = now_s(talker)
            pubs["imu"].publish(imu_msg(t))
            sent["imu"] += 1
            if i % 2 == 0:
                pubs["joint_state"].publish(joint_msg(t))
                sent["joint_state"] += 1
            if i % 6 == 0:
                pubs["camera"].publish(image_msg(t))
                sent["camera"] += 1
            if i % 20 == 0:
                pubs["lidar"].publish(scan_msg(t, 2 * np.pi / 360))
                sent["lidar"] += 1
            time.sleep(max(0.0, start + (i + 1) * 0.005 - time.monotonic()))
        assert wait_until(lambda: dict(node.received) == sent, timeout=5.0), (dict(node.received), sent)
        assert dict(node.accepted) == sent and not node.bad
        ticks = node.tick_s.values()
        assert engine.calls >= 5 and (ticks >= 0.2).all()   # inference really took 200 ms per tick meanwhile
    finally:
        node.close()
        talker.destroy_node()


def test_dry_run_estop_from_the_next_tick_and_enable(context):
    cfg = load_config(ROBOT_YAML)
    node = make_fusion(context, FakeEngine(cfg.model, action=0.5), **{"inputs.required": ["imu"]})
    # When the node has latched the e-stop (on its node clock, the clock the command stamps are on). Every
    # tick stamped after it ran after it (a tick runs at or after its place on the grid), so it must be at
    # rest: a causal bound that holds however loaded the machine is. How long the Bool takes to cross DDS is
    # a timing figure, measured by bench/estop_latency.py, not asserted here.
    latched_at: list[float] = []
    runtime_estop = node.runtime.estop

    def estop_then_note_the_time(active: bool) -> None:
        runtime_estop(active)
        if active and not latched_at:
            latched_at.append(node.get_clock().now().nanoseconds * 1e-9)

    node.runtime.estop = estop_then_note_the_time
    node.spin_in_background()
    io = rclpy.create_node("io", context=context)
    commands, previews, actions = [], [], []
    io.create_subscription(JointState, cfg.outputs.joint_command_topic,
                           lambda m: commands.append((convert.stamp_to_s(m.header.stamp), list(m.velocity))), 100)
    io.create_subscription(Float64MultiArray, cfg.outputs.preview_topic, lambda m: previews.append(list(m.data)), 100)
    io.create_subscription(Float64MultiArray, cfg.outputs.action_topic, lambda m: actions.append(list(m.data)), 100)
    imu_pub = io.create_publisher(Imu, cfg.inputs.imu.topic, 200)
    estop = io.create_publisher(Bool, cfg.outputs.estop_topic, 10)
    enable = io.create_client(SetBool, cfg.outputs.enable_service)
    spinner = Spinner(context, io)
    stop_imu = threading.Event()

    def feed_imu():
        while not stop_imu.is_set():
            imu_pub.publish(imu_msg(now_s(io)))
            time.sleep(0.005)

    feeder = threading.Thread(target=feed_imu, daemon=True)
    feeder.start()

    def call_enable(flag: bool):
        assert enable.wait_for_service(timeout_sec=5.0)
        future = enable.call_async(SetBool.Request(data=flag))
        assert wait_until(future.done, 5.0)
        return future.result()

    try:
        # Disabled (the default): computed and previewed, nothing on the command topics.
        assert wait_until(lambda: len(previews) >= 20)
        assert not commands and not actions
        assert any(max(p) > 0 for p in previews)  # the network's action shows in the dry run
        assert call_enable(True).success
        assert wait_until(lambda: len(commands) >= 30)
        values = np.array([v for _, v in commands])
        assert np.isfinite(values).all() and values.max() <= 0.5 + 1e-9
        # Ramps up from rest: max_acceleration 5 per s, 0.05 per tick (0.1 when the tick came a period late).
        assert (values[0] >= 0.05 - 1e-5).all() and (values[0] <= 0.1 + 1e-5).all()
        assert np.isclose(values[-1], 0.5).all()
        t_estop = now_s(io)
        estop.publish(Bool(data=True))
        period = 1.0 / cfg.control_rate_hz
        assert wait_until(lambda: latched_at and commands[-1][0] > latched_at[0] + 5 * period)
        assert latched_at[0] >= t_estop
        after = [(t, v) for t, v in commands if t > latched_at[0]]
        assert len(after) >= 5   # the node kept ticking, ...
        moving = [(round(t - latched_at[0], 4), v) for t, v in after if any(v)]
        assert not moving, f"commands from ticks after the e-stop was latched: {moving[:3]}"   # ... at rest
        # Released button: still latched; the enable service refuses while asserted, accepts after.
        assert not call_enable(True).success
        estop.publish(Bool(data=False))
        time.sleep(0.1)
        assert not any(commands[-1][1])
        t_enable = now_s(io)
        assert call_enable(True).success
        assert wait_until(lambda: commands[-1][0] > t_enable + 5 * period)
        resumed = [v for t, v in commands if t > t_enable and any(v)]
        assert (np.array(resumed[0]) <= 0.1 + 1e-5).all() and max(resumed[-1]) > 0.1   # ramps from rest again
    finally:
        stop_imu.set()
        feeder.join(timeout=1.0)
        spinner.stop()
        node.close()
        io.destroy_node()


def test_ticks_follow_the_simulated_clock_with_use_sim_time(context):
    from rosgraph_msgs.msg import Clock
    cfg = load_config(ROBOT_YAML)
    node = make_fusion(context, FakeEngine(cfg.model), use_sim_time=True, **{"safety.start_enabled": True})
    assert node.cfg.use_sim_time
    node.spin_in_background()
    io = rclpy.create_node("sim_clock", context=context)
    commands = []
    io.create_subscription(JointState, cfg.outputs.joint_command_topic,
                           lambda m: commands.append(convert.stamp_to_s(m.header.stamp)), 100)
    clock = io.create_publisher(Clock, "/clock", 10)
    spinner = Spinner(context, io)
    try:
        assert wait_until(lambda: clock.get_subscription_count() >= 1)
        sim_times = [1000.0 + 0.01 * i for i in range(60)]   # 0.6 s of simulated time, sent at about half speed
        for t in sim_times:
            msg = Clock()
            msg.clock.sec, msg.clock.nanosec = convert.s_to_stamp_fields(t)
            clock.publish(msg)
            time.sleep(0.02)
        assert wait_until(lambda: len(commands) >= 40)
        stamps = np.array(commands)
        # Tick times are simulated times (the wall clock is ~1.8e9 s), one per simulated period.
        assert (stamps >= 1000.0).all() and (stamps <= sim_times[-1] + 1e-6).all()
        assert np.allclose(np.diff(stamps), 0.01, atol=1e-6)
    finally:
        spinner.stop()
        node.close()
        io.destroy_node()


def test_bad_messages_are_dropped_counted_and_never_crash_the_node(context):
    cfg = load_config(ROBOT_YAML)
    node = make_fusion(context, FakeEngine(cfg.model, nonfinite=True))
    node.spin_in_background()
    io = rclpy.create_node("io", context=context)
    previews = []
    io.create_subscription(Float64MultiArray, cfg.outputs.preview_topic, lambda m: previews.append(list(m.data)), 100)
    imu_pub = io.create_publisher(Imu, cfg.inputs.imu.topic, 10)
    cam_pub = io.create_publisher(Image, cfg.inputs.camera.topic, 10)
    scan_pub = io.create_publisher(LaserScan, cfg.inputs.lidar.topic, 10)
    joint_pub = io.create_publisher(JointState, cfg.inputs.joint_state.topic, 10)
    spinner = Spinner(context, io)
    pubs = (imu_pub, cam_pub, scan_pub, joint_pub)
    try:
        assert wait_until(lambda: min(p.get_subscription_count() for p in pubs) >= 1)
        time.sleep(0.5)   # the subscriptions' side of the match settles a little later (see qos.SubscriberGate)
        for _ in range(3):
            t = now_s(io)
            imu_pub.publish(imu_msg(t, nan=True))
            imu_pub.publish(imu_msg(0.0))                     # zero stamp
            cam_pub.publish(image_msg(t, short=True))         # data shorter than height * step
            scan_pub.publish(scan_msg(t, increment=0.0))      # inconsistent angle fields
            joint_pub.publish(joint_msg(t, names=[f"joint_{i}" for i in range(1, 7)]))   # joint_7 missing
            joint_pub.publish(joint_msg(t, velocity=False))   # positions only
            joint_pub.publish(joint_msg(t, nan=True))
        assert wait_until(lambda: sum(node.bad.values()) == 21), dict(node.bad)
        causes = set(node.bad)
        assert len(causes) == 7 and all(c.split(".")[0] in ("imu", "camera", "lidar", "joint_state") for c in causes)
        assert {"joint_state.missing_joint", "joint_state.no_velocity", "joint_state.non_finite"} <= causes
        assert all(n == 3 for n in node.bad.values())
        assert node.received["joint_state"] == 9 and node.accepted["joint_state"] == 0
        drops = node.runtime.summary()["drops"]
        assert all(drops.get(c) == 3 for c in causes)       # reported in /diagnostics with the drops
        n = len(previews)
        assert wait_until(lambda: len(previews) >= n + 10)   # still ticking
        # The engine returns NaN every tick: nothing non-finite was ever published.
        assert previews and np.isfinite(np.array(previews)).all()
    finally:
        spinner.stop()
        node.close()
        io.destroy_node()


def test_a_failing_engine_costs_ticks_not_the_node_and_commands_rest(context):
    cfg = load_config(ROBOT_YAML)
    node = make_fusion(context, FakeEngine(cfg.model, fail=True), **{"safety.start_enabled": True})
    node.spin_in_background()
    io = rclpy.create_node("io", context=context)
    commands = []
    io.create_subscription(JointState, cfg.outputs.joint_command_topic, lambda m: commands.append(list(m.velocity)),
                           100)
    spinner = Spinner(context, io)
    try:
        assert wait_until(lambda: len(commands) >= 10)   # the timer goes on, publishing rest
        assert all(v == [0.0] * 7 for v in commands)
        assert node.tick_s.count >= 10 and not node.unpublished
    finally:
        spinner.stop()
        node.close()
        io.destroy_node()


def test_moveit_servo_outputs_mirror_the_joint_command(context):
    from geometry_msgs.msg import TwistStamped
    from std_msgs.msg import Float64
    cfg = load_config(ROBOT_YAML)
    node = make_fusion(context, FakeEngine(cfg.model), **{"safety.start_enabled": True, "outputs.twist_enabled": True})
    node.spin_in_background()
    io = rclpy.create_node("io", context=context)
    commands, twists, grippers = {}, {}, []
    io.create_subscription(JointState, cfg.outputs.joint_command_topic,
                           lambda m: commands.__setitem__(convert.stamp_to_s(m.header.stamp), list(m.velocity)), 100)
    io.create_subscription(TwistStamped, cfg.outputs.twist_topic,
                           lambda m: twists.__setitem__(convert.stamp_to_s(m.header.stamp), m), 100)
    io.create_subscription(Float64, cfg.outputs.gripper_topic, lambda m: grippers.append(m.data), 100)
    spinner = Spinner(context, io)
    try:
        assert wait_until(lambda: len(set(commands) & set(twists)) >= 5 and grippers)
        for stamp in sorted(set(commands) & set(twists))[:5]:
            v, tw = commands[stamp], twists[stamp]
            assert tw.header.frame_id == cfg.outputs.twist_frame_id
            assert [tw.twist.linear.x, tw.twist.linear.y, tw.twist.linear.z,
                    tw.twist.angular.x, tw.twist.angular.y, tw.twist.angular.z] == v[:6]
        assert grippers[0] in [v[6] for v in commands.values()]
    finally:
        spinner.stop()
        node.close()
        io.destroy_node()


def test_bad_message_logging_is_throttled_per_cause():
    from mm_fusion_ros.ros.fusion_node import _Throttle
    throttle = _Throttle(period_s=3600.0)
    assert throttle.check("imu.non_finite") == 0       # first: logged
    assert throttle.check("imu.non_finite") is None    # then quiet
    assert throttle.check("imu.non_finite") is None
    assert throttle.check("camera.bad_size") == 0      # another cause is logged on its own
    throttle = _Throttle(period_s=0.0)
    throttle.check("a")
    assert throttle.check("a") == 0


# ---------------------------------------------------------------- sensor nodes in-process

def collect(context, topic, msg_type, out: list, depth: int = 100):
    node = rclpy.create_node(f"listener_{len(topic)}_{id(out)}", context=context)
    node.create_subscription(msg_type, topic, out.append, depth)
    return node


def test_camera_node_plays_a_video_file_as_rgb8_frames_and_loops(context, tmp_path):
    import cv2

    from mm_fusion_ros.ros.camera_node import CameraNode
    video = make_video(tmp_path / "clip.avi", seconds=0.4, fps=30, width=160, height=120)   # 12 frames
    first = cv2.VideoCapture(str(video)).read()[1]
    frames: list = []
    listener = collect(context, "/camera/image_raw", Image, frames)
    camera = CameraNode(context=context, cli_args=args(source=str(video), wait_for_subscribers=1))
    spinner = Spinner(context, listener)
    threading.Thread(target=camera.spin, daemon=True).start()
    try:
        assert wait_until(lambda: len(frames) >= 20)    # more than the file holds: it looped
        msg = frames[0]
        assert (msg.encoding, msg.width, msg.height, msg.step) == ("rgb8", 160, 120, 480)
        pixels = np.frombuffer(bytes(msg.data), np.uint8).reshape(120, 160, 3)
        assert np.array_equal(pixels, cv2.cvtColor(first, cv2.COLOR_BGR2RGB))
        stamps = [convert.stamp_to_s(f.header.stamp) for f in frames]
        assert all(b > a for a, b in zip(stamps, stamps[1:]))
        sample = convert.camera_from_image(msg)
        assert sample.encoding == "rgb8" and sample.stamp == stamps[0]
    finally:
        spinner.stop()
        camera.close()
        listener.destroy_node()


def test_microphone_node_plays_a_wav_file_in_contiguous_20ms_chunks(context, tmp_path):
    import wave

    from mm_fusion_ros.ros.microphone_node import MicrophoneNode
    wav_path = make_wav(tmp_path / "clip.wav", seconds=0.3, rate=16000)   # 15 chunks of 320 samples
    with wave.open(str(wav_path)) as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
    chunks: list = []
    listener = collect(context, "/audio/audio_stamped", Image, chunks)
    mic = MicrophoneNode(context=context, cli_args=args(source=str(wav_path), type="image_pcm",
                                                        wait_for_subscribers=1))
    spinner = Spinner(context, listener)
    threading.Thread(target=mic.spin, daemon=True).start()
    try:
        assert wait_until(lambda: len(chunks) >= 20)    # more than the file holds: it looped
        samples = [convert.audio_from_image_pcm(m, 16000) for m in chunks]
        assert all(m.encoding == "16SC1" and m.width == 320 for m in chunks)
        assert np.allclose(samples[0].samples, pcm[:320] / 32768.0, atol=1e-6)
        assert np.allclose(samples[15].samples, pcm[:320] / 32768.0, atol=1e-6)   # chunk 15 = the file again
        gaps = np.diff([s.stamp for s in samples])
        assert np.allclose(gaps, 0.02, atol=1e-6)       # back to back: no overlap, no hole for the aligner
    finally:
        spinner.stop()
        mic.close()
        listener.destroy_node()


class _FakeInputStream:
    """sounddevice.InputStream stand-in: delivers 20 ms blocks with PortAudio's timing fields.

    There is no sound card here, so this plays what PortAudio hands the callback: the ADC time of
    each block's first sample and the stream's current time, and one block with an overflow flag.
    """

    latency_s = 0.012

    def __init__(self, samplerate, channels, device, callback, dtype, blocksize):
        self.rate, self.channels, self.callback, self.dtype, self.blocksize = samplerate, channels, callback, dtype, \
            blocksize
        self.opened = {"device": device, "dtype": dtype, "blocksize": blocksize}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from types import SimpleNamespace
        k, start = 0, time.monotonic()
        # Paced on an absolute schedule, as a sound card's clock delivers blocks (no drift).
        while not self._stop.wait(max(0.0, start + (k + 1) * self.blocksize / self.rate - time.monotonic())):
            block = np.full((self.blocksize, self.channels), k % 100, dtype=self.dtype)
            # PortAudio's stream clock (not the ROS clock): the block's first sample was taken at
            # k * period; the callback runs a full block plus ``latency_s`` later, or later still when
            # the thread was late, and currentTime says so.
            current = 1000.0 + time.monotonic() - start + self.latency_s
            info = SimpleNamespace(inputBufferAdcTime=1000.0 + k * self.blocksize / self.rate, currentTime=current)
            self.callback(block, self.blocksize, info, SimpleNamespace(input_overflow=(k == 3)))
            k += 1

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()

    def close(self):
        self._stop.set()


def test_microphone_node_stamps_sound_card_blocks_at_their_adc_time(context, monkeypatch):
    import sys
    import types

    from mm_fusion_ros.ros.microphone_node import MicrophoneNode
    streams: list = []

    def input_stream(**kwargs):
        streams.append(_FakeInputStream(**kwargs))
        return streams[-1]

    monkeypatch.setitem(sys.modules, "sounddevice", types.SimpleNamespace(InputStream=input_stream))
    chunks: list = []
    received: list = []

    def on_chunk(msg):
        chunks.append(msg)
        received.append(now_s(listener))

    listener = rclpy.create_node("mic_listener", context=context)
    listener.create_subscription(Image, "/audio/audio_stamped", on_chunk, 100)
    mic = MicrophoneNode(context=context, cli_args=args(source="default", type="image_pcm", wait_for_subscribers=1))
    spinner = Spinner(context, listener)
    threading.Thread(target=mic.spin, daemon=True).start()
    try:
        assert wait_until(lambda: len(chunks) >= 10)
        assert streams[0].opened == {"device": None, "dtype": "int16", "blocksize": 320}
        samples = [convert.audio_from_image_pcm(m, 16000) for m in chunks]
        assert [int(round(s.samples[0] * 32768)) for s in samples[:10]] == list(range(10))   # every block, in order
        assert np.allclose(np.diff([s.stamp for s in samples[:10]]), 0.02, atol=1e-6)   # back to back
        # Stamped at capture: the ADC time of the first sample, a block and ``latency_s`` before the
        # callback ran, not the time of the callback.
        ages = np.array(received[:10]) - np.array([s.stamp for s in samples[:10]])
        assert np.median(ages) >= 0.02 + _FakeInputStream.latency_s - 0.002
        assert mic.overflows == 1
    finally:
        spinner.stop()
        mic.close()
        listener.destroy_node()


def test_sensor_sim_node_publishes_valid_scans_imu_and_joint_states_and_stops_a_stream(context):
    from mm_fusion_ros.ros.sensor_sim_node import SensorSimNode
    cfg = load_config(ROBOT_YAML)
    scans, imus, joint_states = [], [], []
    listener = rclpy.create_node("listener_sim", context=context)
    listener.create_subscription(LaserScan, "/scan", scans.append, 10)
    listener.create_subscription(Imu, "/imu/data", imus.append, 200)
    listener.create_subscription(JointState, "/" + cfg.inputs.joint_state.topic, joint_states.append, 200)
    sim = SensorSimNode(context=context, cli_args=args(**{"imu.stop_after_s": 0.3, "wait_for_subscribers": 1}))
    spinner = Spinner(context, listener)
    threading.Thread(target=sim.spin, daemon=True).start()
    try:
        assert wait_until(lambda: len(scans) >= 6 and len(joint_states) >= 20)
        n_imu = len(imus)
        time.sleep(0.3)
        assert len(imus) == n_imu and sim.published()["imu"] == n_imu   # the IMU stream stopped for good
        assert 20 <= n_imu <= 0.3 * 200 + 5
        assert len(scans) >= 6                                          # the LiDAR goes on
        lidar = convert.lidar_from_laser_scan(scans[0], cfg.model.lidar)
        assert lidar.ranges.shape == (360,) and np.isfinite(lidar.ranges).mean() > 0.9
        imu = convert.imu_from_msg(imus[0])
        assert abs(imu.accel[2] - 9.81) < 0.5
        # Joint states as fusion_node reads them: its model.action.names, positions and velocities.
        n_joints = len(joint_states)
        assert wait_until(lambda: len(joint_states) > n_joints)         # and these go on too
        assert set(sim.published()) == {"lidar", "imu", "joint_state"}  # keyed as fusion_node counts what it receives
        msg = joint_states[0]
        assert list(msg.name) == list(cfg.model.action.names) and msg.header.frame_id == ""
        sample = convert.joint_state_from_msg(msg, cfg.model.action.names)
        assert sample.stamp == convert.stamp_to_s(msg.header.stamp)
        from mm_fusion_ros.synthetic import SyntheticSensors
        q, qd = SyntheticSensors(cfg.model, seed=0).joint_state(sample.stamp)
        np.testing.assert_allclose(sample.position, q, atol=1e-5)
        np.testing.assert_allclose(sample.velocity, qd, atol=1e-5)
        stamps = [convert.stamp_to_s(m.header.stamp) for m in joint_states]
        assert all(b > a for a, b in zip(stamps, stamps[1:]))
    finally:
        spinner.stop()
        sim.close()
        listener.destroy_node()


def test_contiguous_stamps_resync_only_on_a_real_gap():
    from mm_fusion_ros.ros.microphone_node import ContiguousStamps
    stamps = ContiguousStamps(rate=16000, resync_s=0.005)
    jittered = [10.0, 10.0203, 10.0398, 10.0601]         # ADC times with sub-ms jitter
    assert [stamps.stamp(t, 320) for t in jittered] == pytest.approx([10.0, 10.02, 10.04, 10.06])
    assert stamps.stamp(10.5, 320) == 10.5 and stamps.resyncs == 1   # an overflow: re-anchored


def test_format_param_gives_yaml_that_ros_reads_back():
    assert procs.format_param(True) == "true"
    assert procs.format_param([0.05, 0.1]) == "[0.05, 0.1]"
    assert procs.format_param("0") == '"0"' and procs.format_param("") == '""'
    assert procs.format_param("/scan") == "/scan" and procs.format_param(3) == "3"
