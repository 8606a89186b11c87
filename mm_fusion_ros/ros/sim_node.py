"""sim_node: the simulated cell (``mm_fusion_ros.sim``) on ROS 2, as a real cell's drivers and controller show it.

A thin shell over ``Cell``: the sensors come out on the topics the cell's
fusion_node block of ``config/sim.yaml`` subscribes to, the joint velocity
command goes in as a forward velocity controller takes it, and ``/clock``
carries the sim time (``use_sim_time`` everywhere else). Parameters: the cell's
(``sim_node.ros__parameters`` of ``config/sim.yaml``, the same block ``mm-fusion
record`` reads) and the node's own under ``node.`` (``params.SimNodeConfig``).

Topics (``node.topics``):

- camera: ``<camera>/compressed`` sensor_msgs/CompressedImage when ``camera.encoding`` is jpeg (image_transport's
  compressed transport), else ``<camera>`` sensor_msgs/Image rgb8;
- audio: audio_common_msgs/AudioDataStamped (S16LE, mono) with a latched AudioInfo, or the ``image_pcm`` fallback
  where audio_common_msgs is not importable, decided and logged exactly as microphone_node does;
- ``/scan`` LaserScan, ``/imu/data`` Imu, ``/joint_states`` JointState (panda_joint1..7: position, velocity, effort);
- ``/clock`` rosgraph_msgs/Clock, every step;
- in: the command (std_msgs/Float64MultiArray, 7 joint velocities) and the e-stop (std_msgs/Bool);
- out: ``/sim/episode`` (std_msgs/String, one JSON object per episode, latched); service ``/sim/reset`` (Trigger).

Clock and pacing. A pacing thread advances the cell ``node.step_s`` (5 ms) of sim time per step on an absolute wall
schedule: step k is due at ``wall0 + k * step_s / rate_factor``, so sim time is rate_factor x wall time with no drift.
Each step is computed ahead, then the thread waits for the step's wall time and publishes ``/clock`` (the step's end)
followed by every reading whose receive time has come (``ArrivalQueue``), each stamped with its capture time: the
capture -> receive latencies a subscriber sees are the cell's sensor models, quantised up to one step. 5 ms (200 Hz
of /clock) because it divides the 10 ms control period, so a sim-time fusion_node's 100 Hz timer fires at the same
phase of every other step and its dt stays exactly 10 ms (4 ms steps would make it alternate 8 and 12 ms); it also
divides the IMU's 5 ms and the audio's 20 ms periods; and it costs a fifth of the CPU of a 1 kHz clock while the
delivery quantisation (<= 5 ms) stays below every input's max_age. A machine too slow for the rate falls behind;
more than ``_MAX_LAG_S`` behind, the schedule is re-anchored (counted as a slip): sim time slows down, it never
bursts to catch up.

The clock is monotonic over episodes: every episode's cell clock starts at ``episode.start_time_s``, and the node
shifts it to continue where the previous episode ended (the first episode is not shifted; ``/sim/episode`` gives
each one's ``clock_start``). A clock that jumped back would make every sim-time subscriber drop its buffers.

Commands. The latest command is held by the cell until replaced and becomes zero once older than
``safety.command_timeout_s`` (100 ms), as ros2_control's forward velocity controller with a command timeout. One
arriving while step k is being computed takes effect at step k + 1 (a 200 Hz controller reading the latest
command). A command that is not 7 finite numbers is dropped, counted per cause (status line, exit statistics) and
logged throttled; it does not refresh the held command, so the previous one ages out and the arm stops.

E-stop: true calls ``Cell.estop()`` in the callback (the held command is zero from the next physics step on) and
holds it: commands are dropped (counted) and the expert is silent until false. The arm then decelerates as its
servo brings it to rest (about 30 ms time constant), as a real arm's stop does.

Episode end: ``/sim/episode`` (seed, status, reason, detail, duration, spec, ...), one log line, then the next
seed's episode at once (``auto_reset``) or a hold: the clock goes on and every sensor repeats its last reading at its
own rate (restamped) until ``/sim/reset``. ``episodes`` > 0 shuts the node down after that many. A reset during an
episode ends it as ``aborted``.

At exit the node prints one ``mm_fusion_stats {json}`` line: messages published per topic, commands (applied, bad
per cause, ignored), episodes, real-time factor, slips, CPU time and step compute times.
"""

