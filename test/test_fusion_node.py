"""fusion_node as a ROS 2 engineer expects it on a robot (issue #12): one node, lifecycle, names and namespaces,
sensor-data QoS, described and validated parameters, 1 Hz diagnostics, a failed tick that ramps from rest, and
no input refused before the first /clock."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install '.[ros]')")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Imu, JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray  # noqa: E402

from mm_fusion_ros import procs  # noqa: E402
from mm_fusion_ros.config import ConfigError, load_config  # noqa: E402
from mm_fusion_ros.ros import convert  # noqa: E402
from test_nodes import ROBOT_YAML, FakeEngine, Spinner, args, imu_msg, joint_msg, now_s, wait_until  # noqa: E402

SENSORS = ("camera/image_raw", "audio/audio_stamped", "imu/data", "scan", "joint_states")


def fusion(context, engine=None, namespace=None, **overrides):
    from mm_fusion_ros.ros.fusion_node import FusionNode
    cfg = load_config(ROBOT_YAML)
    return FusionNode(context=context, engine=engine or FakeEngine(cfg.model), namespace=namespace,
                      cli_args=args(**overrides))


def _imu_feeder(io, topic: str, stop: threading.Event, qos=200) -> threading.Thread:
    pub = io.create_publisher(Imu, topic, qos)

    def run():
        while not stop.is_set():
            pub.publish(imu_msg(now_s(io)))
            time.sleep(0.005)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------- one node

def test_one_node_holds_every_subscription_publisher_and_service(context):
    # Its own namespace: nodes of earlier tests in this domain may linger in the graph for a while.
    node = fusion(context, namespace="one")
    io = rclpy.create_node("observer", context=context)
    ns = "/one"
    try:
        assert wait_until(lambda: ("fusion_node", ns) in io.get_node_names_and_namespaces())
        assert [n for n in io.get_node_names_and_namespaces() if n[1] == ns] == [("fusion_node", ns)]  # no twin
        assert wait_until(lambda: len(io.get_subscriber_names_and_types_by_node("fusion_node", ns)) >= 7)
        subs = {t for t, _ in io.get_subscriber_names_and_types_by_node("fusion_node", ns)}
        pubs = {t for t, _ in io.get_publisher_names_and_types_by_node("fusion_node", ns)}
        assert {f"{ns}/{t}" for t in SENSORS} | {f"{ns}/audio/audio_info", f"{ns}/mm_fusion/estop"} <= subs
        assert {f"{ns}/mm_fusion/action", f"{ns}/mm_fusion/joint_command", f"{ns}/mm_fusion/fused_state",
                f"{ns}/mm_fusion/preview", "/diagnostics", f"{ns}/fusion_node/tick"} <= pubs
        wanted = {f"{ns}/mm_fusion/enable", f"{ns}/fusion_node/change_state", f"{ns}/fusion_node/get_state",
                  f"{ns}/fusion_node/set_parameters", f"{ns}/fusion_node/describe_parameters"}
        assert wait_until(lambda: wanted <= {s for s, _ in io.get_service_names_and_types_by_node("fusion_node", ns)})
    finally:
        node.close()
        io.destroy_node()


# ---------------------------------------------------------------- lifecycle

def test_lifecycle_configure_activate_deactivate_cleanup(context):
    cfg = load_config(ROBOT_YAML)
    node = fusion(context, autostart=False, **{"safety.start_enabled": True, "inputs.required": ["imu"]})
    node.spin_in_background()
    io = rclpy.create_node("io", context=context)
    commands, ticks = [], []
    io.create_subscription(JointState, cfg.outputs.joint_command_topic,
                           lambda m: commands.append((time.monotonic(), list(m.velocity))), 100)
    io.create_subscription(DiagnosticArray, "/fusion_node/tick", lambda m: ticks.append(m), 1000)
    stop = threading.Event()
    spinner = Spinner(context, io)
    feeder = _imu_feeder(io, cfg.inputs.imu.topic, stop)
    try:
        assert node.state == "unconfigured" and node.runtime is None
        assert not io.get_subscriber_names_and_types_by_node("fusion_node", "/")   # nothing until configured
        assert node.trigger_configure()== TransitionCallbackReturn.SUCCESS and node.state == "inactive"   # SUCCESS
        time.sleep(0.3)
        assert not commands and not ticks and node.tick_s.count == 0            # configured: not ticking
        assert node.trigger_activate()== TransitionCallbackReturn.SUCCESS and node.state == "active"
        assert wait_until(lambda: len(commands) >= 20 and len(ticks) >= 20)
        assert max(max(v) for _, v in commands) > 0                               # commanding the arm
        n_ticks = node.tick_s.count
        assert node.trigger_deactivate()== TransitionCallbackReturn.SUCCESS and node.state == "inactive"
        t_off = time.monotonic()
        time.sleep(0.3)
        after = [v for t, v in commands if t > t_off - 0.001]
        assert after[-1] == [0.0] * 7                      # rest, then silence
        assert len([v for t, v in commands if t > t_off + 0.1]) == 0
        assert node.tick_s.count <= n_ticks + 1 and node.runtime is not None    # state kept
        assert node.trigger_activate()== TransitionCallbackReturn.SUCCESS
        t_on = time.monotonic()
        assert wait_until(lambda: len([1 for t, _ in commands if t > t_on]) >= 5)
        resumed = [v for t, v in commands if t > t_on]
        assert max(resumed[0]) <= 0.05 + 1e-9              # ramps from rest again
        assert node.trigger_deactivate()== TransitionCallbackReturn.SUCCESS and node.trigger_cleanup()== TransitionCallbackReturn.SUCCESS
        assert node.state == "unconfigured" and node.runtime is None
        assert wait_until(lambda: not io.get_subscriber_names_and_types_by_node("fusion_node", "/"))
    finally:
        stop.set()
        feeder.join(timeout=1.0)
        spinner.stop()
        node.close()
        io.destroy_node()


def test_failed_configure_leaves_it_unconfigured_with_the_error_on_diagnostics(context, tmp_path):
    missing = tmp_path / "no_such.ckpt"
    io = rclpy.create_node("io", context=context)
    diags = []
    io.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diags.append(m), 100)
    spinner = Spinner(context, io)
    from mm_fusion_ros.ros.fusion_node import FusionNode
    node = FusionNode(context=context, cli_args=args(checkpoint=str(missing)))   # autostart: configure fails
    node.spin_in_background()
    try:
        assert node.state == "unconfigured" and node.runtime is None
        assert node.transitions[0] == ("configure", "failure")
        assert str(missing) in node.last_error
        assert not io.get_subscriber_names_and_types_by_node("fusion_node", "/")   # nothing half made

        def error_reported():
            for m in diags:
                for s in m.status:
                    if s.name.endswith(": node") and s.level == b"\x02" and str(missing) in s.message:
                        return s.hardware_id == "/fusion_node"
            return False
        assert wait_until(error_reported, timeout=5.0)
    finally:
        spinner.stop()
        node.close()
        io.destroy_node()


# ---------------------------------------------------------------- names

def test_two_arms_in_two_namespaces_each_hear_only_their_own_sensors(context):
    cfg = load_config(ROBOT_YAML)
    left = fusion(context, namespace="left", **{"inputs.required": ["imu"], "safety.start_enabled": True})
    right = fusion(context, namespace="right", **{"inputs.required": ["imu"], "safety.start_enabled": True})
    left.spin_in_background()
    right.spin_in_background()
    io = rclpy.create_node("io", context=context)
    commands = {"left": [], "right": []}
    for arm in commands:
        io.create_subscription(JointState, f"/{arm}/{cfg.outputs.joint_command_topic}",
                               lambda m, arm=arm: commands[arm].append(list(m.velocity)), 100)
    stop = threading.Event()
    spinner = Spinner(context, io)
    feeder = _imu_feeder(io, "/left/imu/data", stop)    # only the left arm's IMU publishes
    try:
        assert wait_until(lambda: len(commands["left"]) >= 20 and left.accepted["imu"] > 50)
        assert right.received["imu"] == 0
        assert max(commands["left"][-1]) > 0                  # fresh: commanding
        # The right arm's required IMU never arrives: the watchdog holds it at rest, it ticks on its own.
        assert commands["right"] and all(v == [0.0] * 7 for v in commands["right"])
        topics = dict(io.get_topic_names_and_types())
        assert "/left/mm_fusion/action" in topics and "/right/mm_fusion/action" in topics
        assert "/left/fusion_node/tick" in topics
    finally:
        stop.set()
        feeder.join(timeout=1.0)
        spinner.stop()
        left.close()
        right.close()
        io.destroy_node()


# ---------------------------------------------------------------- joint states

def test_joint_states_drive_the_watchdog_and_a_bad_one_costs_only_itself(context):
    """joint_state is required: fresh joint states let the arm be commanded, a bad message among them is
    counted by cause and dropped without stopping the node, and when they stop the watchdog holds at rest."""
    cfg = load_config(ROBOT_YAML)
    node = fusion(context, FakeEngine(cfg.model, action=0.5),
                  **{"inputs.required": ["joint_state"], "safety.start_enabled": True,
                     "inputs.joint_state.qos": "reliable"})
    node.spin_in_background()
    io = rclpy.create_node("io", context=context)
    commands = []
    io.create_subscription(JointState, cfg.outputs.joint_command_topic, lambda m: commands.append(list(m.velocity)),
                           100)
    pub = io.create_publisher(JointState, cfg.inputs.joint_state.topic, 100)
    stop = threading.Event()
    sent = {"good": 0, "bad": 0}
    # A driver that lists the arm's joints in its own order, with a gripper finger among them.
    names = ["joint_7", "finger", "joint_1", "joint_2", "joint_3", "joint_4", "joint_5", "joint_6"]

    def feed():
        i = 0
        while not stop.is_set():
            if i % 5 == 4:
                pub.publish(joint_msg(now_s(io), names=names[:-1]))   # joint_6 missing
                sent["bad"] += 1
            else:
                pub.publish(joint_msg(now_s(io), names=names))
                sent["good"] += 1
            i += 1
            time.sleep(0.01)

    spinner = Spinner(context, io)
    feeder = threading.Thread(target=feed, daemon=True)
    try:
        assert wait_until(lambda: pub.get_subscription_count() >= 1)
        feeder.start()
        assert wait_until(lambda: node.bad["joint_state.missing_joint"] >= 5 and commands
                          and max(commands[-1]) == pytest.approx(0.5))           # commanding the arm meanwhile
        assert set(node.bad) == {"joint_state.missing_joint"}
        assert node.accepted["joint_state"] >= 20
        assert node.runtime.summary()["drops"]["joint_state.missing_joint"] == node.bad["joint_state.missing_joint"]
        stop.set()
        feeder.join(timeout=1.0)
        assert wait_until(lambda: node.received["joint_state"] == sent["good"] + sent["bad"])
        assert node.accepted["joint_state"] == sent["good"] and node.bad["joint_state.missing_joint"] == sent["bad"]
        # The driver is gone: after max_age the watchdog holds the arm at rest, and the node ticks on.
        assert wait_until(lambda: len(commands) >= 5 and all(v == [0.0] * 7 for v in commands[-5:]))
        n = len(commands)
        assert wait_until(lambda: len(commands) >= n + 10)
        safety = {s.name: s for s in node.runtime.report()}["mm_fusion: safety"]
        assert "joint_state" in safety.message
    finally:
        stop.set()
        spinner.stop()
        node.close()
        io.destroy_node()


# ---------------------------------------------------------------- QoS

_BEST_EFFORT_PUBLISHER = textwrap.dedent("""
    import time, rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Imu
    rclpy.init()
    node = rclpy.create_node("imu_driver")
    pub = node.create_publisher(Imu, "imu/data", qos_profile_sensor_data)   # best effort, as IMU drivers publish
    end = time.monotonic() + {seconds}
    while time.monotonic() < end:
        msg = Imu()
        now = node.get_clock().now().nanoseconds
        msg.header.stamp.sec, msg.header.stamp.nanosec = now // 10**9, now % 10**9
        msg.linear_acceleration.z = 9.81
        pub.publish(msg)
        time.sleep(0.005)
    node.destroy_node()
    rclpy.shutdown()
