"""The live pipeline on one machine: the four sensor streams and fusion_node as separate processes.

``mm-fusion live`` (``make demo``) generates a video file and a WAV file,
starts fusion_node (enabled), then camera_node (the video), microphone_node
(the WAV) and sensor_sim_node (LiDAR and IMU), prints the fusion node's cadence
report every second for ``--duration`` seconds, stops everything by PID and
prints a summary: achieved rate, tick-time percentiles, ticks over budget, how
often each input was masked, messages dropped or lost on the way, and what the
action did.

The same pieces serve the live benchmark (bench/live_loop.py) and the
integration tests: ``make_video``/``make_wav`` (the sources), ``LivePipeline``
(processes with the loopback-only environment and the Fast DDS profile) and
``Monitor`` (an rclpy node in this process that watches the outputs, sends the
e-stop and calls the enable service).
"""

from __future__ import annotations

import json
import os
import threading
import time
import wave
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import procs
from .config import MODALITIES, ModelConfig, RobotConfig, resolve_name
from .files import write_json_atomic

FUSION = "fusion_node"
SENSOR_NODES = ("camera_node", "microphone_node", "sensor_sim_node")
# SCHED_FIFO priority for fusion_node's threads (as ros2_control's controller manager asks for its loop);
# without the permission the node warns and runs with normal scheduling.
RT_PRIORITY = 50
READY_TIMEOUT_S = 300.0   # the first start exports the ONNX model; a loaded 2-core machine takes a while


# ---------------------------------------------------------------- sources