from __future__ import annotations

import array
import dataclasses
import json
import math
import sys
import threading
import time
from collections import Counter, deque
from typing import Any

import numpy as np
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CompressedImage, Image, Imu, JointState, LaserScan
from std_msgs.msg import Bool, Float64MultiArray, String
from std_srvs.srv import Trigger

from ..procs import print_stats
from ..sim.cell import Cell
from ..sim.expert import Expert
from ..sim.gl import check_backend
from ..sim.panda import JOINT_NAMES
from ..sim.readings import JPEG_FORMAT, SENSORS, ArrivalQueue, CameraFrame, JointReading, Reading, encode_jpeg
from .convert import s_to_stamp_fields
from .fusion_node import _Throttle
from .microphone_node import AudioPublisher
from .params import MicrophoneNodeConfig, SimNodeParameters, Spinner, declare_config, node_main
from .qos import SubscriberGate, sensor_qos, wait_for_acks
from .sensor_sim_node import imu_msg, laser_scan_msg

NODE_NAME = "sim_node"
_MAX_LAG_S = 0.05          # wall seconds behind schedule before the sim clock slips instead of catching up
_EXPERT_PERIOD_S = 0.01    # the scripted expert's control rate (as mm-fusion record runs it)
_BAD_LOG_PERIOD_S = 10.0
_SWITCH_INTERVAL_S = 0.0005   # as fusion_node: a thread waiting for the GIL gets it within 0.5 ms, not 5


