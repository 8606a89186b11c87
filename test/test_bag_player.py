"""bag_player drives fusion_node on sim time: the same actions as offline replay, and loops reset cleanly.

fusion_node and bag_player run as separate processes (DDS on loopback, this test's domain);
this process listens to /mm_fusion/joint_command (stamped with the tick time, unlike the action
topic). Tolerance, and why it is not zero: live, the node's intake and control threads race.
A message published just before a clock step can reach the aligner after the tick it belongs
to, so that tick uses one IMU sample or audio chunk fewer than offline replay. Such a miss
changes one tick's inputs slightly, and the recurrent state carries a trace of it onwards;
the rate limiter (safety.max_acceleration times the tick's dt) bounds how far any one tick's command can move. We
require the live commands to stay within TOLERANCE of offline replay's at every common tick;
on the busy 2-core development machine the largest difference seen was 1.3e-3 (ONNX Runtime on both sides).
"""

from __future__ import annotations

import dataclasses
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install '.[ros]')")

from mm_fusion_ros import procs  # noqa: E402
from mm_fusion_ros.bag.make_bag import MakeBagOptions, make_bag  # noqa: E402
from mm_fusion_ros.bag.reader import BagReader  # noqa: E402
from mm_fusion_ros.replay import ReplayOptions, replay  # noqa: E402

DURATION = 2.0
# Half speed: the node then has twice its tick budget, so a busy machine (other test processes on
# two cores) does not make it miss ticks; a missed tick changes the next dt, and the comparison.
RATE = "0.5"
TOLERANCE = 0.02        # per DOF, in action units (the most a command moves per 10 ms tick is 5.0/s * 0.01 s = 0.05)
MIN_COMMON_SHARE = 0.7  # of offline ticks seen live in each pass: a loaded 2-core machine skips ticks (as a
                        # timer does); what must hold is that the ticks it runs agree with offline
TICK_SHARE = 0.97       # of the ticks in both that must agree within TOLERANCE


def _quiet(_msg: str) -> None:
    pass


def _on_grid(stamp_ns: int) -> int:
    # The node stamps with its clock in float seconds: epoch times come back a few hundred ns off.
    return round(stamp_ns / 100_000) * 100_000


class _Listener:
    """joint_command messages as (stamp_ns, velocity) in arrival order."""

    def __init__(self, topic: str):
        from rclpy.executors import SingleThreadedExecutor
        from sensor_msgs.msg import JointState

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("bag_player_test_listener", context=self.context)
        self.got: list[tuple[int, np.ndarray]] = []
        self.node.create_subscription(JointState, topic, self._on_msg, 1000)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _on_msg(self, msg) -> None:
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        self.got.append((_on_grid(stamp), np.array(msg.velocity)))

    def _spin(self) -> None:
        try:
            while self.context.ok():
                self.executor.spin_once(timeout_sec=0.05)
        except Exception:  # noqa: BLE001 - shutdown races end the spin thread
            pass

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        self.thread.join(timeout=2.0)


def _audio_kind_here() -> str:
    """The audio type a node really uses here: audio_data_stamped, or image_pcm without audio_common_msgs."""
    from mm_fusion_ros.ros.params import audio_message_types
    return audio_message_types("audio_data_stamped")[0]


def _passes(messages: list[tuple[int, np.ndarray]]) -> list[dict[int, np.ndarray]]:
    """Split at each clock jump backwards: one dict per pass of the bag."""
    passes: list[dict[int, np.ndarray]] = [{}]
    last = -1
    for stamp, velocity in messages:
        if stamp < last:
            passes.append({})
        passes[-1][stamp] = velocity
        last = stamp
    return passes