def make_video(path: str | Path, seconds: float = 4.0, fps: int = 30, width: int = 640, height: int = 480) -> Path:
    """An MJPG .avi with moving content (a bright blob over a gradient, a frame counter); kept if present."""
    import cv2

    path = Path(path)
    if path.is_file() and path.stat().st_size > 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write MJPG video to {tmp}")
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(int(round(seconds * fps))):
        t = i / fps
        cx, cy = width * (0.5 + 0.35 * np.sin(1.3 * t)), height * (0.5 + 0.3 * np.cos(0.9 * t))
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.07 * width) ** 2))
        frame = np.stack([40 + 60 * yy / height, 60 + 190 * blob, 90 + 40 * xx / width], axis=-1).astype(np.uint8)
        cv2.putText(frame, f"frame {i}", (20, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
        writer.write(frame)
    writer.release()
    os.replace(tmp, path)
    return path


def make_wav(path: str | Path, seconds: float = 6.0, rate: int = 16000) -> Path:
    """16-bit mono PCM WAV of the synthetic motor hum and chirps; kept if present."""
    from .synthetic import SyntheticSensors

    path = Path(path)
    if path.is_file() and path.stat().st_size > 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = SyntheticSensors(ModelConfig()).audio(seconds, n=int(seconds * rate), rate=rate)
    pcm = np.clip(samples * 32767.0, -32768, 32767).astype("<i2")
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    with wave.open(str(tmp), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.tobytes())
    os.replace(tmp, path)
    return path


def audio_type_here(configured: str) -> str:
    """The audio message type both ends will really use on this machine (image_pcm without audio_common_msgs)."""
    from .ros.params import audio_message_types
    return audio_message_types(configured)[0]


# ---------------------------------------------------------------- processes

class LivePipeline:
    """Node processes sharing one isolated, loopback-only ROS domain; stopped by PID on exit."""

    def __init__(self, workdir: str | Path, params_file: str | Path, domain_id: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.params_file = Path(params_file)
        self.env = procs.ros_env(domain_id)
        self.procs: dict[str, procs.NodeProcess] = {}
        self.exit_codes: dict[str, int] = {}

    def start(self, executable: str, overrides: dict[str, Any] | None = None, label: str | None = None,
              env: dict[str, str] | None = None, node_name: str | None = None) -> procs.NodeProcess:
        label = label or executable
        proc = procs.start_node(executable, self.workdir, params_file=self.params_file, overrides=overrides,
                                env={**self.env, **(env or {})}, label=label, node_name=node_name)
        self.procs[label] = proc
        return proc

    def stop(self, label: str, timeout: float = 10.0) -> int:
        code = self.procs[label].stop(timeout)
        self.exit_codes[label] = code
        return code

    def stop_all(self, timeout: float = 10.0) -> dict[str, int]:
        for label in reversed(list(self.procs)):
            if label not in self.exit_codes:
                self.stop(label, timeout)
        return dict(self.exit_codes)

    def check_alive(self) -> None:
        for label, proc in self.procs.items():
            if label not in self.exit_codes and not proc.alive():
                tail = "\n".join(proc.log().splitlines()[-15:])
                raise RuntimeError(f"{label} (pid {proc.pid}) exited with status {proc.popen.returncode}:\n{tail}")

    def __enter__(self) -> "LivePipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_all()


def fusion_env(stats_path: str | Path | None = None, rt_priority: int = RT_PRIORITY) -> dict[str, str]:
    """fusion_node's extra environment: where to write its statistics, and real-time scheduling if permitted."""
    env = {"MM_FUSION_RT_PRIORITY": str(rt_priority)}
    if stats_path is not None:
        env["MM_FUSION_STATS_FILE"] = str(stats_path)
    return env


def apply_ros_env(env: dict[str, str]) -> None:
    """Before this process imports rclpy: the same domain, discovery range and profile as the children."""
    for key in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_DOMAIN_ID", procs.PROFILE_ENV):
        os.environ[key] = env[key]
    os.environ.pop("ROS_LOCALHOST_ONLY", None)


# ---------------------------------------------------------------- watching the outputs

@dataclass
class TickRecord:
    t: float
    level: int
    used: tuple[bool, ...]       # per modality, MODALITIES order
    stamps: tuple[float, ...]    # capture stamp of the data used, per modality (nan when masked)
    held: bool
    message: str


@dataclass
class Monitor:
    """An rclpy node in this process: records commands, previews and diagnostics; sends e-stop and enable."""

    cfg: RobotConfig
    record_ticks: bool = True
    commands: list = field(default_factory=list)    # (stamp_s, values) from the JointState command
    actions: list = field(default_factory=list)     # (receipt_s, values) from the Float64MultiArray command
    previews: list = field(default_factory=list)    # (receipt_s, values)
    ticks: list = field(default_factory=list)       # TickRecord, while recording
    reports: dict = field(default_factory=dict)     # status name -> (level, message, values), the latest
    stamps: dict = field(default_factory=dict)      # topic -> deque of header stamps (watch())

    def __post_init__(self) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Bool, Float64MultiArray
        from std_srvs.srv import SetBool

        self.recording = False
        self.diagnostics_seen = 0
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(f"mm_fusion_monitor_{os.getpid()}", context=self.context)
        out = self.cfg.outputs
        node = self.node
        node.create_subscription(JointState, out.joint_command_topic, self._on_command, 100)
        node.create_subscription(Float64MultiArray, out.action_topic,
                                 lambda m: self.actions.append((self.now(), np.asarray(m.data))), 100)
        node.create_subscription(Float64MultiArray, out.preview_topic,
                                 lambda m: self.previews.append((self.now(), np.asarray(m.data))), 100)
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 100)        # 1 Hz reports
        node.create_subscription(DiagnosticArray, resolve_name("~/tick"), self._on_diagnostics, 1000)  # per tick
        self._estop = node.create_publisher(Bool, out.estop_topic, 10)
        self._enable = node.create_client(SetBool, out.enable_service)
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(node)
        self._thread = threading.Thread(target=self._spin, name="monitor", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException
        try:
            self._executor.spin()
        except ExternalShutdownException:
            pass

    def now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def _on_command(self, msg: Any) -> None:
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        self.commands.append((stamp, np.asarray(msg.velocity, dtype=np.float64)))

    def _on_diagnostics(self, msg: Any) -> None:
        self.diagnostics_seen += 1
        for status in msg.status:
            level = status.level[0] if isinstance(status.level, (bytes, bytearray)) else int(status.level)
            values = {kv.key: kv.value for kv in status.values}
            if status.name.endswith(": tick"):
                if self.recording and self.record_ticks:
                    self.ticks.append(TickRecord(
                        t=float(values.get("t", "nan")), level=level, message=status.message,
                        used=tuple(values.get(f"{m}.used") == "1" for m in MODALITIES),
                        stamps=tuple(_float(values.get(f"{m}.stamp", "nan")) for m in MODALITIES),
                        held=values.get("held") == "True"))
            else:
                self.reports[status.name] = (level, status.message, values)

    def watch(self, topic: str, msg_type: Any, qos: Any = 10) -> deque:
        """Record the header stamps of another topic (e.g. /scan, to know when a sensor stopped)."""
        stamps: deque = deque(maxlen=100000)
        self.stamps[topic] = stamps
        self.node.create_subscription(
            msg_type, topic, lambda m: stamps.append(m.header.stamp.sec + m.header.stamp.nanosec * 1e-9), qos)
        return stamps

    def wait_for(self, predicate: Callable[[], bool], timeout: float, poll: float = 0.05,
                 alive: Callable[[], None] | None = None) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if alive is not None:
                alive()
            time.sleep(poll)
        return predicate()

    def publish_estop(self, active: bool) -> float:
        """Send the e-stop; returns the ROS time just before sending."""
        from std_msgs.msg import Bool
        t = self.now()
        self._estop.publish(Bool(data=bool(active)))
        return t

    def set_enabled(self, enabled: bool, timeout: float = 10.0) -> tuple[bool, str]:
        from std_srvs.srv import SetBool
        if not self._enable.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f"service {self.cfg.outputs.enable_service} not available after {timeout} s")
        future = self._enable.call_async(SetBool.Request(data=bool(enabled)))
        deadline = time.monotonic() + timeout
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not future.done():
            raise TimeoutError(f"{self.cfg.outputs.enable_service} did not answer within {timeout} s")
        response = future.result()
        return bool(response.success), str(response.message)

    def close(self) -> None:
        import rclpy
        self._executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=2.0)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


# ---------------------------------------------------------------- summary

def window_summary(monitor: Monitor, t0: float, t1: float, target_hz: float) -> dict:
    """What the monitor saw between ROS times t0 and t1: ticks, masks, holds, commands."""
    ticks = [r for r in monitor.ticks if t0 <= r.t <= t1]
    commands = [(s, v) for s, v in monitor.commands if t0 <= s <= t1]
    out: dict[str, Any] = {"window_s": round(t1 - t0, 3), "ticks": len(ticks)}
    if len(ticks) > 1:
        span = ticks[-1].t - ticks[0].t
        out["achieved_hz"] = round((len(ticks) - 1) / span, 3) if span > 0 else None
        used = np.array([r.used for r in ticks], dtype=bool)
        out["mask_rate"] = {m: round(float(1.0 - used[:, i].mean()), 4) for i, m in enumerate(MODALITIES)}
        out["held_share"] = round(float(np.mean([r.held for r in ticks])), 4)
    if commands:
        values = np.stack([v for _, v in commands])
        out["commands"] = {"count": len(commands), "all_finite": bool(np.isfinite(values).all()),
                           "min": values.min(axis=0).round(4).tolist(), "max": values.max(axis=0).round(4).tolist(),
                           "mean": values.mean(axis=0).round(4).tolist(),
                           "nonzero_share": round(float((np.abs(values).max(axis=1) > 0).mean()), 4)}
    out["target_hz"] = target_hz
    return out


def tick_times_in(stats: dict, t0: float, t1: float) -> np.ndarray:
    """The fusion node's tick durations (s) whose tick time lies in [t0, t1]."""
    t = np.asarray(stats.get("tick_t", []), dtype=np.float64)
    s = np.asarray(stats.get("tick_s", []), dtype=np.float64)
    n = min(len(t), len(s))
    keep = (t[:n] >= t0) & (t[:n] <= t1)
    return s[:n][keep]


def lost_messages(published: dict[str, int], received: dict[str, int]) -> dict[str, dict[str, int]]:
    return {m: {"published": n, "received": int(received.get(m, 0)), "lost": max(0, n - int(received.get(m, 0)))}
            for m, n in sorted(published.items())}


def _pct(values_s: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values_s, q)) * 1e3, 4) if len(values_s) else None