def _episode_qos() -> QoSProfile:
    """Latched with some history: a subscriber that joins late still gets the recent outcomes."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), numpy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _percentiles_ms(values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {"n": 0}
    ms = np.asarray(values_s) * 1e3
    return {"n": int(len(ms)), "p50": round(float(np.median(ms)), 3), "p99": round(float(np.percentile(ms, 99)), 3),
            "max": round(float(ms.max()), 3)}


class SimNode(Node):
    def __init__(self, *, context=None, parameter_overrides=None, cli_args=None):
        super().__init__(NODE_NAME, context=context, parameter_overrides=parameter_overrides, cli_args=cli_args,
                         automatically_declare_parameters_from_overrides=True)
        params: SimNodeParameters = declare_config(self, SimNodeParameters)
        self.cfg = params.node
        self.cell_cfg = params.cell()
        if self.get_parameter("use_sim_time").value:
            self.get_logger().warning("use_sim_time is true, but sim_node is the clock: it paces itself on the wall "
                                      "clock and stamps with the cell's; the parameter changes nothing here")
        check_backend()   # a missing OSMesa says what to install, before MuJoCo fails obscurely
        self.cell = Cell(self.cell_cfg)
        self.expert = Expert(self.cell) if self.cfg.expert else None
        self._lock = threading.Lock()   # the cell: the pacing thread steps it, callbacks command it
        self._queue = ArrivalQueue()
        self._last: dict[str, Reading] = {}   # each sensor's newest reading (node clock), repeated while holding
        self._periods = {"camera": 1.0 / self.cell_cfg.camera.rate_hz, "audio": self.cell_cfg.audio.chunk_s,
                         "lidar": 1.0 / self.cell_cfg.lidar.rate_hz, "imu": 1.0 / self.cell_cfg.imu.rate_hz,
                         "joint_states": 1.0 / self.cell_cfg.joint_states.rate_hz}

        # Counters (read by the status line, the exit statistics and the tests).
        self.published: Counter[str] = Counter()
        self.commands_received = 0
        self.commands_applied = 0
        self.bad_commands: Counter[str] = Counter()    # dropped, per cause
        self.ignored_commands: Counter[str] = Counter()   # well-formed but not applied: estop | expert | episode_over
        self.outcomes: Counter[str] = Counter()
        self.estop_events: list[tuple[float, bool]] = []   # (node clock when applied, asserted)
        self.episodes_done = 0
        self.slips = 0
        self._compute_s: deque[float] = deque(maxlen=100_000)   # wall seconds per step computed
        self._throttle = _Throttle(_BAD_LOG_PERIOD_S)

        self._make_publishers()
        self._make_inputs()

        self._clock0 = self.cell_cfg.episode.start_time_s
        self._k = 0                      # steps since the start: the node clock is clock0 + k * step_s
        self._offset = 0.0               # node clock - cell clock, this episode
        self._next_seed = self.cell_cfg.seed
        self._episode = 0
        self._estopped = False
        self._reset_requested = False
        self._ended = True
        self._wall_start = self._wall_last = self._clock_start = math.nan   # the pacing loop's span
        self._cpu_start = math.nan
        self._error: BaseException | None = None
        self._switch_interval: float | None = None
        with self._lock:
            self._start_episode(self._clock0)

        self._spinner = Spinner(self)
        self.stopping = self._spinner.stopping
        self._thread = threading.Thread(target=self._run, name="sim-pacing", daemon=True)
        cam = self.cell_cfg.camera
        driver = "the scripted expert drives the arm" if self.expert else f"commands on {self.cfg.topics.command}"
        self.get_logger().info(
            f"cell at {self.cfg.rate_factor:g}x real time, /clock every {self.cfg.step_s * 1e3:g} ms; camera "
            f"{cam.width}x{cam.height} {cam.encoding} on {self._camera_topic}, audio {self.audio.kind} on "
            f"{self.cfg.topics.audio}; {driver}; "
            f"{'auto reset' if self.cfg.auto_reset else 'holding after each episode'}"
            + (f", {self.cfg.episodes} episode(s)" if self.cfg.episodes else ""))

    # ------------------------------------------------------------ wiring

    def _make_publishers(self) -> None:
        cfg, topics = self.cfg, self.cfg.topics
        qos = sensor_qos(cfg.qos, cfg.depth)
        self._pub_clock = self.create_publisher(Clock, "/clock", 10)
        self._jpeg = self.cell_cfg.camera.encoding == "jpeg"
        self._camera_topic = topics.camera.rstrip("/") + "/compressed" if self._jpeg else topics.camera
        self._pub_camera = self.create_publisher(CompressedImage if self._jpeg else Image, self._camera_topic, qos)
        audio = self.cell_cfg.audio
        mic = MicrophoneNodeConfig(topic=topics.audio, type=cfg.audio_type, info_topic=topics.audio_info,
                                   frame_id=self.cell_cfg.frame_ids.audio, sample_rate=audio.sample_rate, channels=1,
                                   sample_format="S16LE", chunk_s=audio.chunk_s, qos=cfg.qos, depth=cfg.depth)
        self.audio = AudioPublisher(self, mic, audio.sample_rate, 1)   # logs the image_pcm fallback itself
        self._pub_lidar = self.create_publisher(LaserScan, topics.lidar, qos)
        self._pub_imu = self.create_publisher(Imu, topics.imu, qos)
        self._pub_joints = self.create_publisher(JointState, topics.joint_states, qos)
        self._pub_episode = self.create_publisher(String, topics.episode, _episode_qos())
        self._sensor_publishers = [self._pub_camera, self.audio.publisher, self._pub_lidar, self._pub_imu,
                                   self._pub_joints]

    def _make_inputs(self) -> None:
        topics = self.cfg.topics
        self.create_subscription(Float64MultiArray, topics.command, self._on_command, 10)
        self.create_subscription(Bool, topics.estop, self._on_estop, 10)
        self.create_service(Trigger, topics.reset, self._on_reset)

    # ------------------------------------------------------------ callbacks (executor thread)

    def _on_command(self, msg: Any) -> None:
        self.commands_received += 1
        qdot = np.asarray(msg.data, dtype=np.float64).reshape(-1)
        cause = None
        if qdot.shape != (len(JOINT_NAMES),):
            cause, detail = "wrong_length", f"{qdot.size} values, not {len(JOINT_NAMES)}"
        elif not np.isfinite(qdot).all():
            cause, detail = "non_finite", f"non-finite values {qdot.tolist()}"
        if cause is not None:
            self.bad_commands[cause] += 1
            suppressed = self._throttle.check(cause)
            if suppressed is not None:
                more = f", {suppressed} more since the last report" if suppressed else ""
                self.get_logger().warning(
                    f"dropped a command on {self.cfg.topics.command}: {detail} ({cause}: "
                    f"{self.bad_commands[cause]} so far{more}); the arm keeps the previous command until it times out")
            return
        with self._lock:
            if self._estopped:
                self.ignored_commands["estop"] += 1
            elif self.expert is not None:
                self.ignored_commands["expert"] += 1
            elif self._ended:
                self.ignored_commands["episode_over"] += 1
            else:
                self.cell.command(qdot)
                self.commands_applied += 1

    def _on_estop(self, msg: Any) -> None:
        active = bool(msg.data)
        with self._lock:
            if active:
                self.cell.estop()   # every true: a held button that repeats itself keeps the arm at zero
            if active == self._estopped:
                return
            self._estopped = active
            at = self.cell.t + self._offset
            self.estop_events.append((at, active))
        self.get_logger().warning(f"e-stop {'asserted: arm stopped' if active else 'released'} at t={at:.3f}")

    def _on_reset(self, request: Any, response: Any) -> Any:
        with self._lock:
            if self.stopping.is_set():
                response.success, response.message = False, "shutting down"
                return response
            self._reset_requested = True
            seed = self._next_seed
        response.success, response.message = True, f"episode {self._episode + 1} (seed {seed}) starts at the next step"
        return response

    # ------------------------------------------------------------ episodes (under the lock)

    def _start_episode(self, clock_t: float) -> None:
        seed = self._next_seed
        self._next_seed += 1
        self._episode += 1
        spec = self.cell.reset(seed)
        self._offset = clock_t - self.cell.t
        self._episode_start = clock_t
        self._ended = False
        if self.expert is not None:
            self.expert.reset()
            self._expert_next = self.cell.t
        intrusion = spec.intrusion
        self.get_logger().info(
            f"episode {self._episode} (seed {seed}) starts at t={clock_t:.3f}: press {spec.target_colour}; "
            + (f"intruder from the {'left' if intrusion.side > 0 else 'right'} at {intrusion.start:.1f} s"
               if intrusion else "no intruder"))

    def _finish(self, clock_t: float, aborted: bool = False) -> None:
        cell, spec = self.cell, self.cell.spec
        out = cell.outcome
        status, reason, detail = (("aborted", "reset", "ended by the reset service") if aborted and not out.done
                                  else (out.status, out.reason, out.detail))
        duration = cell.elapsed if aborted and not out.done else out.t
        self._ended = True
        self.episodes_done += 1
        self.outcomes[reason] += 1
        record = {"episode": self._episode, "seed": spec.seed, "status": status, "reason": reason, "detail": detail,
                  "duration": duration, "clock_start": self._episode_start, "clock_end": self._episode_start + duration,
                  "spec": spec.as_dict(), "stats": dataclasses.asdict(cell.stats)}
        self._pub_episode.publish(String(data=json.dumps(_json_safe(record))))
        self.get_logger().info(f"episode {self._episode} (seed {spec.seed}): {status} ({reason}) after "
                               f"{duration:.2f} s: {detail}")

    def _limit_reached(self) -> bool:
        return bool(self.cfg.episodes) and self.episodes_done >= self.cfg.episodes

    # ------------------------------------------------------------ the pacing thread

    def _clock_at(self, k: int) -> float:
        return self._clock0 + k * self.cfg.step_s

    @property
    def episode_running(self) -> bool:
        """False between an episode's end and the next one's start (holding, or shutting down)."""
        return not self._ended

    def now_s(self) -> float:
        """The node clock (the last /clock published)."""
        return self._clock_at(self._k)

    def _run(self) -> None:
        try:
            self._publish_clock(self._clock_at(self._k))
            if not SubscriberGate([self._pub_clock], self.cfg.wait_for_subscribers).wait(self.stopping):
                return
            step, rate = self.cfg.step_s, self.cfg.rate_factor
            wall0, k0 = time.monotonic(), self._k
            self._wall_start, self._clock_start = wall0, self._clock_at(k0)
            self._cpu_start = time.process_time()
            next_log = wall0 + self.cfg.log_period_s
            while not self.stopping.is_set() and self.context.ok():
                k = self._k + 1
                t = self._clock_at(k)
                c0 = time.perf_counter()
                with self._lock:
                    self._compute(t)
                self._compute_s.append(time.perf_counter() - c0)
                delay = wall0 + (k - k0) * step / rate - time.monotonic()
                if delay > 0:
                    if self.stopping.wait(delay):
                        break
                elif delay < -_MAX_LAG_S:   # too slow for this rate: slip, never burst
                    self.slips += 1
                    wall0, k0 = time.monotonic(), k
                    suppressed = self._throttle.check("slip")
                    if suppressed is not None:
                        self.get_logger().warning(
                            f"{-delay * 1e3:.0f} ms behind the wall clock at t={t:.3f} (step compute "
                            f"{self._compute_s[-1] * 1e3:.1f} ms): the sim clock slips ({self.slips} so far"
                            + (f", {suppressed} since the last report)" if suppressed else ")"))
                self._k = k
                self._wall_last = time.monotonic()
                self._publish_due(t)
                with self._lock:
                    stop = self._after_step(t)
                if stop:
                    self.get_logger().info(f"{self.episodes_done} episode(s) done (episodes={self.cfg.episodes}): "
                                           "shutting down")
                    self.stopping.set()
                    break
                if time.monotonic() >= next_log:
                    next_log += self.cfg.log_period_s
                    self.get_logger().info(self.status_line())
        except Exception as exc:  # the cell or a publish failed: say so and stop the node, never hang silently
            if self.context.ok() and not self.stopping.is_set():
                self._error = exc
                self.get_logger().fatal(f"pacing thread failed at t={self.now_s():.3f}: {type(exc).__name__}: {exc}")
            self.stopping.set()

    def _compute(self, t: float) -> None:
        """Advance the cell (or the hold) to node clock ``t`` and queue what the sensors captured."""
        if self._ended:
            self._hold(t)
            return
        cell = self.cell
        target = t - self._offset
        half = 0.5 * cell.dt
        readings: list[Reading] = []
        while not cell.outcome.done and cell.t + half < target:
            until = target
            if self.expert is not None:
                if cell.t + half >= self._expert_next:
                    if not self._estopped:
                        qdot = self.expert.act()
                        limit = self.expert.p.max_joint_speed
                        cell.command(np.clip(qdot, -limit, limit))
                    while self._expert_next <= cell.t + half:
                        self._expert_next += _EXPERT_PERIOD_S
                until = min(target, self._expert_next)
            readings += cell.advance(until)
        offset = self._offset
        for r in readings:
            if offset:
                r = dataclasses.replace(r, stamp=r.stamp + offset, receive=r.receive + offset)
            self._last[r.sensor] = r
            self._queue.push([r])

    def _hold(self, t: float) -> None:
        """After an episode, until the next: every sensor repeats its last reading at its rate, restamped."""
        for sensor, r in list(self._last.items()):
            period = self._periods[sensor]
            while r.stamp + period <= t + 1e-9:
                r = dataclasses.replace(r, stamp=r.stamp + period, receive=r.receive + period)
                self._queue.push([r])
            self._last[sensor] = r

    def _after_step(self, t: float) -> bool:
        """Episode bookkeeping once step ``t`` is out; True when the node should shut down."""
        if self._reset_requested:
            self._reset_requested = False
            if not self._ended:
                self._finish(t, aborted=True)
            if self._limit_reached():
                return True
            self._start_episode(t)
        elif not self._ended and self.cell.outcome.done:
            self._finish(t)
            if self._limit_reached():
                return True
            if self.cfg.auto_reset:
                self._start_episode(t)
            else:
                self.get_logger().info(f"holding the final state until {self.cfg.topics.reset} is called")
        return False

    # ------------------------------------------------------------ publishing (pacing thread)

    def _publish_clock(self, t: float) -> None:
        msg = Clock()
        msg.clock.sec, msg.clock.nanosec = s_to_stamp_fields(t)
        self._pub_clock.publish(msg)
        self.published["clock"] += 1

    def _publish_due(self, t: float) -> None:
        self._publish_clock(t)   # first: no reading arrives stamped ahead of the clock a subscriber has
        for r in self._queue.pop_due(t):
            self._publish_reading(r)
            self.published[r.sensor] += 1

    def _publish_reading(self, r: Reading) -> None:
        ids = self.cell_cfg.frame_ids
        if r.sensor == "camera":
            self._pub_camera.publish(self._camera_msg(r))
        elif r.sensor == "audio":
            self.audio.publish(r.pcm.reshape(-1, 1), r.stamp)
        elif r.sensor == "lidar":
            msg = laser_scan_msg(r.ranges, r.stamp, ids.lidar, r.range_min, r.range_max, r.scan_time)
            self._pub_lidar.publish(msg)
        elif r.sensor == "imu":
            self._pub_imu.publish(imu_msg(r.accel, r.gyro, r.stamp, ids.imu))
        else:
            self._pub_joints.publish(self._joint_msg(r))

    def _camera_msg(self, frame: CameraFrame) -> Any:
        if self._jpeg:
            msg = CompressedImage()
            msg.format = JPEG_FORMAT
            msg.data = encode_jpeg(frame.pixels, self.cell_cfg.camera.jpeg_quality)
        else:
            msg = Image()
            msg.height, msg.width = int(frame.pixels.shape[0]), int(frame.pixels.shape[1])
            msg.encoding, msg.is_bigendian, msg.step = "rgb8", 0, msg.width * 3
            msg.data = np.ascontiguousarray(frame.pixels).tobytes()
        msg.header.stamp.sec, msg.header.stamp.nanosec = s_to_stamp_fields(frame.stamp)
        msg.header.frame_id = self.cell_cfg.frame_ids.camera
        return msg

    def _joint_msg(self, r: JointReading) -> Any:
        msg = JointState()
        msg.header.stamp.sec, msg.header.stamp.nanosec = s_to_stamp_fields(r.stamp)
        msg.header.frame_id = self.cell_cfg.frame_ids.joint_states
        msg.name = list(JOINT_NAMES)
        msg.position = array.array("d", np.asarray(r.position, np.float64).tobytes())
        msg.velocity = array.array("d", np.asarray(r.velocity, np.float64).tobytes())
        msg.effort = array.array("d", np.asarray(r.effort, np.float64).tobytes())
        return msg

    # ------------------------------------------------------------ reporting and running

    def real_time_factor(self) -> float:
        """Sim seconds per wall second since the clock started (NaN before)."""
        wall = self._wall_last - self._wall_start
        return (self.now_s() - self._clock_start) / wall if wall > 0 else math.nan

    def status_line(self) -> str:
        bad = sum(self.bad_commands.values())
        causes = ", ".join(f"{k} {n}" for k, n in sorted(self.bad_commands.items()))
        ignored = sum(self.ignored_commands.values())
        return (f"t={self.now_s():.2f} episode {self._episode} ({self.cell.elapsed:.1f} s) | "
                f"{self.real_time_factor():.2f}x real time, {self.slips} slips | commands: "
                f"{self.commands_applied} applied, {bad} bad{f' ({causes})' if causes else ''}, {ignored} ignored | "
                f"e-stop {'ASSERTED' if self._estopped else 'off'} | outcomes "
                f"{dict(self.outcomes) or '-'}")

    def stats(self) -> dict:
        wall = self._wall_last - self._wall_start   # NaN if the clock never started
        cpu = time.process_time() - self._cpu_start   # the whole process (executor thread included), while pacing
        return _json_safe({
            "node": self.get_name(), "published": {s: self.published[s] for s in (*SENSORS, "clock")},
            "commands": {"received": self.commands_received, "applied": self.commands_applied,
                         "bad": dict(self.bad_commands), "ignored": dict(self.ignored_commands)},
            "estops": sum(1 for _, on in self.estop_events if on),
            "episodes": self.episodes_done, "outcomes": dict(self.outcomes),
            "sim_s": round(self.now_s() - self._clock_start, 3) if not math.isnan(self._clock_start) else 0.0,
            "wall_s": round(wall, 3), "real_time_factor": round(self.real_time_factor(), 4),
            "slips": self.slips, "cpu_s": round(cpu, 3),
            "cpu_share": round(cpu / wall, 4) if wall and wall > 0 else None,
            "step_compute_ms": _percentiles_ms(list(self._compute_s)),
        })

    def spin(self) -> None:
        # The pacing thread must publish on time and the e-stop callback run at once, with the executor
        # thread (and, in-process, whatever else) holding the GIL in between: see fusion_node.spin.
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, _SWITCH_INTERVAL_S))
        self._thread.start()
        self._spinner.spin()
        if self._error is not None:
            raise RuntimeError(f"sim_node's pacing thread failed: {self._error}") from self._error

    def spin_in_background(self) -> None:
        """The pacing thread and the executor on background threads (in-process tests)."""
        threading.Thread(target=self.spin, name="sim-executor", daemon=True).start()

    def close(self) -> None:
        self._spinner.close()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        wait_for_acks(self._sensor_publishers + [self._pub_episode])
        print_stats(self.stats())
        self.cell.close()
        self.destroy_node()
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)


def main(args: list[str] | None = None) -> int:
    return node_main(NODE_NAME, SimNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
