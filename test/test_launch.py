"""launch/robot.launch.py, checked statically: `ros2 launch` cannot be installed here.

The file is executed with small stand-ins for `launch`, `launch_ros` and
`ament_index_python` that record what it asks for; then every executable must
be a console script of this package, every parameter file must exist and hold
a valid block for its node, and every parameter the launch file sets must be
declared by that node (mm_fusion_ros.ros.params is where the nodes declare them).
"""

from __future__ import annotations

import ast
import importlib
import runpy
import sys
import types
from pathlib import Path

import pytest
import yaml

from mm_fusion_ros.ros.params import NODE_CONFIGS, build_config, declared_names

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "launch" / "robot.launch.py"


class Recorded:
    """A launch action or substitution: remembers how it was built."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class LaunchConfiguration(Recorded):
    @property
    def name(self) -> str:
        return self.args[0]


class ParameterValue(Recorded):
    pass


class DeclareLaunchArgument(Recorded):
    pass


class SetEnvironmentVariable(Recorded):
    pass


class IfCondition(Recorded):
    pass


class Node(Recorded):
    pass


class LaunchDescription(Recorded):
    pass


def _stub_modules(share_dir: Path) -> dict[str, types.ModuleType]:
    def share_directory(package: str) -> str:
        if package != "mm_fusion_ros":
            raise LookupError(f"package {package!r} not found")
        return str(share_dir)

    def module(name: str, **attrs) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        return m

    return {
        "launch": module("launch", LaunchDescription=LaunchDescription),
        "launch.actions": module("launch.actions", DeclareLaunchArgument=DeclareLaunchArgument,
                                 SetEnvironmentVariable=SetEnvironmentVariable),
        "launch.conditions": module("launch.conditions", IfCondition=IfCondition),
        "launch.substitutions": module("launch.substitutions", LaunchConfiguration=LaunchConfiguration),
        "launch_ros": module("launch_ros"),
        "launch_ros.actions": module("launch_ros.actions", Node=Node),
        "launch_ros.parameter_descriptions": module("launch_ros.parameter_descriptions",
                                                    ParameterValue=ParameterValue),
        "ament_index_python": module("ament_index_python"),
        "ament_index_python.packages": module("ament_index_python.packages",
                                              get_package_share_directory=share_directory),
    }


@pytest.fixture(scope="module")
def description(tmp_path_factory, monkeypatch_module):
    # The installed layout: share/mm_fusion_ros/{config,launch}, as setup.py's data_files put them.
    share = tmp_path_factory.mktemp("share")
    (share / "config").symlink_to(REPO / "config")
    for name, stub in _stub_modules(share).items():
        monkeypatch_module.setitem(sys.modules, name, stub)
    namespace = runpy.run_path(str(LAUNCH_FILE))
    result = namespace["generate_launch_description"]()
    assert isinstance(result, LaunchDescription)
    return result.args[0]


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def console_scripts() -> dict[str, str]:
    """name -> 'module:function' from setup.py's entry_points, read without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text())
    scripts = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    for item in value.elts:
                        name, target = (part.strip() for part in item.value.split("="))
                        scripts[name] = target
    return scripts


def nodes(description) -> list[Node]:
    return [a for a in description if isinstance(a, Node)]


def flatten(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_launches_camera_microphone_and_fusion(description):
    assert sorted(n.kwargs["executable"] for n in nodes(description)) == \
        ["camera_node", "fusion_node", "microphone_node"]


def test_every_executable_is_a_console_script_with_a_main(description):
    scripts = console_scripts()
    for node in nodes(description):
        exe = node.kwargs["executable"]
        assert node.kwargs["package"] == "mm_fusion_ros"
        assert exe in scripts, f"{exe} is not a console script in setup.py: {sorted(scripts)}"
        module, func = scripts[exe].split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_every_parameter_file_exists_and_holds_a_valid_block_for_its_node(description):
    for node in nodes(description):
        exe, name = node.kwargs["executable"], node.kwargs["name"]
        files = [p for p in node.kwargs["parameters"] if isinstance(p, str)]
        assert files, f"{exe} gets no parameter file"
        for path in files:
            assert Path(path).is_file(), f"{exe}: parameter file {path} does not exist"
            doc = yaml.safe_load(Path(path).read_text())
            assert name in doc, f"{path} has no block for node {name}"
            flat = flatten(doc[name]["ros__parameters"])
            undeclared = set(flat) - declared_names(exe)
            assert not undeclared, f"{path}: {name} does not declare {sorted(undeclared)}"
            build_config(NODE_CONFIGS[exe], flat)  # raises ConfigError naming the key if invalid


def test_every_parameter_set_by_the_launch_file_is_declared_by_its_node(description):
    for node in nodes(description):
        exe = node.kwargs["executable"]
        for entry in node.kwargs["parameters"]:
            if isinstance(entry, dict):
                undeclared = set(entry) - declared_names(exe)
                assert not undeclared, f"launch file sets {sorted(undeclared)} on {exe}, which does not declare them"


def test_string_parameters_from_arguments_stay_strings(description):
    # "0" (a device index) or "" (no checkpoint) would otherwise arrive as YAML int / null.
    fusion = next(n for n in nodes(description) if n.kwargs["executable"] == "fusion_node")
    camera = next(n for n in nodes(description) if n.kwargs["executable"] == "camera_node")
    overrides = {**fusion.kwargs["parameters"][1], **{f"camera.{k}": v for k, v in camera.kwargs["parameters"][1].items()}}
    for key in ("checkpoint", "engine.artifact_dir", "camera.source"):
        value = overrides[key]
        assert isinstance(value, ParameterValue) and value.kwargs.get("value_type") is str, key


def test_launch_arguments_cover_model_sim_time_and_sensor_choice(description):
    declared = {a.args[0] for a in description if isinstance(a, DeclareLaunchArgument)}
    assert {"checkpoint", "artifact_dir", "use_sim_time", "start_camera", "start_microphone"} <= declared
    used = set()

    def collect(value):
        if isinstance(value, LaunchConfiguration):
            used.add(value.name)
        elif isinstance(value, Recorded):
            for v in list(value.args) + list(value.kwargs.values()):
                collect(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                collect(v)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)

    collect(description)
    assert used <= declared, f"launch configurations used but not declared: {sorted(used - declared)}"
    for node in nodes(description):
        params = node.kwargs["parameters"][1]
        assert isinstance(params.get("use_sim_time"), LaunchConfiguration)


def test_sensor_nodes_are_optional_and_fusion_always_starts(description):
    for node in nodes(description):
        exe = node.kwargs["executable"]
        condition = node.kwargs.get("condition")
        if exe == "fusion_node":
            assert condition is None
        else:
            expected = {"camera_node": "start_camera", "microphone_node": "start_microphone"}[exe]
            assert isinstance(condition, IfCondition) and condition.args[0].name == expected


def test_fast_dds_profile_is_set_and_shipped(description):
    env = {a.args[0]: a.args[1] for a in description if isinstance(a, SetEnvironmentVariable)}
    profile = Path(env["FASTDDS_DEFAULT_PROFILES_FILE"])
    assert profile.is_file() and profile.name == "fastdds_shm.xml"
    text = profile.read_text()
    assert "<segment_size>" in text and "<type>SHM</type>" in text


def test_setup_py_installs_the_launch_file_and_config():
    text = (REPO / "setup.py").read_text()
    assert '"launch/*.launch.py"' in text and '"config/*"' in text
