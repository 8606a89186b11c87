"""Every node's parameters in one place: typed dataclasses, declared on the node, read back validated.

``config/robot.yaml`` is the single source of defaults (one block per node;
the simulated cell's ``sim_node`` is in ``config/sim.yaml``); the dataclass
defaults mirror it, and ``declare_config`` declares one ROS parameter per leaf
field with ``declare_parameter`` (dotted names, e.g.
``inputs.camera.topic``), so ``--params-file config/robot.yaml`` and ``-p``
overrides work as everywhere in ROS 2. The values are read back into the frozen
dataclass and validated by ``mm_fusion_ros.config``; a wrong type, an
impossible value or an unknown key (a typo in the YAML) is a ``ConfigError``
naming the key, and ``node_main`` turns it into one fatal log line and exit
status 2 instead of a node running on a half-understood configuration.

Parameters are read once at start, so they are declared read-only: a later
``ros2 param set`` is refused instead of being silently ignored. ``dynamic_typing``
lets YAML write ``100`` for a float; the config layer checks the types.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import signal
import sys
import threading
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, TypeVar

# _build is config.py's dataclass builder: one set of type checks and error messages for every node.
from ..config import DEFAULT_JOINTS, ConfigError, RobotConfig, _build, check_topic_name, config_from_dict
from ..memory import keep_freed_memory
from ..sim.config import CellConfig

T = TypeVar("T")

# Parameters rclpy itself declares or interprets; never "unknown".
_ROS_OWNED = ("use_sim_time", "start_type_description_service")
_ROS_OWNED_PREFIXES = ("qos_overrides.",)

QosName = Literal["reliable", "best_effort"]
AudioType = Literal["audio_data_stamped", "audio_stamped", "image_pcm"]


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _check_topic(topic: str, key: str) -> None:
    check_topic_name(topic, key)


# ---------------------------------------------------------------- sensor node configurations

def _check_publisher(depth: int, wait_for_subscribers: int, p: str, max_depth: int) -> None:
    """The publishing settings every sensor node has: queue depth and subscribers to wait for."""
    _check(1 <= depth <= max_depth, f"{p}depth", f"must be in [1, {max_depth}], got {depth}")
    _check(wait_for_subscribers >= 0, f"{p}wait_for_subscribers", "must be >= 0")


@dataclass(frozen=True)
class CameraNodeConfig:
    """camera_node: an OpenCV VideoCapture source published as sensor_msgs/Image."""

    source: str = "0"             # device index ("0"), video file path, or URL / GStreamer pipeline
    topic: str = "camera/image_raw"
    frame_id: str = "camera"
    encoding: Literal["rgb8", "bgr8"] = "rgb8"
    fps: float = 0.0              # 0: the file's own frame rate (a device paces itself)
    width: int = 0                # 0: the source's size; otherwise frames are resized (a device is asked first)
    height: int = 0
    loop: bool = True             # a video file starts again at its end
    qos: QosName = "reliable"
    depth: int = 10
    # Publish only once this many subscribers have matched (tests and benchmarks count every message).
    wait_for_subscribers: int = 0

    def validate(self, key: str = "") -> None:
        p = f"{key}." if key else ""
        _check(self.source != "", f"{p}source", "must name a device index, a file or a URL")
        _check_topic(self.topic, f"{p}topic")
        _check(math.isfinite(self.fps) and 0 <= self.fps <= 1000, f"{p}fps", f"must be in [0, 1000], got {self.fps}")
        _check((self.width == 0) == (self.height == 0), f"{p}width",
               f"width and height are both 0 (source size) or both set, got {self.width}x{self.height}")
        _check(0 <= self.width <= 8192 and 0 <= self.height <= 8192, f"{p}width",
               f"must be in [0, 8192], got {self.width}x{self.height}")
        _check_publisher(self.depth, self.wait_for_subscribers, p, max_depth=1000)


@dataclass(frozen=True)
class MicrophoneNodeConfig:
    """microphone_node: PortAudio capture (sounddevice) or a WAV file, in fixed chunks."""

    source: str = "default"       # "default", a PortAudio device index or name, or a path ending in .wav
    topic: str = "audio/audio_stamped"
    type: AudioType = "audio_data_stamped"   # falls back to image_pcm where audio_common_msgs is missing
    info_topic: str = "audio/audio_info"
    frame_id: str = "microphone"
    sample_rate: int = 16000      # capture rate (a WAV file brings its own)
    channels: int = 1
    sample_format: Literal["S16LE", "F32LE"] = "S16LE"
    chunk_s: float = 0.02         # one message per 20 ms of audio
    loop: bool = True             # a WAV file starts again at its end
    qos: QosName = "reliable"
    depth: int = 100
    wait_for_subscribers: int = 0

    def validate(self, key: str = "") -> None:
        p = f"{key}." if key else ""
        _check(self.source != "", f"{p}source", "must be 'default', a device or a .wav path")
        _check_topic(self.topic, f"{p}topic")
        _check_topic(self.info_topic, f"{p}info_topic")
        _check(1000 <= self.sample_rate <= 384000, f"{p}sample_rate",
               f"must be in [1000, 384000] Hz, got {self.sample_rate}")
        _check(1 <= self.channels <= 32, f"{p}channels", f"must be in [1, 32], got {self.channels}")
        _check(0.001 <= self.chunk_s <= 1.0, f"{p}chunk_s", f"must be in [0.001, 1] s, got {self.chunk_s}")
        _check_publisher(self.depth, self.wait_for_subscribers, p, max_depth=10000)


@dataclass(frozen=True)
class SimLidar:
    enabled: bool = True
    topic: str = "scan"
    frame_id: str = "laser"
    rate_hz: float = 10.0
    beams: int = 360
    range_min: float = 0.05
    range_max: float = 30.0
    stop_after_s: float = 0.0     # > 0: the stream stops after this long (a dead driver, for watchdog tests)


@dataclass(frozen=True)
class SimImu:
    enabled: bool = True
    topic: str = "imu/data"
    frame_id: str = "imu_link"
    rate_hz: float = 200.0
    stop_after_s: float = 0.0


@dataclass(frozen=True)
class SimJoints:
    enabled: bool = True
    topic: str = "joint_states"
    rate_hz: float = 100.0
    names: tuple[str, ...] = DEFAULT_JOINTS
    stop_after_s: float = 0.0


@dataclass(frozen=True)
class SensorSimConfig:
    """sensor_sim_node: synthetic LaserScan, Imu and JointState streams from mm_fusion_ros.synthetic."""

    seed: int = 0
    lidar: SimLidar = field(default_factory=SimLidar)
    imu: SimImu = field(default_factory=SimImu)
    joint_states: SimJoints = field(default_factory=SimJoints)
    qos: QosName = "reliable"
    depth: int = 10
    wait_for_subscribers: int = 0

    def validate(self, key: str = "") -> None:
        p = f"{key}." if key else ""
        for name in ("lidar", "imu", "joint_states"):
            stream = getattr(self, name)
            _check_topic(stream.topic, f"{p}{name}.topic")
            _check(math.isfinite(stream.rate_hz) and 0 < stream.rate_hz <= 2000, f"{p}{name}.rate_hz",
                   f"must be in (0, 2000] Hz, got {stream.rate_hz}")
            _check(stream.stop_after_s >= 0, f"{p}{name}.stop_after_s", f"must be >= 0, got {stream.stop_after_s}")
        _check(len(self.joint_states.names) >= 1 and len(set(self.joint_states.names)) == len(self.joint_states.names),
               f"{p}joint_states.names", f"must be unique joint names, got {list(self.joint_states.names)}")
        _check(8 <= self.lidar.beams <= 100000, f"{p}lidar.beams", f"must be in [8, 100000], got {self.lidar.beams}")
        _check(0 <= self.lidar.range_min < self.lidar.range_max, f"{p}lidar.range_min",
               f"must satisfy 0 <= range_min < range_max, got {self.lidar.range_min} / {self.lidar.range_max}")
        _check_publisher(self.depth, self.wait_for_subscribers, p, max_depth=10000)


@dataclass(frozen=True)
class SimTopics:
    """sim_node's topics: the drivers' and the controller's of a real cell (config/sim.yaml's fusion_node block)."""

    camera: str = "camera/image_raw"           # image_transport base topic: rgb8 here, jpeg on <camera>/compressed
    audio: str = "audio/audio_stamped"
    audio_info: str = "audio/audio_info"       # latched AudioInfo (audio_data_stamped only)
    lidar: str = "scan"
    imu: str = "imu/data"
    joint_states: str = "joint_states"
    command: str = "mm_fusion/action"          # std_msgs/Float64MultiArray, 7 joint velocities (rad/s)
    estop: str = "mm_fusion/estop"             # std_msgs/Bool
    episode: str = "sim/episode"               # std_msgs/String, one JSON object per finished episode
    reset: str = "sim/reset"                   # std_srvs/Trigger: the next episode now


@dataclass(frozen=True)
class SimNodeConfig:
    """sim_node's own parameters (``node.`` in its block of config/sim.yaml); the cell's are beside them."""

    rate_factor: float = 1.0      # sim seconds per wall second (1.0: real time)
    step_s: float = 0.005         # sim seconds per pacing step: /clock and sensor delivery granularity
    auto_reset: bool = True       # after an episode ends the next starts (seed, seed + 1, ...); else hold
    episodes: int = 0             # shut down after this many episodes; 0: run until stopped
    expert: bool = False          # the scripted expert drives the arm; the command topic is ignored
    audio_type: AudioType = "audio_data_stamped"   # falls back to image_pcm where audio_common_msgs is missing
    qos: QosName = "reliable"     # sensors; reliable matches reliable and best_effort subscribers alike
    depth: int = 50
    log_period_s: float = 10.0    # a status line this often (wall seconds)
    # Hold the clock at the episode's start until this many subscribers have matched /clock.
    wait_for_subscribers: int = 0
    topics: SimTopics = field(default_factory=SimTopics)

    def validate(self, key: str = "") -> None:
        p = f"{key}." if key else ""
        _check(0 < self.rate_factor <= 100, f"{p}rate_factor",
               f"must be in (0, 100] sim seconds per wall second, got {self.rate_factor}")
        _check(0.001 <= self.step_s <= 0.02, f"{p}step_s", f"must be in [0.001, 0.02] s, got {self.step_s}")
        _check(self.episodes >= 0, f"{p}episodes", f"must be >= 0 (0: forever), got {self.episodes}")
        _check(0.1 <= self.log_period_s <= 3600, f"{p}log_period_s",
               f"must be in [0.1, 3600] s, got {self.log_period_s}")
        for f in dataclasses.fields(self.topics):
            _check_topic(getattr(self.topics, f.name), f"{p}topics.{f.name}")
        _check_publisher(self.depth, self.wait_for_subscribers, p, max_depth=10000)


@dataclass(frozen=True)
class SimNodeParameters(CellConfig):
    """Every sim_node parameter: the cell's (``mm_fusion_ros.sim.config``, read by ``mm-fusion record`` too)
    and the node's own under ``node.``."""

    node: SimNodeConfig = field(default_factory=SimNodeConfig)

    def validate(self) -> None:
        super().validate()
        self.node.validate("node")
        steps = self.node.step_s / self.physics.timestep
        _check(abs(steps - round(steps)) < 1e-6, "node.step_s",
               f"must be a whole number of physics steps (physics.timestep={self.physics.timestep}), "
               f"got {self.node.step_s}")

    def cell(self) -> CellConfig:
        """The cell's configuration alone (what ``load_cell_config`` reads from the same block)."""
        return CellConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CellConfig)})