""")


def _driver(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _BEST_EFFORT_PUBLISHER.format(seconds=seconds)],
                            env=procs.ros_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_best_effort_driver_in_another_process_reaches_the_node_with_default_parameters(context):
    node = fusion(context)
    node.spin_in_background()
    driver = _driver(6.0)
    try:
        assert wait_until(lambda: node.accepted["imu"] >= 100, timeout=15.0), dict(node.received)
    finally:
        driver.wait(timeout=20)
        node.close()


def test_qos_overrides_parameters_change_the_subscription(context):
    # The standard override: a reliable subscription no longer matches the best-effort driver.
    node = fusion(context, **{"qos_overrides./imu/data.subscription.reliability": "reliable"})
    node.spin_in_background()
    driver = _driver(3.0)
    try:
        assert node.get_parameter("qos_overrides./imu/data.subscription.reliability").value == "reliable"
        time.sleep(3.0)
        assert node.received["imu"] == 0
    finally:
        driver.wait(timeout=20)
        node.close()


# ---------------------------------------------------------------- parameters

def test_parameters_are_described_typed_ranged_and_read_only(context):
    from rcl_interfaces.msg import ParameterType
    node = fusion(context)
    try:
        # Every parameter says what it is (the comment beside it in robot.yaml), not just its name.
        from mm_fusion_ros.config import RobotConfig
        from mm_fusion_ros.ros.params import parameter_defaults
        undescribed = [n for n in parameter_defaults(RobotConfig)
                       if n != "use_sim_time" and node.describe_parameter(n).description in ("", n)]
        assert not undescribed, undescribed
        d = node.describe_parameter("control_rate_hz")
        assert d.type == ParameterType.PARAMETER_DOUBLE and d.read_only
        assert "control ticks per second" in d.description
        assert d.floating_point_range[0].to_value == 2000.0
        d = node.describe_parameter("safety.on_stale")
        assert not d.read_only and "hold_last" in d.description
        assert node.describe_parameter("inputs.imu.depth").integer_range[0].from_value == 1
        assert node.describe_parameter("model.action.names").type == ParameterType.PARAMETER_STRING_ARRAY
        # A change that needs a restart is refused.
        result = node.set_parameters([Parameter("control_rate_hz", value=50.0)])[0]
        assert not result.successful and "read-only" in result.reason.lower()
        # Out of range: refused, with the range in the reason.
        result = node.set_parameters([Parameter("safety.hold_timeout_s", value=-1.0)])[0]
        assert not result.successful and "0.001" in result.reason and "600" in result.reason, result.reason
    finally:
        node.close()


def test_safety_parameters_change_at_run_time_only_tighter_while_enabled(context):
    cfg = load_config(ROBOT_YAML)
    node = fusion(context, FakeEngine(cfg.model, action=0.5), **{"inputs.required": ["imu"]})
    node.spin_in_background()
    io = rclpy.create_node("io", context=context)
    previews = []
    io.create_subscription(Float64MultiArray, cfg.outputs.preview_topic, lambda m: previews.append(list(m.data)), 100)
    stop = threading.Event()
    spinner = Spinner(context, io)
    feeder = _imu_feeder(io, cfg.inputs.imu.topic, stop)
    try:
        # Disabled (dry run): anything valid goes, and takes effect on the next ticks.
        assert node.set_parameters([Parameter("safety.upper", value=[0.2])])[0].successful
        n = len(previews)
        assert wait_until(lambda: len(previews) >= n + 30)
        assert max(previews[-1]) == pytest.approx(0.2)
        # Invalid: refused, naming the key, nothing changed.
        result = node.set_parameters([Parameter("safety.lower", value=[0.5])])[0]
        assert not result.successful and "safety.lower" in result.reason
        ok, _ = node.runtime.set_enabled(True)
        assert ok
        # Enabled: tightening is accepted, loosening refused with the reason.
        assert node.set_parameters([Parameter("safety.upper", value=[0.1])])[0].successful
        result = node.set_parameters([Parameter("safety.upper", value=[0.9])])[0]
        assert not result.successful and "tightened" in result.reason and "wider limits" in result.reason
        assert node.cfg.safety.upper == (0.1,)
    finally:
        stop.set()
        feeder.join(timeout=1.0)
        spinner.stop()
        node.close()
        io.destroy_node()


def test_unknown_parameters_are_refused_at_start(context):
    from mm_fusion_ros.ros.fusion_node import FusionNode
    with pytest.raises(ConfigError, match="inputs.imu.topik"):
        FusionNode(context=context, cli_args=args(**{"inputs.imu.topik": "x"}))


# ---------------------------------------------------------------- diagnostics

def test_diagnostics_about_once_a_second_and_each_tick_on_its_own_topic(context):
    node = fusion(context)
    node.spin_in_background()
    io = rclpy.create_node("io", context=context)
    diags, ticks = [], []
    io.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diags.append(time.monotonic()), 100)
    io.create_subscription(DiagnosticArray, "/fusion_node/tick", lambda m: ticks.append(m), 1000)
    spinner = Spinner(context, io)
    try:
        time.sleep(3.5)
        assert 2 <= len(diags) <= 5                          # ~1 Hz, not 100 Hz
        assert len(ticks) >= 150                             # the per-tick status moved to ~/tick
        assert ticks[-1].status[0].name.endswith(": tick") and ticks[-1].status[0].hardware_id == "/fusion_node"
    finally:
        spinner.stop()
        node.close()
        io.destroy_node()


# ---------------------------------------------------------------- bugs

def test_after_a_failed_tick_the_next_good_one_ramps_from_rest(context):
    cfg = load_config(ROBOT_YAML)
    node = fusion(context, FakeEngine(cfg.model, action=0.5), **{"inputs.required": ["imu"],
                                                                 "safety.start_enabled": True})
    runtime = node.runtime
    real_tick = runtime.tick
    failing = threading.Event()

    def tick(t):
        if failing.is_set():
            raise RuntimeError("aligner fell over")
        return real_tick(t)

    runtime.tick = tick
    node.spin_in_background()
    io = rclpy.create_node("io", context=context)
    commands, errors = [], []
    io.create_subscription(JointState, cfg.outputs.joint_command_topic, lambda m: commands.append(list(m.velocity)),
                           100)
    io.create_subscription(DiagnosticArray, "/fusion_node/tick",
                           lambda m: errors.extend(s for s in m.status if s.level == b"\x02"), 1000)
    stop = threading.Event()
    spinner = Spinner(context, io)
    feeder = _imu_feeder(io, cfg.inputs.imu.topic, stop)
    try:
        assert wait_until(lambda: commands and max(commands[-1]) == pytest.approx(0.5))   # at full command
        failing.set()
        n = len(commands)
        assert wait_until(lambda: len(commands) >= n + 5)
        failing.clear()
        m = len(commands)
        assert wait_until(lambda: len(commands) >= m + 5)
        seq = np.array(commands)
        steps = np.abs(np.diff(seq, axis=0)).max(axis=1)
        rest_ticks = np.flatnonzero((seq == 0.0).all(axis=1))
        assert len(rest_ticks) >= 3
        # Ramped from rest, not straight back to 0.5: 5 per s for the tick's dt (at most 2 periods when late).
        after = seq[rest_ticks[-1] + 1]
        assert after.max() <= 0.1 + 1e-9
        assert steps[rest_ticks[-1]:].max() <= 0.1 + 1e-9
        assert sum("tick failed" in e.message for e in errors) >= 3   # every failed tick said so on ~/tick
    finally:
        stop.set()
        feeder.join(timeout=1.0)
        spinner.stop()
        node.close()
        io.destroy_node()


def test_with_sim_time_nothing_is_refused_before_the_first_clock(context):
    from rosgraph_msgs.msg import Clock
    node = fusion(context, use_sim_time=True, **{"inputs.imu.qos": "reliable"})   # every message counted
    node.spin_in_background()
    io = rclpy.create_node("io", context=context)
    imu = io.create_publisher(Imu, "imu/data", 100)
    clock = io.create_publisher(Clock, "/clock", 10)
    spinner = Spinner(context, io)
    try:
        assert wait_until(lambda: imu.get_subscription_count() >= 1 and clock.get_subscription_count() >= 1)
        time.sleep(0.5)   # the subscription's side of the match settles a little later
        for i in range(20):                     # a bag's messages arriving before its clock does
            imu.publish(imu_msg(1000.0 + 0.005 * i))
            time.sleep(0.005)
        assert wait_until(lambda: node.received["imu"] == 20)
        assert not node.bad and node.waiting_for_clock == 20 and node.tick_s.count == 0
        for i in range(40):
            t = 1000.1 + 0.005 * i
            msg = Clock()
            msg.clock.sec, msg.clock.nanosec = convert.s_to_stamp_fields(t)
            clock.publish(msg)
            imu.publish(imu_msg(t))
            time.sleep(0.005)
        assert wait_until(lambda: node.accepted["imu"] >= 30)
        assert not node.bad and node.tick_s.count > 0
    finally:
        spinner.stop()
        node.close()
        io.destroy_node()
