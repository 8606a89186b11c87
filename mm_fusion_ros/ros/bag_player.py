"""bag_player: a bag's topics over ROS 2 at their recorded timing, with /clock for sim time.

``bag_player BAG [--rate R] [--loop [--max-loops N]] [--start-offset S] [--clock-rate HZ]
[--config C] [--wait-for-subscribers N] [--ros-args ...]``

For ``fusion_node`` with ``use_sim_time:=true`` this is the live twin of
``mm-fusion replay``: the node ticks on the bag's clock and sees the messages
at the bag's receive times, so its actions match offline replay's (see
test/test_bag_player.py for the tolerance and why it is not zero).

Timing. ``/clock`` (rosgraph_msgs/Clock) advances in steps of ``1/clock-rate``
seconds of bag time (default 200 Hz, at least the control rate: rosbag2's
default of 40 Hz would step sim time every 25 ms and starve a 100 Hz loop).
Clock values lie on the control-period grid, so the node's sim-time timer
fires at the same tick times as offline replay; before each clock step the
player publishes every message received up to it, then gives the node
``settle`` seconds to take them in. Messages go out at their receive time
scaled by ``--rate``; the clock keeps the same bag-time steps at any rate.

Start and loop. Playback opens with the clock one control period before the
bag's start grid point, then at that point, each held for a control period of
wall time before any message: a node that was started earlier ticks once on
an empty buffer there; on a loop this clock jump backwards makes the node
reset its buffers, recurrent state and rate limiter (``Runtime``) before the
replayed data arrives, so every pass gives the same actions.

Types. Messages are published as the bag's raw CDR bytes wherever rclpy has
the type. audio_common_msgs is usually not installed next to the ROS 2 wheels;
then audio (AudioDataStamped, AudioStamped) goes out as fusion_node's image_pcm
fallback (sensor_msgs/Image, one row of PCM, ``header.stamp`` = the first
sample's capture time), which is logged; AudioInfo is then not published (the
rate of image_pcm comes from ``inputs.audio.source_rate``). Topics of other
unavailable types are skipped and named.

With ROS 2 installed, ``ros2 bag play BAG --clock 200`` does the same job
(see the README for the difference on loops).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..bag.reader import BagError, BagMessage, BagReader, DecodeError
from ..bag.typestore import DISTROS, distro_of
from ..config import ConfigError, RobotConfig, load_config

NODE_NAME = "bag_player"
DEFAULT_CONFIG = "config/robot.yaml"
AUDIO_TYPES = ("audio_common_msgs/msg/AudioDataStamped", "audio_common_msgs/msg/AudioStamped")
AUDIO_INFO_TYPE = "audio_common_msgs/msg/AudioInfo"
# ros-drivers' AudioInfo.sample_format -> image_pcm encoding prefix (see convert.audio_from_image_pcm)
_PCM_ENCODINGS = {"S16LE": "16SC", "S32LE": "32SC", "F32LE": "32FC", "U8": "8UC"}
# mgonzs13's AudioData field -> image_pcm encoding prefix
_PA_FIELDS = {"int16_data": "16SC", "int32_data": "32SC", "float32_data": "32FC", "uint8_data": "8UC"}


class PlayerError(ValueError):
    """Options or a bag the player cannot honour."""


@dataclass(frozen=True)
class PlayerOptions:
    rate: float = 1.0                  # playback speed (x real time)
    loop: bool = False
    max_loops: int = 0                 # with loop: stop after this many passes (0: forever)
    start_offset_s: float = 0.0        # skip this much of the bag's start
    clock_hz: float = 200.0            # /clock steps per second of bag time
    settle_s: float = 0.001            # wall time between the last message before a clock step and the step
    topics: tuple[str, ...] = ()       # () = every topic of a known type
    wait_for_subscribers: int = 0      # wait until every sensor topic has this many subscribers
    wait_timeout_s: float = 30.0
    depth: int = 100

    def validate(self, control_hz: float) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise PlayerError(f"--rate must be a positive number, got {self.rate}")
        if self.start_offset_s < 0:
            raise PlayerError(f"--start-offset must be >= 0 s, got {self.start_offset_s}")
        if not self.clock_hz >= control_hz:
            raise PlayerError(f"--clock-rate {self.clock_hz:g} Hz is below the control rate {control_hz:g} Hz: "
                              "sim time would step slower than the control loop ticks")
        if self.max_loops < 0:
            raise PlayerError(f"--max-loops must be >= 0, got {self.max_loops}")


@dataclass
class _Route:
    topic: str
    publisher: Any
    convert: Callable[[BagMessage], Any] | None   # None: publish the raw CDR bytes


def ros_message_class(msgtype: str) -> Any | None:
    """The rclpy class for ``pkg/msg/Name``, or None when that package is not importable here."""
    pkg, _, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.msg"), name)
    except (ImportError, AttributeError):
        return None


class BagPlayer:
    """Publishes ``reader``'s messages on ``node``; ``play()`` returns when done (or loops)."""

    def __init__(self, node: Any, reader: BagReader, opts: PlayerOptions, cfg: RobotConfig):
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from rosgraph_msgs.msg import Clock

        self.node, self.reader, self.opts, self.cfg = node, reader, opts, cfg
        self.log = node.get_logger()
        self.period_ns = int(round(1e9 / cfg.control_rate_hz))
        self.step_ns = int(round(1e9 / opts.clock_hz))
        if self.period_ns % self.step_ns:
            self.log.warning(f"--clock-rate {opts.clock_hz:g} Hz does not divide the control period "
                             f"({1e3 / cfg.control_rate_hz:g} ms): ticks will land between clock steps")
        self._qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=opts.depth,
                               reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
        self._latched = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                   durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._clock_cls = Clock
        self.clock_pub = node.create_publisher(Clock, "/clock", QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE))
        self.routes: dict[str, _Route] = {}
        self._audio_info = None
        self._rate_warned = False
        self.published: Counter[str] = Counter()
        self.clock_steps = 0
        self.loops = 0
        self._make_routes()

    # ------------------------------------------------------------ topics

    def _make_routes(self) -> None:
        wanted = set(self.opts.topics) or set(self.reader.topics)
        missing = sorted(set(self.opts.topics) - set(self.reader.topics))
        if missing:
            raise PlayerError(f"topic(s) {', '.join(missing)} not in the bag; it holds {sorted(self.reader.topics)}")
        for topic, info in sorted(self.reader.topics.items()):
            if topic not in wanted or topic in self.reader.unknown_types:
                continue
            cls = ros_message_class(info.msgtype)
            if cls is not None:
                # AudioInfo is state, sent rarely: latched, as fusion_node subscribes to it (a volatile
                # publisher would not match that transient-local subscription).
                qos = self._latched if info.msgtype == AUDIO_INFO_TYPE else self._qos
                self.routes[topic] = _Route(topic, self.node.create_publisher(cls, topic, qos), None)
            elif info.msgtype in AUDIO_TYPES:
                from sensor_msgs.msg import Image
                self.routes[topic] = _Route(topic, self.node.create_publisher(Image, topic, self._qos),
                                            self._audio_as_image)
                self.log.info(f"{topic}: {info.msgtype} is not importable here; publishing it as sensor_msgs/Image "
                              f"one-row PCM (fusion_node's image_pcm fallback, rate from inputs.audio.source_rate="
                              f"{self.cfg.inputs.audio.source_rate} Hz)")
            elif info.msgtype == AUDIO_INFO_TYPE:
                self.routes[topic] = _Route(topic, None, self._remember_info)
                self.log.info(f"{topic}: AudioInfo is not importable here; read for the audio format only")
            else:
                self.log.warning(f"{topic}: {info.msgtype} is not importable here; skipping its {info.count} "
                                 "message(s)")
        if not any(r.publisher for r in self.routes.values()):
            raise PlayerError(f"nothing to publish from {self.reader.path}")

    def _remember_info(self, msg: BagMessage) -> None:
        self._audio_info = self.reader.decode(msg)
        return None

    def _audio_as_image(self, msg: BagMessage) -> Any:
        from sensor_msgs.msg import Image

        audio = self.reader.decode(msg)
        source_rate = self.cfg.inputs.audio.source_rate
        if msg.msgtype.endswith("/AudioDataStamped"):
            info = self._audio_info
            fmt = str(info.sample_format).upper() if info is not None else self.cfg.inputs.audio.source_format
            channels = int(info.channels) if info is not None else 1
            rate = int(info.sample_rate) if info is not None else source_rate
            prefix = _PCM_ENCODINGS.get(fmt)
            if prefix is None:
                raise DecodeError(f"{msg.topic}: sample_format {fmt} has no image_pcm encoding")
            data = np.asarray(audio.audio.data, np.uint8).tobytes()
        else:  # mgonzs13 AudioStamped: the filled array is the one named by info.format
            info = audio.audio.info
            channels, rate = int(info.channels), int(info.rate)
            arrays = audio.audio.audio_data
            field = next((f for f in _PA_FIELDS if len(getattr(arrays, f))), None)
            if field is None:
                raise DecodeError(f"{msg.topic}: AudioStamped without int16/int32/float32/uint8 samples")
            prefix = _PA_FIELDS[field]
            data = np.ascontiguousarray(getattr(arrays, field)).astype(
                np.asarray(getattr(arrays, field)).dtype.newbyteorder("<"), copy=False).tobytes()
        if rate != source_rate and not self._rate_warned:
            self._rate_warned = True
            self.log.warning(f"{msg.topic}: the bag's audio is {rate} Hz but inputs.audio.source_rate is "
                             f"{source_rate} Hz; image_pcm carries no rate, so the receiver assumes {source_rate}")
        bytes_per = {"16SC": 2, "32SC": 4, "32FC": 4, "8UC": 1}[prefix]
        image = Image()
        image.header.stamp.sec = int(audio.header.stamp.sec)
        image.header.stamp.nanosec = int(audio.header.stamp.nanosec)
        image.header.frame_id = str(audio.header.frame_id)
        image.height = 1
        image.width = len(data) // (bytes_per * max(channels, 1))
        image.encoding = f"{prefix}{channels}"
        image.is_bigendian = 0
        image.step = len(data)
        image.data = data
        return image

    # ------------------------------------------------------------ timing

    def wait_for_subscribers(self) -> bool:
        n = self.opts.wait_for_subscribers
        if n <= 0:
            return True
        publishers = [r.publisher for r in self.routes.values() if r.publisher is not None]
        deadline = time.monotonic() + self.opts.wait_timeout_s
        while time.monotonic() < deadline:
            if all(p.get_subscription_count() >= n for p in publishers):
                time.sleep(0.2)   # the subscribers' side of discovery completes a moment later
                return True
            time.sleep(0.05)
        waiting = [r.topic for r in self.routes.values()
                   if r.publisher is not None and r.publisher.get_subscription_count() < n]
        self.log.error(f"gave up after {self.opts.wait_timeout_s:g} s waiting for {n} subscriber(s) on "
                       f"{', '.join(waiting)}")
        return False

    def _publish_clock(self, t_ns: int) -> None:
        msg = self._clock_cls()
        msg.clock.sec, msg.clock.nanosec = t_ns // 1_000_000_000, t_ns % 1_000_000_000
        self.clock_pub.publish(msg)
        self.clock_steps += 1

    def play(self, running: Callable[[], bool] = lambda: True) -> None:
        first_ns = self.reader.start_ns + int(round(self.opts.start_offset_s * 1e9))
        if first_ns > self.reader.end_ns:
            raise PlayerError(f"--start-offset {self.opts.start_offset_s:g} s is past the bag's end "
                              f"({self.reader.duration_s:.3f} s)")
        # The grid point at or before the first message: the clock, and the ticks, sit on the control grid.
        grid_ns = first_ns // self.period_ns * self.period_ns
        while running():
            self._play_once(first_ns, grid_ns, running)
            self.loops += 1
            if not self.opts.loop or (self.opts.max_loops and self.loops >= self.opts.max_loops):
                break
            self.log.info(f"loop {self.loops} done; the clock jumps back to {grid_ns / 1e9:.3f} s")

    def _play_once(self, first_ns: int, grid_ns: int, running: Callable[[], bool]) -> None:
        rate, period_wall = self.opts.rate, self.period_ns / 1e9 / self.opts.rate
        # Prelude: one period before the grid point, then the grid point, a period of wall time each.
        self._publish_clock(grid_ns - self.period_ns)
        time.sleep(period_wall)
        self._publish_clock(grid_ns)
        time.sleep(period_wall)
        wall0 = time.monotonic()

        def wall_of(t_ns: int) -> float:
            return wall0 + (t_ns - grid_ns) / 1e9 / rate

        def sleep_until(when: float) -> None:
            delay = when - time.monotonic()
            if delay > 0:
                time.sleep(delay)

        next_clock = grid_ns + self.step_ns
        last_publish = -math.inf
        end_ns = self.reader.end_ns
        for msg in self.reader.messages(topics=list(self.routes), start_ns=first_ns):
            if not running():
                return
            while next_clock <= msg.t_ns:
                sleep_until(max(wall_of(next_clock), last_publish + self.opts.settle_s))
                self._publish_clock(next_clock)
                next_clock += self.step_ns
            sleep_until(wall_of(msg.t_ns))
            route = self.routes[msg.topic]
            try:
                out = msg.data if route.convert is None else route.convert(msg)
            except DecodeError as exc:
                self.log.warning(f"skipping a message: {exc}")
                continue
            if out is None or route.publisher is None:
                continue
            route.publisher.publish(out)
            self.published[msg.topic] += 1
            last_publish = time.monotonic()
        # Run the clock on to the grid point after the last message, so the last tick happens too.
        last_tick = -(-end_ns // self.period_ns) * self.period_ns
        while next_clock <= last_tick + self.step_ns and running():
            sleep_until(max(wall_of(next_clock), last_publish + self.opts.settle_s))
            self._publish_clock(next_clock)
            next_clock += self.step_ns


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=NODE_NAME, description="Publish a bag's topics at recorded timing with /clock.")
    p.add_argument("bag", help="rosbag2 folder, or a .mcap / .db3 file")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed, x real time (default: %(default)s)")
    p.add_argument("--loop", action="store_true", help="start again at the end (the clock jumps back)")
    p.add_argument("--max-loops", type=int, default=0, help="with --loop: stop after N passes (0: never)")
    p.add_argument("--start-offset", type=float, default=0.0, help="seconds of the bag to skip")
    p.add_argument("--clock-rate", type=float, default=200.0,
                   help="/clock steps per second of bag time, at least the control rate (default: %(default)s)")
    p.add_argument("--config", help=f"parameters file for the control rate and audio format "
                                    f"(default: {DEFAULT_CONFIG} if present)")
    p.add_argument("--topics", nargs="+", default=[], help="only these topics")
    p.add_argument("--wait-for-subscribers", type=int, default=0,
                   help="wait until every topic has N subscribers before playing")
    p.add_argument("--ros-distro", choices=sorted(DISTROS), help="message definitions (default: the config's)")
    return p