# Executable (= node name) -> the dataclass holding its parameters.
NODE_CONFIGS: dict[str, type] = {
    "fusion_node": RobotConfig,
    "camera_node": CameraNodeConfig,
    "microphone_node": MicrophoneNodeConfig,
    "sensor_sim_node": SensorSimConfig,
    "sim_node": SimNodeParameters,
}


# ---------------------------------------------------------------- dataclass <-> flat parameter names

def _ros_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def parameter_defaults(cls: type) -> dict[str, Any]:
    """Dotted parameter name -> default value (lists for tuples), for every leaf field of ``cls``."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            name = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, f"{name}.")
            else:
                out[name] = _ros_value(value)

    walk(cls(), "")
    return out


def declared_names(executable: str) -> set[str]:
    """Every parameter the node behind ``executable`` declares (including rclpy's use_sim_time)."""
    if executable not in NODE_CONFIGS:
        raise KeyError(f"unknown node executable {executable!r}; known: {sorted(NODE_CONFIGS)}")
    return set(parameter_defaults(NODE_CONFIGS[executable])) | {"use_sim_time"}


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def build_config(cls: type[T], flat: dict[str, Any]) -> T:
    """Validated ``cls`` from dotted parameter values; ConfigError names the bad key."""
    if cls is RobotConfig:
        return typing.cast(T, config_from_dict(nest(flat)))
    cfg = _build(cls, nest(flat), "")
    cfg.validate()
    return cfg


def _plain(value: Any) -> Any:
    # Array parameters can come back as array.array; the config layer expects lists.
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return list(value) if isinstance(value, tuple) else value


def _leaf_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted parameter name -> the dataclass field's type, for every leaf of ``cls``."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaf_types(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def _ros_type(tp: Any) -> int:
    from rcl_interfaces.msg import ParameterType as P

    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        return {float: P.PARAMETER_DOUBLE_ARRAY, int: P.PARAMETER_INTEGER_ARRAY, bool: P.PARAMETER_BOOL_ARRAY}.get(
            item, P.PARAMETER_STRING_ARRAY)
    if typing.get_origin(tp) is Literal:
        return P.PARAMETER_STRING
    return {bool: P.PARAMETER_BOOL, int: P.PARAMETER_INTEGER, float: P.PARAMETER_DOUBLE}.get(tp, P.PARAMETER_STRING)


def _for_ros(value: Any, tp: Any) -> Any:
    """A value as its declared type holds it: YAML's ``100`` for a float parameter is 100.0 (the config layer
    accepts it, as the CLI does); anything else is left for the config layer to judge and name."""
    value = _plain(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is float and isinstance(value, list):
        return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return value


def yaml_descriptions(path: Any, node_name: str) -> dict[str, str]:
    """Dotted key -> the comment written for it in a parameters file's block for ``node_name``: the comment
    beside the key (continued on the lines below it, indented past the key), and a comment block on the
    lines just above it. The YAML file is where every parameter is documented once; ``ros2 param
    describe`` shows the same words."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        return {}
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    last: tuple[str, int] | None = None      # the previous key with an inline comment, and its indent
    above: list[str] = []                    # a comment block waiting for the key below it
    inside = False
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if not stripped:
            above, last = [], None
            continue
        if stripped.startswith("#"):
            text = stripped.lstrip("# ")
            if last is not None and indent > last[1] + 2:   # under the comment beside the key: its continuation
                out[last[0]] = f"{out[last[0]]} {text}"
            elif indent > 0:
                above.append(text)
                last = None
            continue
        if indent == 0:
            inside = stripped.split(":")[0] == node_name
            stack, last, above = [], None, []
            continue
        if not inside or ":" not in stripped:
            continue
        key, _, rest = stripped.partition(":")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key.strip()))
        parts = [k for _, k in stack]
        if parts[0] == "ros__parameters":
            parts = parts[1:]
        comment = rest.partition("#")[2].strip() if "#" in rest else ""
        if parts:
            dotted = ".".join(parts)
            text = " ".join(above + ([comment] if comment else []))
            if text:
                out[dotted] = text
            last = (dotted, indent) if comment else None
        above = []
    return out


def default_descriptions(cls: type) -> dict[str, str]:
    """The comments of the shipped parameters file's block for the executable behind ``cls``."""
    from ..procs import config_file

    executable = next((name for name, c in NODE_CONFIGS.items() if c is cls), None)
    if executable is None:
        return {}
    try:
        path = config_file("sim.yaml" if executable == "sim_node" else "robot.yaml")
    except FileNotFoundError:
        return {}
    return yaml_descriptions(path, executable)


def declare_config(node: Any, cls: type[T], *, writable: tuple[str, ...] = (),
                   ranges: dict[str, tuple[float, float]] | None = None, descriptions: dict[str, str] | None = None) -> T:
    """Declare every field of ``cls`` on ``node`` with its type, a description, its range and read-only
    unless named in ``writable``, and return the validated values.

    The node must be created with ``automatically_declare_parameters_from_overrides=True``: the values
    of ``--params-file`` and ``-p`` are then declared parameters, which is how unknown names (a typo in
    the YAML) are found without rclpy's private state. Each is read, checked by the config layer
    (ConfigError naming the key: unknown names, wrong types, impossible values), then declared again
    with its descriptor. Raises ConfigError.
    """
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
    from rcl_interfaces.msg import ParameterType as P

    defaults = parameter_defaults(cls)
    types_ = _leaf_types(cls)
    given = set(node.list_parameters([], 0).names)
    unknown = sorted(name for name in given
                     if name not in defaults and name not in _ROS_OWNED and not name.startswith(_ROS_OWNED_PREFIXES))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, defaults, n=1)
            hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise ConfigError(f"unknown parameter(s) for {node.get_name()}: {', '.join(hints)}")
    values = {name: _for_ros(node.get_parameter(name).value if name in given else default, types_[name])
              for name, default in defaults.items()}
    cfg = build_config(cls, values)     # refuses what is wrong, naming the key, before anything is declared
    ranges = ranges or {}
    descriptions = descriptions if descriptions is not None else default_descriptions(cls)
    for name, value in values.items():
        if name in _ROS_OWNED:   # use_sim_time: rclpy's own parameter, declared and described by rclpy
            continue
        tp = types_[name]
        text = descriptions.get(name, "")
        if typing.get_origin(tp) is Literal:
            text = f"{text} (one of {', '.join(map(str, typing.get_args(tp)))})".strip()
        descriptor = ParameterDescriptor(name=name, type=_ros_type(tp), description=text or name,
                                         read_only=name not in writable)
        if name in ranges:
            lo, hi = ranges[name]
            descriptor.additional_constraints = f"in [{lo}, {hi}]"
            if tp is int:
                descriptor.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=0)]
            elif tp is float:
                descriptor.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi),
                                                                      step=0.0)]
        if isinstance(value, list) and not value:   # an empty list has no element type to check against
            descriptor.type = P.PARAMETER_NOT_SET
            descriptor.dynamic_typing = True
        if name in given:
            node.undeclare_parameter(name)
        try:
            node.declare_parameter(name, value, descriptor, ignore_override=True)
        except Exception as exc:  # a range that the config layer's checks let through, or a type rclpy refuses
            raise ConfigError(f"{name}: {exc}") from None
    return cfg


