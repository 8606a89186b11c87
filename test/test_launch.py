"""launch/robot.launch.py: `ros2 launch` cannot be installed here, so the file is checked twice.

Statically: it is executed with small stand-ins for `launch`, `launch_ros` and
`ament_index_python` that record what it asks for; every executable must be a
console script of this package, every node must get a valid block of the
parameters file, and every parameter the launch file sets must be declared by
that node (mm_fusion_ros.ros.params is where the nodes declare them).

Live: the node processes are started exactly as the recorded actions describe
them (executable, node name, namespace, parameters, environment), as
launch_ros would start them, and the ROS graph they make is checked: one node
per name, each holding its own topics, under the launch namespace.
"""

from __future__ import annotations

import ast
import importlib
import os
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

    def perform(self, context) -> str:
        return context.launch_configurations[self.name]


class OpaqueFunction(Recorded):
    pass


class LaunchContext:
    def __init__(self, launch_configurations: dict[str, str]):
        self.launch_configurations = launch_configurations


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
                                 SetEnvironmentVariable=SetEnvironmentVariable, OpaqueFunction=OpaqueFunction),
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


def _describe(launch_file: Path, share: Path, monkeypatch) -> list:
    """Run a launch file's generate_launch_description against the stand-ins, in the installed layout
    (share/mm_fusion_ros/{config,launch}, as setup.py's data_files put them); its actions."""
    (share / "config").symlink_to(REPO / "config")
    for name, stub in _stub_modules(share).items():
        monkeypatch.setitem(sys.modules, name, stub)
    result = runpy.run_path(str(launch_file))["generate_launch_description"]()
    assert isinstance(result, LaunchDescription)
    return result.args[0]


@pytest.fixture(scope="module")
def description(tmp_path_factory, monkeypatch_module):
    return _describe(LAUNCH_FILE, tmp_path_factory.mktemp("share"), monkeypatch_module)


def launch_arguments(description) -> dict[str, str]:
    return {a.args[0]: a.kwargs["default_value"] for a in description if isinstance(a, DeclareLaunchArgument)}


def expand(description, **arguments) -> list:
    """The actions with every OpaqueFunction run, as `ros2 launch` would with these arguments."""
    context = LaunchContext({**launch_arguments(description), **arguments})
    out = []
    for action in description:
        if isinstance(action, OpaqueFunction):
            out += action.kwargs["function"](context)
        else:
            out.append(action)
    return out


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


def nodes(description, **arguments) -> list[Node]:
    return [a for a in expand(description, **arguments) if isinstance(a, Node)]


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


def test_every_node_gets_its_own_valid_block_of_the_parameters_file(description):
    params_file = Path(launch_arguments(description)["params_file"])
    assert params_file.is_file(), f"default params_file {params_file} does not exist"
    doc = yaml.safe_load(params_file.read_text())
    for node in nodes(description):
        exe, name = node.kwargs["executable"], node.kwargs["name"]
        block = node.kwargs["parameters"][0]
        assert isinstance(block, dict) and block == flatten(doc[name]["ros__parameters"]), exe
        undeclared = set(block) - declared_names(exe)
        assert not undeclared, f"{params_file}: {name} does not declare {sorted(undeclared)}"
        build_config(NODE_CONFIGS[exe], block)  # raises ConfigError naming the key if invalid


def test_a_namespace_argument_moves_every_node(description):
    assert {n.kwargs["namespace"] for n in nodes(description, namespace="left")} == {"left"}


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
    overrides.update({f"microphone.{k}": v for k, v in
                      next(n for n in nodes(description) if n.kwargs["executable"] == "microphone_node")
                      .kwargs["parameters"][1].items()})
    for key in ("checkpoint", "engine.artifact_dir", "camera.source", "microphone.source"):
        value = overrides[key]
        assert isinstance(value, ParameterValue) and value.kwargs.get("value_type") is str, key


def test_launch_arguments_cover_model_sim_time_and_sensor_choice(description):
    declared = {a.args[0] for a in description if isinstance(a, DeclareLaunchArgument)}
    assert {"checkpoint", "artifact_dir", "use_sim_time", "start_camera", "start_microphone", "namespace",
            "params_file", "camera_source", "microphone_source"} <= declared
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

    collect(expand(description))
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


# ---------------------------------------------------------------- the processes the launch file describes

def _resolve(value, arguments: dict[str, str]):
    if isinstance(value, LaunchConfiguration):
        return arguments[value.name]
    if isinstance(value, ParameterValue):
        return str(_resolve(value.args[0], arguments))
    return value


def _truthy(text: str) -> bool:
    return str(text).lower() in ("true", "1", "yes", "on")


