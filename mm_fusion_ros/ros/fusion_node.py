"""fusion_node: sensors in on ROS 2 topics, a 7-DOF action out at the control rate.

Thin by design: parameters come from ``params`` (config/robot.yaml), messages
become samples in ``convert``, and everything between (alignment, inference,
safety, cadence) is the ROS-free ``Runtime`` that bag replay and training share.

Threads. Inference must never stall message intake, so the node runs two
single-threaded executors on two threads instead of rclpy's
MultiThreadedExecutor (which hands every callback to whichever thread of a
Python pool is free, so intake and control queue for the GIL in no order; see
the README):

* intake (a small companion node, ``<name>_intake``): the sensor, e-stop and
  enable callbacks. They only convert and append to the runtime's buffers.
  Sensor topics are taken serialized and read by rosbags (``CdrDecoder``):
  numpy views on the CDR bytes instead of rclpy's copying message conversion.
* control (this node): the timer that ticks the runtime at ``control_rate_hz``
  on the node clock (``use_sim_time`` works) and publishes what it returns.

Both threads share the GIL, so the switch interval is lowered to 0.5 ms (a
waiting thread gets the GIL sooner), and with ``MM_FUSION_RT_PRIORITY`` set
both run SCHED_FIFO when the OS permits, as ros2_control's control loop does:
on a busy machine that is what keeps the tick on time (see the README).

A bad message is dropped, counted per cause (``runtime.count_bad``, visible in
/diagnostics) and logged once per cause, then at most every
``_BAD_LOG_PERIOD_S`` with the number suppressed. Nothing that reaches a
command or preview topic is non-finite.

At exit the node prints one ``mm_fusion_stats {json}`` line (messages received
per input, ticks, transport latency) and, when ``MM_FUSION_STATS_FILE`` is set,
writes the full statistics (every tick time and camera transport time) there
for the live benchmark.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable

import numpy as np
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from ..config import MODALITIES, RobotConfig
from ..files import write_json_atomic
from ..procs import print_stats
from ..samples import BadSample
from .params import audio_message_types, declare_config, node_main, spin_until_stopped
from .qos import latched_qos, sensor_qos

NODE_NAME = "fusion_node"
STATS_ENV = "MM_FUSION_STATS_FILE"
RT_PRIORITY_ENV = "MM_FUSION_RT_PRIORITY"   # SCHED_FIFO priority (1-99) for the node's threads; unset/0: normal
_BAD_LOG_PERIOD_S = 10.0
_SWITCH_INTERVAL_S = 0.0005
_RING = 1 << 17   # per-tick / per-message statistics kept: ~20 min of ticks at 100 Hz


class _Ring:
    """Last ``size`` floats, preallocated: recording one value costs no allocation.

    Once it has wrapped, ``values`` is no longer in time order; rings filled in step stay paired.
    """

    def __init__(self, size: int = _RING):
        self._data = np.zeros(size, np.float64)
        self.count = 0

    def add(self, value: float) -> None:
        self._data[self.count % len(self._data)] = value
        self.count += 1

    def values(self) -> np.ndarray:
        return self._data[:min(self.count, len(self._data))].copy()


def _percentiles_ms(values_s: np.ndarray) -> dict[str, float]:
    if len(values_s) == 0:
        return {"n": 0}
    ms = values_s * 1e3
    return {"n": int(len(ms)), "p50": round(float(np.median(ms)), 4), "p99": round(float(np.percentile(ms, 99)), 4),
            "max": round(float(ms.max()), 4)}


class _Throttle:
    """Log a cause the first time, then at most once per period, saying how many were not logged."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def check(self, key: str) -> int | None:
        """None: stay quiet; else the number of occurrences not logged since the last time."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period_s:
                self._suppressed[key] += 1
                return None
            self._last[key] = now
            return self._suppressed.pop(key, 0)


class CdrDecoder:
    """Serialized sensor_msgs messages -> message objects with the same fields, read by rosbags.

    rosbags reads the CDR bytes into numpy views: 50 us for a 640x480 rgb8 frame against 87 us for
    rclpy's deserialisation, 8 against 21 us for an Imu (measured on the development machine), and
    less intake time is less GIL taken from the control thread. convert.py is duck-typed for exactly
    this, since bag replay hands it rosbags messages too. Whatever rosbags cannot read falls back to
    rclpy's own deserialisation.
    """

    def __init__(self, msg_type: Any):
        from rclpy.serialization import serialize_message

        self.msg_type = msg_type
        self.typename = typename(msg_type)
        self(serialize_message(msg_type()))   # rosbags builds a type's reader on first use (~10 ms): now

    def __call__(self, data: bytes) -> Any:
        try:
            return _typestore().deserialize_cdr(data, self.typename)
        except Exception:
            from rclpy.serialization import deserialize_message
            return deserialize_message(data, self.msg_type)


def typename(msg_type: Any) -> str:
    """An rclpy message class -> its ROS type name, "sensor_msgs/msg/Image"."""
    return f"{msg_type.__module__.split('.')[0]}/msg/{msg_type.__name__}"


def _typestore() -> Any:
    from ..bag.typestore import make_typestore
    return make_typestore()   # the project's one store (pinned distribution, cached)


class FusionNode(Node):
    def __init__(self, *, engine=None, context=None, parameter_overrides=None, cli_args=None,
                 name: str = NODE_NAME):
        super().__init__(name, context=context, parameter_overrides=parameter_overrides, cli_args=cli_args)
        self.cfg: RobotConfig = declare_config(self, RobotConfig)
        from ..runtime import Runtime  # torch and the engine load here, after the config is known good

        self.runtime = Runtime(self.cfg, engine=engine, log=self.get_logger().info)
        self.received: Counter[str] = Counter()   # messages handed to a callback, per input
        self.accepted: Counter[str] = Counter()   # of those, taken by the aligner
        self.bad: Counter[str] = Counter()        # refused, per cause
        self.transport = {m: _Ring() for m in MODALITIES}   # node clock at receipt - capture stamp (s)
        self.tick_s = _Ring()                     # each tick, timer callback start to last publish (s)
        self.tick_t = _Ring()                     # ... and its tick time (node clock), to cut a window later
        self.unpublished: Counter[str] = Counter()   # ticks whose output was withheld (non-finite)
        self.faults: Counter[str] = Counter()        # our own failures: a tick or a publish that raised
        self._throttle = _Throttle(_BAD_LOG_PERIOD_S)
        self._last_commanded = self.cfg.safety.start_enabled
        self._next_report = 0.0
        self._next_log = time.monotonic() + self.cfg.outputs.log_period_s
        self._closed = False
        self.stopping = threading.Event()   # set by SIGINT/SIGTERM (node_main) or close()
        self._rt_warned = self._rt_logged = False

        self._intake = Node(f"{name}_intake", context=context, cli_args=cli_args,
                            start_parameter_services=False)
        self._make_subscriptions()
        self._make_publishers()
        self._timer = self.create_timer(1.0 / self.cfg.control_rate_hz, self._on_tick)
        self._executors: list[SingleThreadedExecutor] = []
        self._threads: list[threading.Thread] = []
        enabled = "ENABLED" if self.cfg.safety.start_enabled else "disabled (dry run on preview)"
        self.get_logger().info(
            f"ticking at {self.cfg.control_rate_hz:g} Hz, {enabled}; inputs: "
            + ", ".join(f"{m} {getattr(self.cfg.inputs, m).topic}" for m in MODALITIES))

    # ------------------------------------------------------------ wiring

    def _make_subscriptions(self) -> None:
        from sensor_msgs.msg import CompressedImage, Image, Imu, LaserScan, PointCloud2
        from std_msgs.msg import Bool
        from std_srvs.srv import SetBool

        from . import convert

        inputs, intake = self.cfg.inputs, self._intake
        _typestore()   # built now: building it in the first callback would stall intake for 0.3 s

        def subscribe(modality: str, msg_type: Any, section: Any) -> None:
            convert_fn = convert.sample_converter(modality, typename(msg_type), self.cfg, lambda: self._audio_info)
            raw = msg_type.__module__.split(".")[0] == "sensor_msgs"   # rosbags reads these without copies
            if raw:
                decode = CdrDecoder(msg_type)
                callback = lambda data: self._receive(modality, data, lambda d: convert_fn(decode(d)))  # noqa: E731
            else:
                callback = lambda msg: self._receive(modality, msg, convert_fn)  # noqa: E731
            intake.create_subscription(msg_type, section.topic, callback, sensor_qos(section.qos, section.depth),
                                       raw=raw)

        subscribe("camera", CompressedImage if inputs.camera.type == "compressed_image" else Image, inputs.camera)
        subscribe("lidar", PointCloud2 if inputs.lidar.type == "point_cloud2" else LaserScan, inputs.lidar)
        subscribe("imu", Imu, inputs.imu)

        audio = inputs.audio
        kind, msg_type, info_type = audio_message_types(audio.type)
        if kind != audio.type:
            self.get_logger().error(
                f"inputs.audio.type={audio.type}: audio_common_msgs is not importable here; falling back to "
                f"image_pcm (sensor_msgs/Image, one row of PCM at inputs.audio.source_rate={audio.source_rate} Hz) "
                f"on {audio.topic}")
        self.audio_type = kind
        self._audio_info = None
        subscribe("audio", msg_type, audio)
        if kind == "audio_data_stamped":   # its format comes on the AudioInfo topic
            intake.create_subscription(info_type, audio.info_topic, self._on_audio_info, latched_qos())

        out = self.cfg.outputs
        intake.create_subscription(Bool, out.estop_topic, self._on_estop, 10)
        intake.create_service(SetBool, out.enable_service, self._on_enable)

    def _make_publishers(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import TwistStamped
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Float32MultiArray, Float64, Float64MultiArray

        out = self.cfg.outputs
        self._pub_action = self.create_publisher(Float64MultiArray, out.action_topic, 10)
        self._pub_joint = self.create_publisher(JointState, out.joint_command_topic, 10)
        self._pub_fused = self.create_publisher(Float32MultiArray, out.fused_state_topic, 10)
        self._pub_preview = self.create_publisher(Float64MultiArray, out.preview_topic, 10)
        self._pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._pub_twist = self._pub_gripper = None
        if out.twist_enabled:
            self._pub_twist = self.create_publisher(TwistStamped, out.twist_topic, 10)
            self._pub_gripper = self.create_publisher(Float64, out.gripper_topic, 10)

    # ------------------------------------------------------------ intake thread

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _receive(self, modality: str, msg: Any, convert_fn: Callable[[Any], Any]) -> None:
        now = self._now_s()
        self.received[modality] += 1
        try:
            sample = convert_fn(msg)
        except BadSample as exc:
            self._refuse(exc.cause, str(exc))
            return
        except Exception as exc:  # a converter bug must cost one message, never the intake thread
            self._refuse(f"{modality}.convert_error", f"{type(exc).__name__}: {exc}")
            return
        self.transport[modality].add(now - sample.stamp)
        try:
            if self.runtime.add(sample, now):
                self.accepted[modality] += 1
        except Exception as exc:  # likewise for the aligner: one message lost, intake goes on
            self._refuse(f"{modality}.add_error", f"{type(exc).__name__}: {exc}")

    def _refuse(self, cause: str, detail: str) -> None:
        self.bad[cause] += 1
        self.runtime.count_bad(cause)
        self._log_throttled(cause, f"dropped a message: {detail}")

    def _fault(self, key: str, detail: str) -> None:
        """A failure of our own (not the input's): counted in the statistics, logged throttled."""
        self.faults[key] += 1
        self._log_throttled(key, detail, error=True)

    def _log_throttled(self, key: str, text: str, error: bool = False) -> None:
        suppressed = self._throttle.check(key)
        if suppressed is not None:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            (self.get_logger().error if error else self.get_logger().warning)(f"{text}{more}")

    def _on_audio_info(self, msg: Any) -> None:
        from . import convert
        try:
            self._audio_info = convert.audio_format_from_info(msg)
        except BadSample as exc:
            self._refuse(exc.cause, f"AudioInfo on {self.cfg.inputs.audio.info_topic}: {exc}")

    def _on_estop(self, msg: Any) -> None:
        self.runtime.estop(bool(msg.data))   # the runtime logs changes

    def _on_enable(self, request: Any, response: Any) -> Any:
        ok, message = self.runtime.set_enabled(bool(request.data))
        response.success, response.message = bool(ok), str(message)
        return response

    # ------------------------------------------------------------ control thread

    def _on_tick(self) -> None:
        wall_start = time.perf_counter()
        t = self._now_s()
        try:
            result = self.runtime.tick(t)
        except Exception as exc:  # keep ticking; the arm gets rest, never a stale command
            self._fault("tick_failed", f"control tick at t={t:.3f} failed: {type(exc).__name__}: {exc}")
            try:
                self._publish_rest(t)
            except Exception as exc2:
                self._fault("publish_failed", f"publishing rest at t={t:.3f} failed: {exc2}")
            return
        publish_start = time.perf_counter()
        try:
            self._publish(result, t)
        except Exception as exc:  # a failed publish must not stop the control loop
            self._fault("publish_failed", f"publishing tick t={t:.3f} failed: {type(exc).__name__}: {exc}")
        now = time.perf_counter()
        self.runtime.record(result, now - publish_start, wall_start)
        self.tick_s.add(now - wall_start)
        self.tick_t.add(t)
        if now >= self._next_log:
            self._next_log = now + self.cfg.outputs.log_period_s
            self.get_logger().info(self.runtime.log_line())

    def _publish(self, result: Any, t: float) -> None:
        from . import convert

        safety = result.safety
        command = np.asarray(safety.command, dtype=np.float64)
        self._last_commanded = bool(safety.commanded)
        if not np.isfinite(command).all():  # the safety filter should make this impossible; never trust it blindly
            self.unpublished["nonfinite_command"] += 1
            self._publish_rest(t)
        elif safety.commanded:
            self._publish_command(command, t)
        else:
            self._pub_preview.publish(convert.action_msg(command))
        fused = np.asarray(result.fused_state, dtype=np.float32)
        if np.isfinite(fused).all():
            self._pub_fused.publish(convert.fused_state_msg(fused))
        else:
            self.unpublished["nonfinite_fused_state"] += 1
        statuses = [self.runtime.tick_status(result)]
        wall = time.monotonic()
        if wall >= self._next_report:
            self._next_report = wall + self.cfg.outputs.diagnostics_period_s
            statuses += self.runtime.report()
        self._pub_diag.publish(self._diagnostics(statuses, t))

    def _publish_command(self, command: np.ndarray, t: float) -> None:
        from std_msgs.msg import Float64

        from . import convert

        self._pub_action.publish(convert.action_msg(command))
        self._pub_joint.publish(convert.joint_state_msg(self.cfg.model.action.names, command, t))
        if self._pub_twist is not None:
            self._pub_twist.publish(convert.twist_msg(command[:6], t, self.cfg.outputs.twist_frame_id))
            self._pub_gripper.publish(Float64(data=float(command[6])))

    def _publish_rest(self, t: float) -> None:
        from . import convert

        action = self.cfg.model.action
        rest = np.clip(np.zeros(action.dof), action.lower, action.upper)
        if self._last_commanded:
            self._publish_command(rest, t)
        else:
            self._pub_preview.publish(convert.action_msg(rest))

    def _diagnostics(self, statuses: list[Any], t: float) -> Any:
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

        from .convert import s_to_stamp_fields

        msg = DiagnosticArray()
        msg.header.stamp.sec, msg.header.stamp.nanosec = s_to_stamp_fields(t)
        for status in statuses:
            msg.status.append(DiagnosticStatus(
                level=bytes([int(status.level)]), name=status.name, message=status.message,
                hardware_id=self.get_name(),
                values=[KeyValue(key=str(k), value=str(v)) for k, v in status.values.items()]))
        return msg

    # ------------------------------------------------------------ running

    def _start_executor(self, node: Node, thread_name: str, background: bool) -> SingleThreadedExecutor:
        executor = SingleThreadedExecutor(context=self.context)
        executor.add_node(node)
        self._executors.append(executor)
        if background:
            thread = threading.Thread(target=self._spin_quietly, args=(executor,), name=thread_name, daemon=True)
            self._threads.append(thread)
            thread.start()
        return executor

    def _spin_quietly(self, executor: SingleThreadedExecutor) -> None:
        self._realtime()
        spin_until_stopped(executor, self.stopping)

    def _realtime(self) -> None:
        """SCHED_FIFO for the calling thread when MM_FUSION_RT_PRIORITY asks for it and the OS allows it.

        On a busy machine the control thread otherwise waits behind other processes for a core; both
        threads get the same priority, or a preempted intake thread holding the GIL would stall control.
        """
        value = os.environ.get(RT_PRIORITY_ENV, "").strip()
        if not value or value == "0":
            return
        try:
            priority = int(value)
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        except (ValueError, OSError, AttributeError) as exc:
            if not self._rt_warned:
                self._rt_warned = True
                self.get_logger().warning(
                    f"{RT_PRIORITY_ENV}={value}: cannot use real-time scheduling ({exc}); running with normal "
                    f"scheduling (needs CAP_SYS_NICE or an rtprio limit, e.g. in /etc/security/limits.conf)")
            return
        if not self._rt_logged:
            self._rt_logged = True
            self.get_logger().info(f"control and intake threads run SCHED_FIFO priority {priority}")

    def spin(self) -> None:
        """Intake on a background thread, control on this one, until shutdown."""
        # Python hands the GIL to a waiting thread only every switch interval (5 ms by default): the
        # control thread would wait that long behind a sensor callback. 0.5 ms bounds the wait.
        sys.setswitchinterval(_SWITCH_INTERVAL_S)
        self._start_executor(self._intake, "fusion-intake", background=True)
        self._realtime()
        spin_until_stopped(self._start_executor(self, "fusion-control", background=False), self.stopping)

    def spin_in_background(self) -> None:
        """Both executors on background threads (in-process tests)."""
        self._start_executor(self._intake, "fusion-intake", background=True)
        self._start_executor(self, "fusion-control", background=True)

    def stats(self, full: bool = False) -> dict:
        ticks = self.tick_s.values()
        out = {
            "node": self.get_name(), "ticks": int(self.tick_s.count),
            "received": dict(self.received), "accepted": dict(self.accepted), "bad": dict(self.bad),
            "unpublished": dict(self.unpublished), "faults": dict(self.faults),
            "tick_ms": _percentiles_ms(ticks),
            "over_budget": int((ticks > 1.0 / self.cfg.control_rate_hz).sum()),
            "transport_ms": {m: _percentiles_ms(r.values()) for m, r in self.transport.items()},
        }
        if full:
            out["tick_s"] = ticks.tolist()
            out["tick_t"] = self.tick_t.values().tolist()
            out["camera_transport_s"] = self.transport["camera"].values().tolist()
            try:
                out["summary"] = self.runtime.summary()
            except Exception as exc:  # statistics must not turn a clean exit into a crash
                out["summary_error"] = f"{type(exc).__name__}: {exc}"
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=2.0)
        for executor in self._executors:
            executor.shutdown(timeout_sec=1.0)
        print_stats(self.stats())
        path = os.environ.get(STATS_ENV)
        if path:
            write_json_atomic(path, self.stats(full=True), indent=None)
        self.runtime.engine.close()
        self._intake.destroy_node()
        self.destroy_node()


def main(args: list[str] | None = None) -> int:
    return node_main(NODE_NAME, FusionNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