def _deviation(live: dict[int, np.ndarray], offline: dict[int, np.ndarray]) -> tuple[int, float]:
    """(ticks in both, the deviation that TICK_SHARE of them stay within).

    Not the maximum: on a loaded machine (CI's two cores) a best-effort message now and then reaches the
    live node after the tick that offline replay gave it to, and that tick alone differs (measured once,
    0.04 at one tick of 200). A systematic difference moves every tick.
    """
    common = sorted(set(live) & set(offline))
    if not common:
        return 0, np.inf
    per_tick = np.array([float(np.abs(live[t] - offline[t]).max()) for t in common])
    return len(common), float(np.quantile(per_tick, TICK_SHARE))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, default_config, robot_yaml):
    # ONNX Runtime on both sides: one intra-op thread, so the node keeps its 100 Hz next to the player.
    cfg = dataclasses.replace(default_config,
                              engine=dataclasses.replace(default_config.engine, backend="onnxruntime"))
    root = tmp_path_factory.mktemp("player")
    bag = root / "bag"
    make_bag(bag, cfg, MakeBagOptions(duration_s=DURATION, seed=5, camera_width=64, camera_height=48),
             progress=False, log=_quiet)
    offline = replay(bag, cfg, ReplayOptions(out=root / "offline", progress=False), log=_quiet)
    with BagReader(offline.out, log=_quiet) as out:
        reference = {m.t_ns: np.array(out.decode(m).velocity)
                     for m in out.messages(topics=[cfg.outputs.joint_command_topic])}
    return cfg, root, bag, reference, robot_yaml


def _run_live(cfg, root: Path, bag: Path, robot_yaml: Path, player_args: list[str]):
    env = procs.ros_env()
    listener = _Listener(cfg.outputs.joint_command_topic)
    node = procs.start_node("fusion_node", root / "logs", params_file=robot_yaml, env=env, label="fusion_node",
                            overrides={"use_sim_time": True, "engine.backend": cfg.engine.backend,
                                       "safety.start_enabled": True})
    player = None
    try:
        assert procs.wait_for_log(node, "ticking at", 60.0), node.log()
        log_path = root / "logs" / "bag_player.log"
        with open(log_path, "wb") as log:
            player = subprocess.Popen([procs.executable("bag_player"), str(bag), "--config", str(robot_yaml),
                                       "--wait-for-subscribers", "1", *player_args],
                                      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                      start_new_session=True)
        code = player.wait(timeout=90.0)
        time.sleep(0.5)   # the last ticks' messages are still on their way
        player_log = log_path.read_text()
        assert code == 0, player_log
        return list(listener.got), player_log, node.log()
    finally:
        if player is not None and player.poll() is None:
            player.kill()
            player.wait()
        node.stop()
        listener.close()


def test_live_on_sim_time_matches_offline_and_loops_reset(setup):
    cfg, root, bag, reference, robot_yaml = setup
    got, player_log, node_log = _run_live(cfg, root, bag, robot_yaml, ["--loop", "--max-loops", "2", "--rate", RATE])
    if _audio_kind_here() == "image_pcm":
        assert "image_pcm" in player_log                     # audio went out on the fallback, and said so
    else:   # audio_common_msgs is installed (the setup builds it): the bag's AudioDataStamped as recorded
        assert "not importable" not in player_log and "not importable" not in node_log, player_log + node_log
    passes = _passes(got)
    assert len(passes) == 2, f"expected two passes, stamps jumped back {len(passes) - 1} time(s)"
    assert "clock jumped back" in node_log                   # the runtime reset on the loop
    for i, live in enumerate(passes):
        common, worst = _deviation(live, reference)
        assert common >= MIN_COMMON_SHARE * len(reference), f"pass {i}: {common} of {len(reference)} ticks"
        assert worst <= TOLERANCE, (f"pass {i}: {TICK_SHARE:.0%} of ticks differ from offline by up to "
                                    f"{worst:.4f} (> {TOLERANCE})")
    # The second pass starts from a clean state: it tracks the first as closely as either tracks offline.
    common, worst = _deviation(passes[1], passes[0])
    assert common >= MIN_COMMON_SHARE * len(reference) and worst <= TOLERANCE


def test_player_refuses_a_clock_slower_than_the_control_loop(setup):
    cfg, root, bag, _reference, robot_yaml = setup
    result = subprocess.run([procs.executable("bag_player"), str(bag), "--config", str(robot_yaml),
                             "--clock-rate", "40"], env=procs.ros_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "--clock-rate 40 Hz is below the control rate 100 Hz" in result.stdout + result.stderr
