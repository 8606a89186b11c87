import dataclasses
import os

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))
# The shipped Fast DDS profile (whole camera frames over shared memory, UDP on loopback only), as the
# launch file and mm_fusion_ros.procs use it: in-process tests run on the transport the product ships.
os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config",
                                   "fastdds_shm.xml"))

# Shared fixtures for the model-level tests (these need no ROS).

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
ROBOT_YAML = REPO_ROOT / "config" / "robot.yaml"


@pytest.fixture(scope="session")
def robot_yaml() -> Path:
    return ROBOT_YAML


@pytest.fixture(scope="session")
def default_config():
    """The RobotConfig loaded from config/robot.yaml, its topic names resolved as a node in the root
    namespace resolves them (what bags hold)."""
    from mm_fusion_ros.config import load_config
    return load_config(ROBOT_YAML).absolute()


def random_inputs(cfg, seed: int = 0, batch: int = 1, as_torch: bool = True) -> dict:
    """A dict of inputs matching ``input_specs(cfg, batch)``, plausible for each sensor.

    ``cfg`` is a ModelConfig. All modalities present (mask of ones), dt = 10 ms with a
    little jitter, a small random recurrent state. Returns torch tensors unless
    ``as_torch`` is False (then numpy arrays of the spec dtypes).
    """
    from mm_fusion_ros.model import input_specs

    rng = np.random.default_rng(seed)
    specs = {s.name: s for s in input_specs(cfg, batch)}
    out: dict = {}
    out["camera"] = rng.integers(0, 256, size=specs["camera"].shape, dtype=np.uint8)
    n = specs["audio"].shape[1]
    t = np.arange(n) / cfg.audio.sample_rate
    freq = rng.uniform(100.0, 3000.0, size=(batch, 1))
    out["audio"] = (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal((batch, n)))
    imu = rng.standard_normal(specs["imu"].shape)
    imu[..., 2] += 9.81
    out["imu"] = imu
    out["lidar"] = rng.uniform(cfg.lidar.range_min, cfg.lidar.range_max, size=specs["lidar"].shape)
    dof = specs["joint_state"].shape[1] // 2
    out["joint_state"] = np.concatenate([rng.uniform(-2.0, 2.0, size=(batch, dof)),
                                         rng.uniform(-1.0, 1.0, size=(batch, dof))], axis=1)
    out["mask"] = np.ones(specs["mask"].shape)
    out["dt"] = 0.01 + 0.002 * rng.uniform(-1.0, 1.0, size=specs["dt"].shape)
    out["state"] = 0.5 * rng.standard_normal(specs["state"].shape)
    out["audio_frames"] = 0.5 + 0.4 * rng.standard_normal(specs["audio_frames"].shape)  # (dB + 40) / 40 scale
    for name, spec in specs.items():
        out[name] = np.ascontiguousarray(out[name], dtype=spec.dtype)
        assert out[name].shape == spec.shape
    if as_torch:
        import torch
        out = {k: torch.from_numpy(v) for k, v in out.items()}
    return out


@pytest.fixture(scope="session")
def make_inputs():
    """The ``random_inputs`` helper as a fixture: ``make_inputs(model_cfg, seed, batch)``."""
    return random_inputs


@pytest.fixture
def context():
    """A fresh rclpy context for one test (in-process nodes), shut down after it."""
    rclpy = pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install '.[ros]')")
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.try_shutdown(context=ctx)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def short_cell_config(folder: Path, seconds: float) -> Path:
    """config/sim.yaml with episodes of ``seconds``: enough of an episode for tests that need no outcome."""
    import yaml
    sim_yaml = Path(__file__).resolve().parents[1] / "config" / "sim.yaml"
    doc = yaml.safe_load(sim_yaml.read_text())
    doc["sim_node"]["ros__parameters"]["episode"]["time_limit_s"] = seconds
    path = folder / "sim_short.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# The plain policy the training tests exercise: config/sim.yaml's model with its task-reading parts off (joint space,
# a head on the fused vector, no pixel keypoints or cue memory, the IMU unfiltered). Those parts, the shipped
# policy's, have their own variants (``with_strategy``'s ``+cue+tool+memory+task``) and need targets that a
# minimal training run does not give.
PLAIN_POLICY = {("camera", "pixel_keypoints"): 0, ("imu", "high_pass"): False, ("fusion", "cue_memory"): False,
                ("action", "space"): "joint", ("action", "reads"): "fused"}


def plain_policy_config(folder: Path) -> Path:
    """config/sim.yaml with ``PLAIN_POLICY``'s model keys."""
    import yaml
    sim_yaml = Path(__file__).resolve().parents[1] / "config" / "sim.yaml"
    doc = yaml.safe_load(sim_yaml.read_text())
    model = doc["fusion_node"]["ros__parameters"]["model"]
    for (section, key), value in PLAIN_POLICY.items():
        model[section][key] = value
    path = folder / "sim_plain.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def with_strategy(cfg, strategy: str):
    """``strategy``, or ``<strategy>+keypoints`` / ``+audio_keypoints`` for that strategy with two keypoint
    queries from the fused state / from the audio cell's state, ``+cue`` with a cue read of 3 buttons, and
    ``+tool`` with a tool-space action head (at the Panda's ready pose as its rest posture), ``+memory`` with
    three pixel keypoints and the cue read's memory of the buttons in one more state slot, and the IMU
    high-passed (item 23's recipe), and ``+task`` with an action head that reads the task (the cue read and the
    phase flags; needs ``+cue+tool``)."""
    from mm_fusion_ros.sim.panda import READY_Q
    name, *extras = strategy.split("+")
    action = cfg.action if "tool" not in extras else dataclasses.replace(
        cfg.action, space="tool", rest=tuple(float(x) for x in READY_Q), reads="task" if "task" in extras else "fused")
    return dataclasses.replace(cfg, action=action, fusion=dataclasses.replace(
        cfg.fusion, strategy=name, keypoint_queries=2 if any(e.endswith("keypoints") for e in extras) else 0,
        keypoint_query_source="audio" if "audio_keypoints" in extras else "fused",
        cue_objects=3 if "cue" in extras else 0, cue_memory="memory" in extras),
        camera=dataclasses.replace(cfg.camera, pixel_keypoints=3 if "memory" in extras else 0),
        imu=dataclasses.replace(cfg.imu, high_pass="memory" in extras))


def load_script(name: str, path: Path):
    """A script that is not part of the package (bench/, examples/) imported as module ``name``."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