# ---------------------------------------------------------------- the demo

def run_live(config: str | Path, duration: float, workdir: str | Path, *, say: Callable[[str], None] = print,
             wait_for_subscribers: bool = True, extra_fusion: dict[str, Any] | None = None) -> dict:
    """Start the pipeline, watch it for ``duration`` seconds, stop it; returns the summary dict."""
    from .config import load_config

    cfg = load_config(config)
    workdir = Path(workdir)
    video = make_video(workdir / "live_camera.avi")
    wav = make_wav(workdir / "live_microphone.wav", rate=cfg.inputs.audio.source_rate)
    stats_path = workdir / "fusion_stats.json"
    stats_path.unlink(missing_ok=True)
    pipeline = LivePipeline(workdir / "logs", config)
    apply_ros_env(pipeline.env)
    audio_type = audio_type_here(cfg.inputs.audio.type)
    wait = 1 if wait_for_subscribers else 0
    fusion_overrides = {"safety.start_enabled": True, "inputs.audio.type": audio_type, **(extra_fusion or {})}
    monitor = Monitor(cfg)
    try:
        with pipeline:
            say(f"live: starting {FUSION} (domain {pipeline.env['ROS_DOMAIN_ID']}, Fast DDS profile "
                f"{Path(pipeline.env[procs.PROFILE_ENV]).name}); the first start exports the ONNX model")
            fusion = pipeline.start(FUSION, fusion_overrides, env=fusion_env(stats_path))
            if not monitor.wait_for(lambda: monitor.diagnostics_seen > 0, READY_TIMEOUT_S,
                                    alive=pipeline.check_alive):
                raise RuntimeError(f"{FUSION} published no diagnostics within {READY_TIMEOUT_S:.0f} s; "
                                   f"see {fusion.log_path}")
            say("live: fusion_node is ticking; starting camera_node (video file), microphone_node (WAV file), "
                "sensor_sim_node (LiDAR, IMU, joint states)")
            pipeline.start("camera_node", {"source": str(video), "wait_for_subscribers": wait})
            pipeline.start("microphone_node", {"source": str(wav), "type": audio_type, "wait_for_subscribers": wait})
            pipeline.start("sensor_sim_node", {"wait_for_subscribers": wait})
            # Counting starts once every required input is flowing, so start-up is not in the figures.
            monitor.reports.clear()
            monitor.wait_for(lambda: monitor.reports.get("mm_fusion: inputs", (1,))[0] == 0, 30.0,
                             alive=pipeline.check_alive)
            t0 = monitor.now()
            monitor.recording = True
            say(f"live: running for {duration:.0f} s (cadence report every second)")
            end = time.monotonic() + duration
            next_print = time.monotonic() + 1.0
            while time.monotonic() < end:
                time.sleep(min(0.05, max(0.0, end - time.monotonic())))
                pipeline.check_alive()
                if time.monotonic() >= next_print:
                    next_print += 1.0
                    say("  " + _report_line(monitor))
            t1 = monitor.now()
            monitor.recording = False
            for name in reversed(SENSOR_NODES):  # producers first, so nothing is in flight when fusion stops
                pipeline.stop(name)
            time.sleep(0.5)
            code = pipeline.stop(FUSION)
        published: dict[str, int] = {}
        for name in SENSOR_NODES:
            published.update((pipeline.procs[name].stats() or {}).get("published", {}))
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        summary = _summary(cfg, monitor, stats, published, t0, t1)
        summary["exit_codes"] = dict(pipeline.exit_codes)
        summary["fusion_exit_code"] = code
    finally:
        monitor.close()
    for line in summary_lines(summary):
        say(line)
    return summary