# ---------------------------------------------------------------- message types chosen by parameters

def audio_message_types(kind: str) -> tuple[str, Any, Any]:
    """(kind actually used, message type, info type or None); image_pcm when audio_common_msgs is missing."""
    from sensor_msgs.msg import Image

    try:
        if kind == "audio_data_stamped":
            from audio_common_msgs.msg import AudioDataStamped, AudioInfo
            return kind, AudioDataStamped, AudioInfo
        if kind == "audio_stamped":
            from audio_common_msgs.msg import AudioStamped
            return kind, AudioStamped, None
    except ImportError:
        return "image_pcm", Image, None
    return "image_pcm", Image, None


# ---------------------------------------------------------------- running a node

def spin_until_stopped(executor: Any, stop: threading.Event, poll_s: float = 0.1) -> None:
    """Spin until ``stop`` is set or the context shuts down; a callback in progress always completes."""
    from rclpy.executors import ExternalShutdownException, ShutdownException

    try:
        while not stop.is_set() and executor.context.ok():
            executor.spin_once(timeout_sec=poll_s)
    except (ExternalShutdownException, ShutdownException):
        pass


class Spinner:
    """One executor for one node, spun until ``stopping`` is set; ``close`` waits for the spin to end."""

    def __init__(self, node: Any):
        self.node = node
        self.stopping = threading.Event()
        self._done = threading.Event()
        self.executor: Any = None

    def spin(self) -> None:
        from rclpy.executors import SingleThreadedExecutor

        self.executor = SingleThreadedExecutor(context=self.node.context)
        self.executor.add_node(self.node)
        try:
            spin_until_stopped(self.executor, self.stopping)
        finally:
            self._done.set()

    def close(self) -> None:
        self.stopping.set()
        if self.executor is not None:
            self._done.wait(timeout=2.0)
            self.executor.shutdown(timeout_sec=1.0)


