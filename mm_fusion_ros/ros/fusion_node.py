"""fusion_node: sensors in on ROS 2 topics, a 7-DOF action out at the control rate; a managed (lifecycle) node.

Thin by design: parameters come from ``params`` (config/robot.yaml), messages
become samples in ``convert``, and everything between (alignment, inference,
safety, cadence) is the ROS-free ``Runtime`` that bag replay and training share.

Lifecycle, as Nav2 and ros2_control nodes:

* unconfigured -> ``configure``: the parameters are read and validated, the checkpoint is loaded and the
  engine built (ONNX export, TensorRT plan: never on a tick), subscriptions and publishers are created.
  A failure (checkpoint missing, engine build failure) is logged, shown on /diagnostics, and leaves the
  node unconfigured with everything it had created released: never half configured.
* ``activate``: ticking and publishing start. The enable service still decides between commanding the arm
  and the dry run (preview topic): a node can be active and still in dry run.
* ``deactivate``: one rest command (zero velocity, within the limits), then silence; the runtime's state is
  kept. ``cleanup`` / ``shutdown`` release everything.
* ``autostart`` (true in config/robot.yaml) runs configure and activate at start, so that a plain
  ``ros2 run`` or ``fusion_node --ros-args --params-file config/robot.yaml`` ticks.

Names: every topic is relative (``mm_fusion/action``, ``imu/data``) or private (``~/tick``), so remapping
and a launch namespace move them all; two arms in one graph are two namespaces. /diagnostics stays global,
as the diagnostic aggregator expects it.

QoS: sensor subscriptions are best effort (the sensor-data profile): a best-effort subscription matches
reliable and best-effort publishers alike, and most LiDAR, IMU and camera drivers publish best effort.
The standard ``qos_overrides./<topic>.subscription.<policy>`` parameters change them. Commands, e-stop and
the enable service stay reliable.

Threads. Inference must never stall message intake: one node, two threads. The executor thread runs the
sensor, e-stop, enable, parameter and lifecycle callbacks and the 1 Hz diagnostics; sensor callbacks only
convert and append to the runtime's buffers, read by rosbags from the serialized CDR (``CdrDecoder``).
A dedicated control thread ticks the runtime at ``control_rate_hz`` on the node clock (``clock.sleep_until``:
``use_sim_time`` works; with sim time nothing is ticked or accepted before the first /clock) and publishes
what it returns. Both threads share the GIL, so the switch interval is lowered to 0.5 ms, and with
``MM_FUSION_RT_PRIORITY`` set both run SCHED_FIFO when the OS permits, as ros2_control's control loop does.

Diagnostics: /diagnostics at ``outputs.diagnostics_period_s`` (1 Hz, the diagnostic_updater convention) with
the node's state, the last transition error, inputs, cadence and safety; each tick's own status goes to
``~/tick`` (DiagnosticArray), 100 times a second.

Parameters are declared with types, descriptions (the YAML's comments), ranges and read_only; the safety
parameters can be changed at run time, validated by ``_on_set_parameters`` (while the arm is commanded only
tightening, or the change is refused with the reason).

A bad message is dropped, counted per cause (``runtime.count_bad``, visible in /diagnostics) and logged once
per cause, then at most every ``_BAD_LOG_PERIOD_S`` with the number suppressed. Nothing that reaches a
command or preview topic is non-finite. A failed tick commands rest through the safety filter (so the next
good tick ramps from rest) and reports the failure on ``~/tick``.

At exit the node prints one ``mm_fusion_stats {json}`` line (messages received per input, ticks, transport
latency) and, when ``MM_FUSION_STATS_FILE`` is set, writes the full statistics there for the live benchmark.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.time import Time

from ..config import MODALITIES, ConfigError, RobotConfig
from ..files import write_json_atomic
from ..procs import print_stats
from ..samples import BadSample
from .params import audio_message_types, build_config, declare_config, node_main, spin_until_stopped
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


# Parameters that may change while the node runs (everything else needs a restart: read_only).
SAFETY_WRITABLE = ("safety.lower", "safety.upper", "safety.max_acceleration", "safety.on_stale",
                   "safety.hold_timeout_s")
# ROS parameter ranges (FloatingPointRange / IntegerRange): what `ros2 param describe` shows and `ros2 param set`
# enforces; the config layer checks the same bounds, and more, at load.
PARAMETER_RANGES = {
    "control_rate_hz": (0.1, 2000.0), "seed": (0, 2**31 - 1),
    "engine.intra_op_threads": (0, 256),
    "inputs.buffer_s": (0.01, 600.0), "inputs.max_future_s": (0.001, 60.0), "inputs.camera_cache": (1, 64),
    **{f"inputs.{m}.max_age": (1e-4, 60.0) for m in MODALITIES},
    **{f"inputs.{m}.depth": (1, 10000) for m in MODALITIES},
    "safety.hold_timeout_s": (1e-3, 600.0),
    "outputs.diagnostics_period_s": (0.05, 60.0), "outputs.log_period_s": (0.1, 3600.0),
}
_TICK_TOPIC = "~/tick"
_DIAGNOSTICS_TOPIC = "/diagnostics"


class FusionNode(LifecycleNode):
    def __init__(self, *, engine=None, context=None, parameter_overrides=None, cli_args=None,
                 name: str = NODE_NAME, namespace: str | None = None):
        super().__init__(name, namespace=namespace, context=context, parameter_overrides=parameter_overrides,
                         cli_args=cli_args, automatically_declare_parameters_from_overrides=True)
        # Unknown names and impossible values are refused here (ConfigError: exit 2, naming the key);
        # configure reads the (then read-only) values again and builds everything else.
        self.cfg: RobotConfig = declare_config(self, RobotConfig, writable=SAFETY_WRITABLE, ranges=PARAMETER_RANGES)
        self._engine_arg = engine
        self.runtime = None
        self.received: Counter[str] = Counter()   # messages handed to a callback, per input
        self.accepted: Counter[str] = Counter()   # of those, taken by the aligner
        self.bad: Counter[str] = Counter()        # refused, per cause
        self.waiting_for_clock = 0                # messages before the first /clock (use_sim_time): not bad input
        self.transport = {m: _Ring() for m in MODALITIES}   # node clock at receipt - capture stamp (s)
        self.tick_s = _Ring()                     # each tick, start to last publish (s)
        self.tick_t = _Ring()                     # ... and its tick time (node clock), to cut a window later
        self.unpublished: Counter[str] = Counter()   # ticks whose output was withheld (non-finite)
        self.faults: Counter[str] = Counter()        # our own failures: a tick or a publish that raised
        self.transitions: list[tuple[str, str]] = []   # (transition, result), for diagnostics and tests
        self.last_error = ""
        self._throttle = _Throttle(_BAD_LOG_PERIOD_S)
        self._last_commanded = self.cfg.safety.start_enabled
        self._next_log = time.monotonic() + self.cfg.outputs.log_period_s
        self._closed = False
        self._active = False
        self._tick_lock = threading.RLock()       # a tick and a transition never overlap
        self._made_subscriptions: list[Any] = []
        self._made_services: list[Any] = []
        self._made_publishers: list[Any] = []
        self._audio_info = None
        self.stopping = threading.Event()   # set by SIGINT/SIGTERM (node_main) or close()
        self._rt_warned = self._rt_logged = False
        self._intake_group = MutuallyExclusiveCallbackGroup()
        self._executor: SingleThreadedExecutor | None = None
        self._threads: list[threading.Thread] = []
        from diagnostic_msgs.msg import DiagnosticArray
        # Not a lifecycle publisher: /diagnostics reports in every state, a failed configure included.
        self._pub_diag = self.create_publisher(DiagnosticArray, _DIAGNOSTICS_TOPIC, 10)
        self._diag_timer = self.create_timer(self.cfg.outputs.diagnostics_period_s, self._publish_diagnostics)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        if self.cfg.autostart:
            if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                self.trigger_activate()

    # ------------------------------------------------------------ lifecycle

    @property
    def state(self) -> str:
        return self._state_machine.current_state[1]

    def _transition(self, name: str, ok: bool, error: str = "") -> TransitionCallbackReturn:
        self.transitions.append((name, "success" if ok else "failure"))
        if not ok:
            self.last_error = f"{name} failed: {error}"
            self.get_logger().error(self.last_error)
            self._publish_diagnostics()
        return TransitionCallbackReturn.SUCCESS if ok else TransitionCallbackReturn.FAILURE

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            values = {name: self.get_parameter(name).value for name in self._declared_config_names()}
            cfg = build_config(RobotConfig, values)
            from ..runtime import Runtime  # torch and the engine load here, after the config is known good
            runtime = Runtime(cfg, engine=self._engine_arg, log=self.get_logger().info)
        except Exception as exc:  # ConfigError, a missing checkpoint, an engine that does not build
            self._release()
            return self._transition("configure", False, f"{type(exc).__name__}: {exc}")
        self.cfg, self.runtime = cfg, runtime
        try:
            self._make_subscriptions()
            self._make_publishers()
        except Exception as exc:
            self._release()
            return self._transition("configure", False, f"{type(exc).__name__}: {exc}")
        self.last_error = ""
        enabled = "ENABLED" if cfg.safety.start_enabled else "disabled (dry run on preview)"
        self.get_logger().info(
            f"configured: {cfg.control_rate_hz:g} Hz, {enabled}; inputs: "
            + ", ".join(f"{m} {self.resolve_topic_name(getattr(cfg.inputs, m).topic)}" for m in MODALITIES))
        return self._transition("configure", True)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)   # enables the lifecycle publishers
        with self._tick_lock:
            self._active = True
        self.get_logger().info(f"ticking at {self.cfg.control_rate_hz:g} Hz")
        return self._transition("activate", result == TransitionCallbackReturn.SUCCESS)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._tick_lock:
            self._active = False
            try:
                self._publish_stop(self._now_s())   # rest, then silence
                self.runtime.safety.reset()         # and when activated again, ramp up from rest
            except Exception as exc:
                self._fault("publish_failed", f"publishing rest on deactivate failed: {exc}")
        result = super().on_deactivate(state)
        return self._transition("deactivate", result == TransitionCallbackReturn.SUCCESS)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._tick_lock:
            self._release()
        return self._transition("cleanup", True)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._tick_lock:
            if self._active:
                self._active = False
                try:
                    self._publish_stop(self._now_s())
                except Exception:  # shutting down: rest is best effort, the release is not
                    pass
            self._release()
        return self._transition("shutdown", True)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._tick_lock:
            self._active = False
            self._release()
        return self._transition("error recovery", True)

    def _release(self) -> None:
        """Everything configure created, whatever got that far."""
        for sub in self._made_subscriptions:
            self.destroy_subscription(sub)
        for srv in self._made_services:
            self.destroy_service(srv)
        for pub in self._made_publishers:
            self.destroy_lifecycle_publisher(pub) if hasattr(self, "destroy_lifecycle_publisher") \
                else self.destroy_publisher(pub)
        self._made_subscriptions, self._made_services, self._made_publishers = [], [], []
        if self.runtime is not None:
            try:
                self.runtime.engine.close()
            finally:
                self.runtime = None

    def _declared_config_names(self) -> list[str]:
        from .params import parameter_defaults
        return list(parameter_defaults(RobotConfig))

    # ------------------------------------------------------------ wiring

    def _make_subscriptions(self) -> None:
        from sensor_msgs.msg import CompressedImage, Image, Imu, JointState, LaserScan, PointCloud2
        from std_msgs.msg import Bool
        from std_srvs.srv import SetBool, Trigger

        from . import convert

        inputs, group = self.cfg.inputs, self._intake_group
        _typestore()   # built now: building it in the first callback would stall intake for 0.3 s

        def subscribe(modality: str, msg_type: Any, section: Any) -> None:
            convert_fn = convert.sample_converter(modality, typename(msg_type), self.cfg, lambda: self._audio_info)
            raw = msg_type.__module__.split(".")[0] == "sensor_msgs"   # rosbags reads these without copies
            if raw:
                decode = CdrDecoder(msg_type)
                callback = lambda data: self._receive(modality, data, lambda d: convert_fn(decode(d)))  # noqa: E731
            else:
                callback = lambda msg: self._receive(modality, msg, convert_fn)  # noqa: E731
            self._made_subscriptions.append(self.create_subscription(
                msg_type, section.topic, callback, sensor_qos(section.qos, section.depth), raw=raw,
                callback_group=group, qos_overriding_options=QoSOverridingOptions.with_default_policies()))

        subscribe("camera", CompressedImage if inputs.camera.type == "compressed_image" else Image, inputs.camera)
        subscribe("lidar", PointCloud2 if inputs.lidar.type == "point_cloud2" else LaserScan, inputs.lidar)
        subscribe("imu", Imu, inputs.imu)
        subscribe("joint_state", JointState, inputs.joint_state)

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
            self._made_subscriptions.append(self.create_subscription(
                info_type, audio.info_topic, self._on_audio_info, latched_qos(), callback_group=group))

        out = self.cfg.outputs
        self._made_subscriptions.append(self.create_subscription(Bool, out.estop_topic, self._on_estop, 10,
                                                            callback_group=group))
        self._made_services.append(self.create_service(SetBool, out.enable_service, self._on_enable, callback_group=group))
        self._made_services.append(self.create_service(Trigger, out.reset_service, self._on_reset, callback_group=group))

    def _make_publishers(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import TwistStamped
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Float32MultiArray, Float64, Float64MultiArray

        out = self.cfg.outputs

        def publisher(msg_type: Any, topic: str) -> Any:
            pub = self.create_lifecycle_publisher(msg_type, topic, 10)
            self._made_publishers.append(pub)
            return pub

        self._pub_action = publisher(Float64MultiArray, out.action_topic)
        self._pub_joint = publisher(JointState, out.joint_command_topic)
        self._pub_fused = publisher(Float32MultiArray, out.fused_state_topic)
        self._pub_preview = publisher(Float64MultiArray, out.preview_topic)
        self._pub_tick = publisher(DiagnosticArray, _TICK_TOPIC)
        self._pub_twist = self._pub_gripper = None
        if out.twist_enabled:
            self._pub_twist = publisher(TwistStamped, out.twist_topic)
            self._pub_gripper = publisher(Float64, out.gripper_topic)

    # ------------------------------------------------------------ parameters at run time

    def _on_set_parameters(self, params: list[Any]) -> Any:
        from rcl_interfaces.msg import SetParametersResult

        changes = {p.name: p.value for p in params}
        if not all(name in SAFETY_WRITABLE for name in changes):   # read_only ones never get here
            return SetParametersResult(successful=True)
        values = {name: self.get_parameter(name).value for name in self._declared_config_names()}
        values.update(changes)
        try:
            cfg = build_config(RobotConfig, values)
        except ConfigError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        runtime = self.runtime
        if runtime is not None and runtime.safety.enabled:
            why = _loosening(self.cfg.safety, cfg.safety, cfg.model.action.dof)
            if why:
                return SetParametersResult(successful=False, reason=(
                    f"the arm is commanded: safety limits may only be tightened now ({why}); disable it "
                    f"(/mm_fusion/enable false) to loosen them"))
        with self._tick_lock:
            self.cfg = cfg
            if runtime is not None:
                runtime.set_safety(cfg.safety)
        self.get_logger().info("safety parameters changed: " + ", ".join(f"{k}={v}" for k, v in changes.items()))
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------ intake (executor thread)

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _clock_started(self) -> bool:
        # With use_sim_time the ROS clock reads 0 until the first /clock: a message stamped in sim time would
        # look like it came from the future, and a tick at t = 0 means nothing.
        return not self.cfg.use_sim_time or self.get_clock().now().nanoseconds > 0

    def _receive(self, modality: str, msg: Any, convert_fn: Callable[[Any], Any]) -> None:
        runtime = self.runtime
        if runtime is None:
            return
        self.received[modality] += 1
        if not self._clock_started():
            self.waiting_for_clock += 1
            return
        now = self._now_s()
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
            if runtime.add(sample, now):
                self.accepted[modality] += 1
        except Exception as exc:  # likewise for the aligner: one message lost, intake goes on
            self._refuse(f"{modality}.add_error", f"{type(exc).__name__}: {exc}")

    def _refuse(self, cause: str, detail: str) -> None:
        self.bad[cause] += 1
        if self.runtime is not None:
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
        if self.runtime is not None:
            self.runtime.estop(bool(msg.data))   # the runtime logs changes

    def _on_enable(self, request: Any, response: Any) -> Any:
        if self.runtime is None:
            response.success, response.message = False, f"not configured (state {self.state})"
            return response
        ok, message = self.runtime.set_enabled(bool(request.data))
        response.success, response.message = bool(ok), str(message)
        return response

    def _on_reset(self, request: Any, response: Any) -> Any:
        if self.runtime is None:
            response.success, response.message = False, f"not configured (state {self.state})"
            return response
        self.runtime.request_reset()
        response.success, response.message = True, "input buffers, recurrent state and rate limiter reset at the next tick"
        return response

    # ------------------------------------------------------------ control thread

    def _control_loop(self) -> None:
        """Tick on the node clock's control-period grid, as a timer would: missed ticks skipped, a clock that
        jumps back (a bag that loops, a simulation reset) restarts the grid."""
        self._realtime()
        clock = self.get_clock()
        next_ns: int | None = None
        while not self.stopping.is_set():
            if not self._active or not self._clock_started():
                next_ns = None
                self.stopping.wait(0.005)
                continue
            period_ns = int(round(1e9 / self.cfg.control_rate_hz))
            now_ns = clock.now().nanoseconds
            if next_ns is None or now_ns < next_ns - 2 * period_ns:   # the first tick, or the clock went back
                next_ns = (now_ns // period_ns + 1) * period_ns
            if now_ns < next_ns:
                if clock.ros_time_is_active:
                    # Sim time: sleep_until would not wake on a jump back (it waits for the old target to come
                    # round again), so look at the clock every half millisecond of wall time.
                    self.stopping.wait(0.0005)
                else:
                    try:
                        clock.sleep_until(Time(nanoseconds=next_ns, clock_type=clock.clock_type), self.context)
                    except Exception:  # the context went down under us
                        break
                continue
            with self._tick_lock:
                if self._active and not self.stopping.is_set():
                    # The tick's time is its place on the grid (as a timer's expected call time), so dt is the
                    # control period exactly, whatever the wake-up jitter.
                    self._on_tick(next_ns * 1e-9)
            next_ns += period_ns
            behind = clock.now().nanoseconds - next_ns
            if behind > period_ns:   # as a timer does: missed ticks are skipped, not bunched
                next_ns += (behind // period_ns) * period_ns

    def _on_tick(self, t: float) -> None:
        wall_start = time.perf_counter()
        runtime = self.runtime
        try:
            result = runtime.tick(t)
        except Exception as exc:  # keep ticking; the arm gets rest, never a stale command
            self._fault("tick_failed", f"control tick at t={t:.3f} failed: {type(exc).__name__}: {exc}")
            try:
                self._publish_failed_tick(t, exc)
            except Exception as exc2:
                self._fault("publish_failed", f"publishing rest at t={t:.3f} failed: {exc2}")
            return
        publish_start = time.perf_counter()
        try:
            self._publish(result, t)
        except Exception as exc:  # a failed publish must not stop the control loop
            self._fault("publish_failed", f"publishing tick t={t:.3f} failed: {type(exc).__name__}: {exc}")
        now = time.perf_counter()
        runtime.record(result, now - publish_start, wall_start)
        self.tick_s.add(now - wall_start)
        self.tick_t.add(t)
        if now >= self._next_log:
            self._next_log = now + self.cfg.outputs.log_period_s
            self.get_logger().info(runtime.log_line())

    def _publish(self, result: Any, t: float) -> None:
        from . import convert

        safety = result.safety
        command = np.asarray(safety.command, dtype=np.float64)
        self._last_commanded = bool(safety.commanded)
        if not np.isfinite(command).all():  # the safety filter should make this impossible; never trust it blindly
            self.unpublished["nonfinite_command"] += 1
            out = self.runtime.rest(t)        # recorded as the filter's last output, as after a failed tick
            if out.commanded:
                self._publish_command(np.asarray(out.command, dtype=np.float64), t)
            else:
                self._pub_preview.publish(convert.action_msg(out.command))
        elif safety.commanded:
            self._publish_command(command, t)
        else:
            self._pub_preview.publish(convert.action_msg(command))
        fused = np.asarray(result.fused_state, dtype=np.float32)
        if np.isfinite(fused).all():
            self._pub_fused.publish(convert.fused_state_msg(fused))
        else:
            self.unpublished["nonfinite_fused_state"] += 1
        self._pub_tick.publish(self._diagnostic_array([self.runtime.tick_status(result)], t))

    def _publish_failed_tick(self, t: float, exc: Exception) -> None:
        """Rest through the safety filter (its last command becomes rest, so the next good tick ramps from
        there, not from the command before the failure), and the failure on ~/tick."""
        from ..runtime import ERROR, Status
        from . import convert

        out = self.runtime.rest(t)
        self._last_commanded = bool(out.commanded)
        if out.commanded:
            self._publish_command(np.asarray(out.command, dtype=np.float64), t)
        else:
            self._pub_preview.publish(convert.action_msg(out.command))
        status = Status(f"{self.get_name()}: mm_fusion: tick", ERROR, f"tick failed: {type(exc).__name__}: {exc}",
                        {"t": f"{t:.6f}", "faults.tick_failed": str(self.faults["tick_failed"])})
        self._pub_tick.publish(self._diagnostic_array([status], t))

    def _publish_command(self, command: np.ndarray, t: float) -> None:
        from std_msgs.msg import Float64

        from . import convert

        self._pub_action.publish(convert.action_msg(command))
        self._pub_joint.publish(convert.joint_state_msg(self.cfg.model.action.names, command, t))
        if self._pub_twist is not None:
            self._pub_twist.publish(convert.twist_msg(command[:6], t, self.cfg.outputs.twist_frame_id))
            self._pub_gripper.publish(Float64(data=float(command[6])))

    def _publish_stop(self, t: float) -> None:
        """Zero velocity now (within the limits), not ramped: deactivation and shutdown."""
        from . import convert

        if self.runtime is None:
            return
        rest = np.array(self.runtime.safety.rest_command, dtype=np.float64)
        if self._last_commanded:
            self._publish_command(rest, t)
        else:
            self._pub_preview.publish(convert.action_msg(rest))

    def _diagnostic_array(self, statuses: list[Any], t: float) -> Any:
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

        from .convert import s_to_stamp_fields

        msg = DiagnosticArray()
        msg.header.stamp.sec, msg.header.stamp.nanosec = s_to_stamp_fields(t)
        for status in statuses:
            msg.status.append(DiagnosticStatus(
                level=bytes([int(status.level)]), name=status.name, message=status.message,
                hardware_id=self.get_fully_qualified_name(),
                values=[KeyValue(key=str(k), value=str(v)) for k, v in status.values.items()]))
        return msg

    def _publish_diagnostics(self) -> None:
        """/diagnostics, about once a second: the node's lifecycle state and, when configured, the runtime."""
        try:
            self._diagnostics_now()
        except Exception as exc:  # on the executor thread: an exception here would stop intake too
            self._fault("diagnostics_failed", f"publishing /diagnostics failed: {type(exc).__name__}: {exc}")

    def _diagnostics_now(self) -> None:
        from ..runtime import ERROR, OK, WARN, Status

        state = self.state
        level = ERROR if self.last_error else (OK if state == "active" else WARN)
        message = self.last_error or state
        values = {"state": state, "transitions": " ".join(f"{n}:{r}" for n, r in self.transitions[-5:]),
                  "faults": json_counts(self.faults), "waiting_for_clock": str(self.waiting_for_clock)}
        statuses = [Status(f"{self.get_name()}: mm_fusion: node", level, message, values)]
        runtime = self.runtime
        if runtime is not None and state == "active":
            try:
                statuses += runtime.report()
            except Exception as exc:  # a report must never take the node down
                self._fault("report_failed", f"diagnostics report failed: {exc}")
        self._pub_diag.publish(self._diagnostic_array(statuses, self._now_s()))

    # ------------------------------------------------------------ running

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

    def _start_control(self) -> None:
        thread = threading.Thread(target=self._control_loop, name="fusion-control", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _spin_executor(self) -> None:
        self._realtime()
        spin_until_stopped(self._executor, self.stopping)

    def spin(self) -> None:
        """The control thread, and the executor (intake, services, diagnostics) on this one, until shutdown."""
        # Python hands the GIL to a waiting thread only every switch interval (5 ms by default): the
        # control thread would wait that long behind a sensor callback. 0.5 ms bounds the wait.
        sys.setswitchinterval(_SWITCH_INTERVAL_S)
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self)
        self._start_control()
        self._spin_executor()

    def spin_in_background(self) -> None:
        """Both threads in the background (in-process tests)."""
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self)
        self._start_control()
        thread = threading.Thread(target=self._spin_executor, name="fusion-intake", daemon=True)
        self._threads.append(thread)
        thread.start()

    def stats(self, full: bool = False) -> dict:
        ticks = self.tick_s.values()
        out = {
            "node": self.get_name(), "state": self.state, "ticks": int(self.tick_s.count),
            "received": dict(self.received), "accepted": dict(self.accepted), "bad": dict(self.bad),
            "waiting_for_clock": self.waiting_for_clock,
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
                out["summary"] = self.runtime.summary() if self.runtime is not None else {}
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
        if self._executor is not None:
            self._executor.shutdown(timeout_sec=1.0)
        stats = self.stats()
        full = self.stats(full=True) if os.environ.get(STATS_ENV) else None
        if self.state in ("active", "inactive", "unconfigured"):
            self.trigger_shutdown()   # rest, then release
        print_stats(stats)
        if full is not None:
            write_json_atomic(os.environ[STATS_ENV], full, indent=None)
        self.destroy_node()


def json_counts(counts: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"


def _loosening(old: Any, new: Any, dof: int = 7) -> str:
    """Why the ``new`` safety settings are looser than ``old`` (empty if they are not)."""
    reasons = []
    if (np.array(new.per_dof("lower", dof)) < np.array(old.per_dof("lower", dof))).any() or \
            (np.array(new.per_dof("upper", dof)) > np.array(old.per_dof("upper", dof))).any():
        reasons.append("wider limits")
    if (np.array(new.per_dof("max_acceleration", dof)) > np.array(old.per_dof("max_acceleration", dof))).any():
        reasons.append("a higher max_acceleration")
    if old.on_stale == "zero" and new.on_stale != "zero":
        reasons.append("on_stale from zero to hold_last")
    if new.on_stale == "hold_last" and new.hold_timeout_s > old.hold_timeout_s:
        reasons.append("a longer hold_timeout_s")
    return ", ".join(reasons)


def main(args: list[str] | None = None) -> int:
    return node_main(NODE_NAME, FusionNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