def _report_line(monitor: Monitor) -> str:
    parts = []
    for name in ("mm_fusion: cadence", "mm_fusion: inputs", "mm_fusion: safety"):
        if name in monitor.reports:
            level, message, _ = monitor.reports[name]
            parts.append(f"{name.split(': ')[1]}: {message}" + (" [WARN]" if level == 1 else " [ERROR]" if level else ""))
    return " | ".join(parts) or "waiting for diagnostics"


def _summary(cfg: RobotConfig, monitor: Monitor, stats: dict, published: dict, t0: float, t1: float) -> dict:
    window = window_summary(monitor, t0, t1, cfg.control_rate_hz)
    tick_s = tick_times_in(stats, t0, t1)
    budget = 1.0 / cfg.control_rate_hz
    camera = np.asarray(stats.get("camera_transport_s", []), dtype=np.float64)
    runtime = stats.get("summary", {})
    return {
        **window,
        "tick_ms": {"p50": _pct(tick_s, 50), "p99": _pct(tick_s, 99),
                    "max": round(float(tick_s.max()) * 1e3, 4) if len(tick_s) else None},
        "over_budget_share": round(float((tick_s > budget).mean()), 5) if len(tick_s) else None,
        "camera_transport_ms": {"p50": _pct(camera, 50), "p99": _pct(camera, 99), "n": int(len(camera))},
        "messages": lost_messages(published, stats.get("received", {})),
        "drops": runtime.get("drops", {}), "bad": stats.get("bad", {}),
        "stage_ms": runtime.get("stage_ms", {}),
    }