def node_main(name: str, make_node: Callable[[], Any], args: list[str] | None = None) -> int:
    """init, build the node, spin until SIGINT/SIGTERM, clean up; 2 for a bad config, 1 for a failed start.

    ``make_node`` returns one of the node classes here: ``spin()``, ``close()`` and a ``stopping`` event.
    SIGINT and SIGTERM only set ``stopping``: the callback that is running finishes (a message is never
    half published or half counted), then the node closes and prints its statistics. A second signal
    interrupts at once.
    """
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    keep_freed_memory()   # before the first frame buffer: see mm_fusion_ros.memory
    logger = rclpy.logging.get_logger(name)
    node = None
    try:
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
        try:
            node = make_node()
        except ConfigError as exc:
            logger.fatal(f"bad config: {exc}")
            return 2
        except Exception as exc:  # a node that cannot start says why in one line, then exits non-zero
            logger.fatal(f"failed to start: {type(exc).__name__}: {exc}")
            return 1

        def request_stop(signum: int, frame: Any) -> None:
            if node.stopping.is_set():
                raise KeyboardInterrupt
            node.stopping.set()

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        node.spin()
        return 0
    except KeyboardInterrupt:  # before the node existed (a long start-up), or a second signal
        return 0
    finally:
        if node is not None:
            try:
                node.close()
            except KeyboardInterrupt:
                pass
        rclpy.try_shutdown()
        sys.stdout.flush()