def test_the_launched_processes_make_the_graph_the_launch_file_describes(description, tmp_path):
    """Each node started as launch_ros starts it (name and namespace remaps, its parameters as a file keyed
    by its fully qualified name, the launch environment), under a namespace: one node per name, no twin."""
    rclpy = pytest.importorskip("rclpy")
    import subprocess
    import time

    from mm_fusion_ros import procs
    from mm_fusion_ros.live_demo import make_video, make_wav

    arguments = {**launch_arguments(description), "namespace": "left", "rt_priority": "0",
                 "camera_source": str(make_video(tmp_path / "cam.mp4", seconds=2.0, width=160, height=120)),
                 "microphone_source": str(make_wav(tmp_path / "mic.wav", seconds=2.0)),
                 "artifact_dir": str(tmp_path / "artifacts")}
    # A domain of its own: other tests' nodes (and the graph's memory of them) stay out of this graph.
    domain = 200 + os.getpid() % 30
    env = procs.ros_env(domain_id=domain)
    for action in description:
        if isinstance(action, SetEnvironmentVariable):
            env[action.args[0]] = str(_resolve(action.args[1], arguments))
    started = []
    try:
        for node in nodes(description, **arguments):
            condition = node.kwargs.get("condition")
            if condition is not None and not _truthy(_resolve(condition.args[0], arguments)):
                continue
            name, namespace = node.kwargs["name"], node.kwargs["namespace"]
            fqn = f"/{namespace}/{name}" if namespace else f"/{name}"
            params = {}
            for entry in node.kwargs["parameters"]:
                params.update({k: _resolve(v, arguments) for k, v in entry.items()})
            if "use_sim_time" in params:
                params["use_sim_time"] = _truthy(params["use_sim_time"])
            params_file = tmp_path / f"{name}.params.yaml"
            params_file.write_text(yaml.safe_dump({fqn: {"ros__parameters": params}}))
            cmd = [procs.executable(node.kwargs["executable"]), "--ros-args", "-r", f"__node:={name}",
                   "--params-file", str(params_file)]
            if namespace:
                cmd += ["-r", f"__ns:=/{namespace}"]
            log = open(tmp_path / f"{name}.log", "wb")
            started.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                   stdin=subprocess.DEVNULL, start_new_session=True)))
        ctx = rclpy.Context()
        rclpy.init(context=ctx, domain_id=domain)
        observer = rclpy.create_node("launch_observer", context=ctx)
        try:
            want = {("camera_node", "/left"), ("microphone_node", "/left"), ("fusion_node", "/left")}

            def fusion_wired() -> bool:
                subs = {t for t, _ in observer.get_subscriber_names_and_types_by_node("fusion_node", "/left")}
                pubs = {t for t, _ in observer.get_publisher_names_and_types_by_node("fusion_node", "/left")}
                return {"/left/camera/image_raw", "/left/audio/audio_stamped", "/left/imu/data", "/left/scan",
                        "/left/joint_states", "/left/mm_fusion/estop"} <= subs and \
                    {"/left/mm_fusion/action", "/left/fusion_node/tick", "/diagnostics", "/rosout"} <= pubs

            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not (
                    want <= set(observer.get_node_names_and_namespaces()) and fusion_wired()):
                assert all(p.poll() is None for _, p in started), \
                    {n: (tmp_path / f"{n}.log").read_text()[-2000:] for n, _ in started}
                time.sleep(0.5)
            graph = observer.get_node_names_and_namespaces()
            ours = [n for n in graph if n[0] != "launch_observer"]
            assert sorted(ours) == sorted(want), graph           # one of each, no intake twin, all under /left
            assert fusion_wired()    # its sensor, e-stop and output topics, all on the one node
            camera_pubs = {t for t, _ in observer.get_publisher_names_and_types_by_node("camera_node", "/left")}
            assert "/left/camera/image_raw" in camera_pubs
        finally:
            observer.destroy_node()
            rclpy.try_shutdown(context=ctx)
    finally:
        for _, proc in started:   # SIGTERM: each node stops cleanly, by its own PID
            if proc.poll() is None:
                proc.terminate()
        for _, proc in started:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- launch/sim.launch.py (what `make demo` runs)

@pytest.fixture(scope="module")
def sim_description(tmp_path_factory, monkeypatch_module):
    share = tmp_path_factory.mktemp("sim_share")
    return _describe(REPO / "launch" / "sim.launch.py", share, monkeypatch_module), share


def test_sim_launch_starts_the_cell_and_the_policy_with_valid_blocks(sim_description):
    description, share = sim_description
    args = launch_arguments(description)
    assert args["checkpoint"] == str(share / "policies" / "sim_policy.pt")
    assert int(args["seed"]) >= 1000   # not a training seed (make train records seeds below 1000)
    params_file = Path(args["params_file"])
    doc = yaml.safe_load(params_file.read_text())
    started = nodes(description, namespace="cell")
    assert sorted(n.kwargs["executable"] for n in started) == ["fusion_node", "sim_node"]
    assert {n.kwargs["namespace"] for n in started} == {"cell"}
    for node in started:
        exe, name = node.kwargs["executable"], node.kwargs["name"]
        block, overrides = node.kwargs["parameters"]
        assert block == flatten(doc[name]["ros__parameters"])
        undeclared = (set(block) | set(overrides)) - declared_names(exe)
        assert not undeclared, f"{name} does not declare {sorted(undeclared)}"
        build_config(NODE_CONFIGS[exe], block)
    fusion = next(n for n in started if n.kwargs["executable"] == "fusion_node")
    # The policy follows the cell's clock; the cell is the clock.
    assert flatten(doc["fusion_node"]["ros__parameters"])["use_sim_time"] is True
    assert fusion.kwargs["parameters"][1]["checkpoint"].kwargs.get("value_type") is str


def test_setup_py_installs_the_shipped_policy():
    assert 'glob("policies/*.pt")' in (REPO / "setup.py").read_text()