def _config(path: str | None) -> RobotConfig:
    if path:
        return load_config(path)
    return load_config(DEFAULT_CONFIG) if Path(DEFAULT_CONFIG).is_file() else RobotConfig()


def main(argv: list[str] | None = None) -> int:
    import rclpy
    import rclpy.logging
    from rclpy.utilities import remove_ros_args

    argv = sys.argv if argv is None else argv
    args = build_parser().parse_args(remove_ros_args(argv)[1:])
    logger = rclpy.logging.get_logger(NODE_NAME)
    try:
        cfg = _config(args.config)
        opts = PlayerOptions(rate=args.rate, loop=args.loop, max_loops=args.max_loops,
                             start_offset_s=args.start_offset, clock_hz=args.clock_rate, topics=tuple(args.topics),
                             wait_for_subscribers=args.wait_for_subscribers)
        opts.validate(cfg.control_rate_hz)
        reader = BagReader(args.bag, distro=args.ros_distro or distro_of(cfg), log=logger.warning)
    except (ConfigError, PlayerError, BagError) as exc:
        logger.fatal(str(exc))
        return 2
    node = None
    try:
        rclpy.init(args=argv)
        node = rclpy.create_node(NODE_NAME)
        player = BagPlayer(node, reader, opts, cfg)
        if not player.wait_for_subscribers():
            return 1
        node.get_logger().info(f"playing {args.bag} ({reader.duration_s:.2f} s) at {opts.rate:g}x, /clock at "
                               f"{opts.clock_hz:g} Hz" + (", looping" if opts.loop else ""))
        player.play(running=rclpy.ok)
        node.get_logger().info(f"done: {sum(player.published.values())} messages, {player.clock_steps} clock steps, "
                               f"{player.loops} pass(es)")
        return 0
    except PlayerError as exc:
        logger.fatal(str(exc))
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        reader.close()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
