"""config/robot.yaml and the typed loader in mm_fusion_ros.config.

The defaults are checked against the values the design mandates (written out
here, not read back from the code), and every kind of bad value is checked to be
refused with a ConfigError that names the offending dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import yaml

from mm_fusion_ros.config import (MODALITIES, ConfigError, ModelConfig, RobotConfig, config_from_dict, config_to_dict,
                                  load_config, model_config_from_dict)


@pytest.fixture()
def params(robot_yaml) -> dict:
    """A fresh deep copy of fusion_node.ros__parameters from robot.yaml, to mutate."""
    doc = yaml.safe_load(robot_yaml.read_text())
    return copy.deepcopy(doc["fusion_node"]["ros__parameters"])


def write_params(tmp_path, params: dict, name: str = "robot.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"fusion_node": {"ros__parameters": params}}, sort_keys=False))
    return path


def set_key(params: dict, dotted: str, value) -> dict:
    node = params
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return params


def assert_refused(tmp_path, params: dict, key: str, *fragments: str) -> str:
    """Both entry points (load_config on a file, config_from_dict) refuse, naming ``key``."""
    with pytest.raises(ConfigError) as from_dict:
        config_from_dict(copy.deepcopy(params))
    path = write_params(tmp_path, params)
    with pytest.raises(ConfigError) as from_file:
        load_config(path)
    for exc in (from_dict.value, from_file.value):
        msg = str(exc)
        # The dotted key must appear as a whole key, not as a prefix of a longer one.
        assert re.search(rf"(^|[\s'\"(]){re.escape(key)}($|[\s:'\"\[)])", msg), f"{key!r} not named in: {msg}"
        for fragment in fragments:
            assert fragment in msg, f"{fragment!r} not in: {msg}"
    assert str(path) in str(from_file.value), "load_config should say which file was bad"
    return str(from_dict.value)


# ---------------------------------------------------------------- the shipped file


def test_robot_yaml_loads_with_mandated_defaults(robot_yaml):
    cfg = load_config(robot_yaml)
    assert isinstance(cfg, RobotConfig)
    m = cfg.model
    assert (m.camera.height, m.camera.width) == (96, 96)
    assert m.audio.sample_rate == 16000
    assert m.audio.window_s == 1.0
    assert m.audio.window_samples == 16000
    assert (m.audio.n_fft, m.audio.hop, m.audio.n_mels) == (512, 160, 64)
    # Frames without centre padding: 1 + floor((16000 - 512) / 160).
    assert m.audio.n_frames == 1 + (16000 - 512) // 160 == 97
    assert m.imu.window_s == pytest.approx(0.2) and m.imu.rate_hz == 200.0
    assert m.imu.window_samples == 40
    assert m.lidar.beams == 360
    assert m.encoder.beta == 0.95
    assert m.encoder.num_spike_steps == 32
    assert m.action.names == tuple(f"joint_{i}" for i in range(1, 8))
    assert m.action.dof == 7
    assert len(m.action.lower) == len(m.action.upper) == 7
    assert all(lo < hi for lo, hi in zip(m.action.lower, m.action.upper))
    assert cfg.control_rate_hz == 100.0
    assert isinstance(cfg.control_rate_hz, float)


def test_yaml_is_a_ros2_params_file_and_that_mapping_is_what_is_parsed(robot_yaml, params, tmp_path):
    doc = yaml.safe_load(robot_yaml.read_text())
    # One block per node of the package (launch passes the same file to each), fusion_node's among them.
    assert "fusion_node" in doc
    assert all(set(block) == {"ros__parameters"} for block in doc.values())
    # Everything the loader returns comes from that mapping: the same values via config_from_dict ...
    assert config_from_dict(params) == load_config(robot_yaml)
    # ... and a change inside it shows up in the loaded config.
    set_key(params, "control_rate_hz", 50.0)
    set_key(params, "model.lidar.beams", 720)
    cfg = load_config(write_params(tmp_path, params))
    assert cfg.control_rate_hz == 50.0 and cfg.model.lidar.beams == 720
    # Keys outside fusion_node.ros__parameters are not configuration: another node's block is ignored.
    doc2 = {"other_node": {"ros__parameters": {"control_rate_hz": "junk"}},
            "fusion_node": {"ros__parameters": params}}
    path = tmp_path / "two_nodes.yaml"
    path.write_text(yaml.safe_dump(doc2))
    assert load_config(path).control_rate_hz == 50.0


def test_shipped_yaml_matches_dataclass_defaults(robot_yaml):
    """The YAML and the dataclass defaults agree, so an empty override means the shipped values."""
    assert load_config(robot_yaml) == config_from_dict({})
    assert config_from_dict({}) == RobotConfig()


def test_config_round_trips_through_dict(robot_yaml):
    cfg = load_config(robot_yaml)
    as_dict = config_to_dict(cfg)
    yaml.safe_dump(as_dict)  # plain data only
    assert config_from_dict(as_dict) == cfg
    assert model_config_from_dict(as_dict["model"]) == cfg.model


def test_ints_are_accepted_for_float_fields(params):
    set_key(params, "control_rate_hz", 200)
    set_key(params, "model.audio.window_s", 1)
    cfg = config_from_dict(params)
    assert cfg.control_rate_hz == 200.0 and isinstance(cfg.control_rate_hz, float)
    assert isinstance(cfg.model.audio.window_s, float)


def test_valid_non_default_values_are_accepted(params):
    set_key(params, "model.fusion.strategy", "early")
    set_key(params, "model.encoder.cfc_mode", "pure")
    set_key(params, "model.audio.n_fft", 1024)
    set_key(params, "model.audio.hop", 256)
    set_key(params, "model.audio.sample_rate", 22050)
    set_key(params, "model.audio.f_max", 11025.0)  # exactly Nyquist is fine
    set_key(params, "model.fusion.heads", 8)
    cfg = config_from_dict(params)
    assert cfg.model.fusion.strategy == "early" and cfg.model.encoder.cfc_mode == "pure"
    assert cfg.model.audio.f_max == 11025.0


# ---------------------------------------------------------------- refused configs


def test_unknown_key_is_refused_and_allowed_keys_listed(params, tmp_path):
    params["model"]["audio"]["nfft"] = 512  # typo of n_fft
    msg = assert_refused(tmp_path, params, "model.audio", "nfft")
    for allowed in ("n_fft", "hop", "n_mels", "sample_rate", "window_s", "f_min", "f_max"):
        assert allowed in msg


def test_unknown_top_level_key_is_refused(params, tmp_path):
    params["control_rate"] = 100.0
    msg = assert_refused(tmp_path, params, "top level", "control_rate")
    assert "control_rate_hz" in msg


@pytest.mark.parametrize("key, value, expected", [
    ("control_rate_hz", "100", "number"),
    ("control_rate_hz", True, "number"),          # a bool is not a number
    ("model.lidar.beams", 360.0, "int"),           # a float in an int field
    ("model.lidar.beams", True, "int"),
    ("model.audio.n_fft", "512", "int"),
    ("model.encoder.beta", False, "number"),
    ("engine.force_rebuild", 1, "bool"),           # an int is not a bool
    ("checkpoint", 3, "string"),
    ("model.action.names", "joint_1", "list"),
    ("model.fusion", "hybrid", "mapping"),
])
def test_wrong_type_is_refused(params, tmp_path, key, value, expected):
    set_key(params, key, value)
    assert_refused(tmp_path, params, key, expected)


def test_wrong_type_inside_a_list_names_the_element(params, tmp_path):
    set_key(params, "model.camera.channels", [8, 16.5, 32])
    assert_refused(tmp_path, params, "model.camera.channels[1]")


@pytest.mark.parametrize("key, value", [
    ("control_rate_hz", -100.0),
    ("control_rate_hz", 0.0),
    ("control_rate_hz", float("nan")),
    ("control_rate_hz", float("inf")),
    ("model.audio.f_max", 8000.5),                 # above Nyquist at 16 kHz
    ("model.audio.f_min", 9000.0),                 # above f_max
    ("model.audio.n_fft", 500),                    # not a multiple of 8
    ("model.audio.hop", 1024),                     # longer than n_fft
    ("model.encoder.beta", 1.5),
    ("model.encoder.beta", 0.0),
    ("model.encoder.num_spike_steps", 0),
    ("model.lidar.range_min", 40.0),               # above range_max
    ("model.camera.channels", []),
    ("model.camera.strides", [4, 2]),              # one stride fewer than stages
    ("model.camera.strides", [4, 3, 2]),           # not 1, 2 or 4
    ("model.camera.strides", [4, 4, 4]),           # 96 px / 64 = 1.5: below a 2x2 map
    ("model.fused_state_dim", 0),
    ("model.imu.window_s", 0.01),                  # 2 samples at 200 Hz
    ("model.fusion.rank", 0),
    ("model.camera.pixel_keypoints", -1),
    ("model.camera.pixel_keypoints", 65),
    ("model.fusion.cue_memory", True),             # without cue_objects (0 here): nothing to hold
])
def test_impossible_value_is_refused(params, tmp_path, key, value):
    set_key(params, key, value)
    assert_refused(tmp_path, params, key)


def test_a_cue_memory_without_pixel_keypoints_is_refused_naming_both(params, tmp_path):
    set_key(params, "model.fusion.cue_objects", 3)
    set_key(params, "model.fusion.cue_memory", True)
    assert_refused(tmp_path, params, "model.fusion.cue_memory")
    set_key(params, "model.camera.pixel_keypoints", 3)
    assert load_config(write_params(tmp_path, params, "ok.yaml")).model.fusion.cue_memory


def test_audio_window_shorter_than_one_fft_is_refused(params, tmp_path):
    set_key(params, "model.audio.window_s", 0.01)  # 160 samples at 16 kHz < n_fft 512
    msg = assert_refused(tmp_path, params, "model.audio.window_s")
    assert "512" in msg


def test_f_max_above_nyquist_is_refused(params, tmp_path):
    set_key(params, "model.audio.sample_rate", 8000)  # Nyquist 4 kHz, f_max still 8 kHz
    msg = assert_refused(tmp_path, params, "model.audio.f_max")
    assert "4000" in msg


def test_unknown_fusion_strategy_lists_allowed_values(params, tmp_path):
    set_key(params, "model.fusion.strategy", "mid")
    msg = assert_refused(tmp_path, params, "model.fusion.strategy", "mid")
    for allowed in ("early", "late", "hybrid", "hierarchical", "bilinear", "adaptive"):
        assert allowed in msg


@pytest.mark.parametrize("key, value", [("model.encoder.cfc_mode", "gated"), ("engine.backend", "cuda"),
                                        ("model.camera.backbone", "vit")])
def test_unknown_choice_is_refused(params, tmp_path, key, value):
    set_key(params, key, value)
    assert_refused(tmp_path, params, key, value)


def test_action_lower_not_below_upper_is_refused(params, tmp_path):
    params["model"]["action"]["lower"][3] = 1.0  # == upper[3]
    msg = assert_refused(tmp_path, params, "model.action.lower")
    assert "joint_4" in msg
    params["model"]["action"]["lower"][3] = 2.0  # > upper[3]
    assert_refused(tmp_path, params, "model.action.lower")


@pytest.mark.parametrize("side", ["lower", "upper"])
def test_wrong_number_of_action_limits_is_refused(params, tmp_path, side):
    params["model"]["action"][side] = params["model"]["action"][side][:6]
    msg = assert_refused(tmp_path, params, f"model.action.{side}")
    assert "7" in msg


def test_wrong_number_of_action_names_is_refused(params, tmp_path):
    params["model"]["action"]["names"].append("joint_8")
    params["model"]["action"]["lower"].append(-1.0)
    params["model"]["action"]["upper"].append(1.0)
    assert_refused(tmp_path, params, "model.action.names")


def test_duplicate_action_names_are_refused(params, tmp_path):
    params["model"]["action"]["names"][6] = "joint_1"
    assert_refused(tmp_path, params, "model.action.names")


def test_heads_must_divide_hidden(params, tmp_path):
    set_key(params, "model.fusion.heads", 5)  # 64 % 5 != 0
    msg = assert_refused(tmp_path, params, "model.fusion.heads")
    assert "64" in msg
    set_key(params, "model.fusion.heads", 4)
    set_key(params, "model.encoder.hidden", 66)  # 66 % 4 != 0
    assert_refused(tmp_path, params, "model.fusion.heads")


def test_config_from_dict_refuses_directly(params):
    bad = copy.deepcopy(params)
    bad["model"]["imu"]["rate"] = 200.0
    with pytest.raises(ConfigError, match=r"model\.imu"):
        config_from_dict(bad)
    with pytest.raises(ConfigError, match=r"model\.fusion\.heads"):
        model_config_from_dict({**config_to_dict(ModelConfig()), "fusion": {"strategy": "late", "heads": 3}})


def test_missing_file_is_refused(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_config(missing)


@pytest.mark.parametrize("doc", [
    {"other_node": {"ros__parameters": {}}},
    {"fusion_node": {"control_rate_hz": 100.0}},  # no ros__parameters level
    ["fusion_node"],
    None,
])
def test_yaml_without_fusion_node_parameters_is_refused(tmp_path, doc):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="fusion_node"):
        load_config(path)


def test_invalid_yaml_is_refused(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("fusion_node:\n  ros__parameters: {control_rate_hz: [1, 2\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


def test_config_is_immutable(robot_yaml):
    cfg = load_config(robot_yaml)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.control_rate_hz = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("key", ["model.audio.window_s", "model.imu.window_s", "model.imu.rate_hz",
                                 "model.encoder.threshold", "model.lidar.range_max", "model.audio.f_max"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_non_finite_number_is_refused_with_config_error(params, tmp_path, key, value):
    # YAML's .inf / .nan. An infinite window used to escape validation as an OverflowError from
    # int(round(inf)) in window_samples; it must be a ConfigError naming the key.
    set_key(params, key, value)
    assert_refused(tmp_path, params, key)


# ---------------------------------------------------------------- live loop sections (inputs, safety, outputs)


def test_live_loop_defaults_from_the_issue(robot_yaml):
    cfg = load_config(robot_yaml)
    # Relative names: a launch namespace moves them all (issue #12); in the root namespace they are these.
    assert cfg.inputs.camera.topic == "camera/image_raw"
    assert cfg.inputs.audio.topic == "audio/audio_stamped"
    assert cfg.inputs.lidar.topic == "scan"
    assert cfg.inputs.imu.topic == "imu/data"
    assert cfg.inputs.joint_state.topic == "joint_states"   # joint_state_broadcaster's
    assert cfg.outputs.action_topic == "mm_fusion/action"
    assert cfg.outputs.estop_topic == "mm_fusion/estop"
    assert cfg.outputs.enable_service == "mm_fusion/enable"
    absolute = cfg.absolute("left")
    assert absolute.inputs.imu.topic == "/left/imu/data" and absolute.outputs.action_topic == "/left/mm_fusion/action"
    assert all(getattr(cfg.inputs, m).qos == "best_effort" for m in MODALITIES)
    assert cfg.safety.start_enabled is False          # a node starts as a dry run
    assert cfg.safety.per_dof("max_acceleration", 7) == (5.0,) * 7   # 0.05 per tick at 100 Hz, per second
    assert cfg.safety.per_dof("lower", 7) == (-1.0,) * 7 and cfg.safety.per_dof("upper", 7) == (1.0,) * 7
    assert cfg.safety.hold_timeout_s == 0.5
    assert (cfg.inputs.lidar.z_min, cfg.inputs.lidar.z_max) == (-0.1, 0.1)
    assert set(cfg.inputs.required) <= set(MODALITIES)
    # no velocity command without knowing where the joints are: the arm's own state is required
    assert "joint_state" in cfg.inputs.required and cfg.inputs.joint_state.max_age == 0.05


@pytest.mark.parametrize("key, value", [
    ("inputs.camera.max_age", 0.0),
    ("inputs.imu.max_age", -0.1),
    ("inputs.lidar.depth", 0),
    ("inputs.camera.topic", "camera image"),           # not a ROS name
    ("inputs.audio.source_rate", 100),
    ("inputs.buffer_s", 0.5),                          # shorter than the 1 s audio window
    ("inputs.max_future_s", 0.0),
    ("inputs.camera_cache", 0),
    ("inputs.joint_state.max_age", 0.0),
    ("inputs.joint_state.depth", 0),
    ("inputs.joint_state.topic", "joint states"),
    ("inputs.joint_state.qos", "fast"),
    ("safety.max_acceleration", [0.1, 0.1]),           # neither one value nor one per DOF
    ("safety.max_acceleration", [0.0]),
    ("safety.max_acceleration", [-5.0]),
    ("safety.max_acceleration", []),
    ("safety.lower", [-1.0, -1.0]),
    ("safety.upper", []),
    ("safety.lower", [1.0]),                           # not below upper (1.0)
    ("safety.lower", [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 2.0]),
    ("safety.hold_timeout_s", 0.0),
    ("safety.hold_timeout_s", -0.5),
    ("inputs.lidar.z_min", 0.1),                       # not below z_max (0.1)
    ("inputs.lidar.z_min", 0.5),
    ("outputs.action_topic", "mm_fusion/"),
    ("outputs.estop_topic", "1estop"),
    ("outputs.diagnostics_period_s", 0.0),
])
def test_impossible_live_loop_value_is_refused(params, tmp_path, key, value):
    set_key(params, key, value)
    assert_refused(tmp_path, params, key)


@pytest.mark.parametrize("key, value, allowed", [
    ("inputs.camera.type", "image_raw", "compressed_image"),
    ("inputs.lidar.type", "pointcloud", "point_cloud2"),
    ("inputs.audio.type", "wav", "audio_data_stamped"),
    ("inputs.imu.qos", "sensor_data", "best_effort"),
    ("safety.on_stale", "brake", "hold_last"),
])
def test_unknown_live_loop_choice_lists_allowed_values(params, tmp_path, key, value, allowed):
    set_key(params, key, value)
    assert_refused(tmp_path, params, key, allowed)


def test_required_modality_must_be_known_and_listed_once(params, tmp_path):
    set_key(params, "inputs.required", ["camera", "sonar"])
    assert_refused(tmp_path, params, "inputs.required[1]", "sonar")
    set_key(params, "inputs.required", ["imu", "imu"])
    assert_refused(tmp_path, params, "inputs.required", "twice")


def test_per_dof_safety_values_are_accepted(params):
    set_key(params, "safety.max_acceleration", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    set_key(params, "safety.lower", [-0.5, -1.0, -1.0, -1.0, -1.0, -1.0, 0.0])
    set_key(params, "safety.upper", [0.5])
    cfg = config_from_dict(params)
    assert cfg.safety.per_dof("max_acceleration", 7)[6] == 7.0
    assert cfg.safety.per_dof("lower", 7)[0] == -0.5 and cfg.safety.per_dof("upper", 7) == (0.5,) * 7


def test_max_delta_is_refused_naming_max_acceleration_per_second(params, tmp_path):
    # A per-tick value read as per second would be 100x off at 100 Hz: refused, saying what to write.
    set_key(params, "safety.max_delta", [0.05])
    msg = assert_refused(tmp_path, params, "safety.max_delta", "safety.max_acceleration", "per second")
    assert msg.startswith("safety.max_delta:")


def test_limit_errors_name_the_dof(params, tmp_path):
    set_key(params, "safety.upper", [1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    assert_refused(tmp_path, params, "safety.lower", "joint_3")


@pytest.mark.parametrize("key", ["safety.hold_timeout_s", "inputs.lidar.z_min", "inputs.lidar.z_max"])
def test_non_finite_live_loop_number_is_refused(params, tmp_path, key):
    set_key(params, key, float("inf"))
    assert_refused(tmp_path, params, key)
    set_key(params, key, float("nan"))
    assert_refused(tmp_path, params, key)


def test_non_finite_safety_limit_is_refused(params, tmp_path):
    set_key(params, "safety.upper", [float("inf")])
    assert_refused(tmp_path, params, "safety.upper")


def test_sim_yaml_carries_the_same_safety_and_lidar_slice_keys(robot_yaml):
    sim = robot_yaml.parent / "sim.yaml"
    blocks = [yaml.safe_load(path.read_text())["fusion_node"]["ros__parameters"] for path in (robot_yaml, sim)]
    assert set(blocks[0]["safety"]) == set(blocks[1]["safety"])
    assert set(blocks[0]["inputs"]["lidar"]) == set(blocks[1]["inputs"]["lidar"])
    assert set(blocks[0]["model"]["action"]) == set(blocks[1]["model"]["action"])
    robot, cell = load_config(robot_yaml), load_config(sim)
    assert robot.safety == dataclasses.replace(cell.safety, start_enabled=robot.safety.start_enabled)


def test_artifacts_default_to_a_per_user_cache_never_the_working_directory(monkeypatch, tmp_path):
    from mm_fusion_ros.config import EngineConfig
    monkeypatch.setenv("ROS_HOME", str(tmp_path / "ros_home"))
    assert EngineConfig().artifact_path == tmp_path / "ros_home" / "mm_fusion_ros"
    monkeypatch.delenv("ROS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert EngineConfig().artifact_path == tmp_path / "home" / ".ros" / "mm_fusion_ros"
    assert EngineConfig(artifact_dir="~/plans").artifact_path == tmp_path / "home" / "plans"


def test_camera_strides_set_the_keypoint_map(params, tmp_path):
    """The stride of each stage is what it says: the spatial softmax reads a map that much finer."""
    import torch

    from mm_fusion_ros.config import CameraConfig
    from mm_fusion_ros.model.preprocess import CameraEncoder
    for strides, side in (((4, 2, 2), 6), ((4, 2, 1), 12)):
        for backbone in ("simple", "resnet"):
            enc = CameraEncoder(CameraConfig(strides=strides, backbone=backbone), 16)
            assert enc.features(torch.zeros(1, 3, 96, 96)).shape[-2:] == (side, side)