def summary_lines(s: dict) -> list[str]:
    lines = []
    rate = s.get("achieved_hz")
    tick = s.get("tick_ms", {})
    over = s.get("over_budget_share")
    lines.append(f"summary: {s.get('ticks', 0)} ticks in {s.get('window_s', 0):.1f} s: "
                 f"{rate if rate is not None else '-'} Hz achieved (target {s.get('target_hz'):g}), "
                 f"tick p50 {tick.get('p50')} ms, p99 {tick.get('p99')} ms, max {tick.get('max')} ms, "
                 f"over budget {100 * over:.2f}%" if over is not None else "summary: no ticks recorded")
    masks = s.get("mask_rate", {})
    lines.append("summary: masked " + ", ".join(f"{m} {100 * r:.1f}%" for m, r in masks.items())
                 + f"; watchdog held {100 * s.get('held_share', 0):.1f}% of ticks")
    msgs = s.get("messages", {})
    lost = ", ".join(f"{m} {v['lost']}/{v['published']}" for m, v in msgs.items())
    drops = s.get("drops", {})
    lines.append(f"summary: lost (published - received) {lost or '-'}; dropped {sum(drops.values())}"
                 + (f" {drops}" if drops else "")
                 + f"; camera transport p50 {s.get('camera_transport_ms', {}).get('p50')} ms")
    cmd = s.get("commands")
    if cmd:
        lines.append(f"summary: {cmd['count']} commands, all finite: {cmd['all_finite']}, non-zero "
                     f"{100 * cmd['nonzero_share']:.0f}%, per-DOF min {cmd['min']} max {cmd['max']}")
    else:
        lines.append("summary: no commands were published")
    return lines


def cmd_live(args: Any, cfg: RobotConfig) -> int:
    """``mm-fusion live``: the demo."""
    if args.duration <= 0:
        print("mm-fusion: --duration must be positive")
        return 2
    summary = run_live(args.config, args.duration, args.workdir)
    out = write_json_atomic(Path(args.workdir) / "live_demo.json", summary)
    print(f"wrote {out}")
    ok = summary.get("fusion_exit_code") == 0 and summary.get("commands", {}).get("all_finite", False)
    return 0 if ok else 1


def add_live_command(add: Callable[[str, str], Any]) -> None:
    """Register ``live`` on the mm-fusion parser (``add(name, help)`` returns a subparser with --config)."""
    p = add("live", "run the live ROS 2 pipeline (camera, microphone, LiDAR, IMU -> fusion_node) and summarise")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of running after start-up (default 20)")
    p.add_argument("--workdir", default="artifacts/live", help="generated media, logs and the summary JSON")
    p.set_defaults(func=cmd_live)
