"""The simulated cell with the trained policy: sim_node (the cell, /clock) and fusion_node (the policy).

    ros2 launch mm_fusion_ros sim.launch.py [checkpoint:=PATH] [episodes:=0] [seed:=5000] [rate_factor:=1.0]
        [namespace:=NS] [params_file:=PATH] [artifact_dir:=DIR]

What `make demo` runs (``mm-fusion sim-demo``), for a machine with ROS 2's launch. Both nodes read their
block of config/sim.yaml (or ``params_file``), handed over as parameters so that a ``namespace`` does not
stop the blocks from matching. sim_node is the clock (it publishes /clock and never follows it); fusion_node
follows it (``use_sim_time: true`` in its block) and loads the shipped policy, policies/sim_policy.pt,
produced by `make train`. Episodes start one after another with seeds ``seed``, ``seed + 1``, ... (the
default is not a training seed); ``episodes:=0`` runs until stopped. Between episodes the policy's state
carries over here; `mm-fusion sim-demo` calls fusion_node's ``mm_fusion/reset`` at each episode's start, as
eval starts every episode afresh.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from mm_fusion_ros.config import launch_parameters as node_block

PACKAGE = "mm_fusion_ros"




def _nodes(context):
    params_file = LaunchConfiguration("params_file").perform(context)
    namespace = LaunchConfiguration("namespace").perform(context)

    def text(name):
        return ParameterValue(LaunchConfiguration(name), value_type=str)

    def number(name, kind):
        return ParameterValue(LaunchConfiguration(name), value_type=kind)

    return [
        Node(package=PACKAGE, executable="sim_node", name="sim_node", namespace=namespace, output="screen",
             parameters=[node_block(params_file, "sim_node"),
                         {"seed": number("seed", int), "node.episodes": number("episodes", int),
                          "node.rate_factor": number("rate_factor", float)}]),
        Node(package=PACKAGE, executable="fusion_node", name="fusion_node", namespace=namespace, output="screen",
             parameters=[node_block(params_file, "fusion_node"),
                         {"checkpoint": text("checkpoint"), "engine.artifact_dir": text("artifact_dir")}]),
    ]


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    arguments = [
        DeclareLaunchArgument("namespace", default_value="", description="namespace for both nodes and every topic"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "sim.yaml"),
                              description="parameters file with a sim_node and a fusion_node block"),
        DeclareLaunchArgument("checkpoint", default_value=os.path.join(share, "policies", "sim_policy.pt"),
                              description="the policy (make train writes policies/sim_policy.pt)"),
        DeclareLaunchArgument("artifact_dir", default_value="",
                              description="where model.onnx is kept; empty = $ROS_HOME/mm_fusion_ros"),
        DeclareLaunchArgument("episodes", default_value="0", description="stop after this many episodes; 0 = never"),
        DeclareLaunchArgument("seed", default_value="5000", description="first episode's seed (not a training seed)"),
        DeclareLaunchArgument("rate_factor", default_value="1.0", description="sim seconds per wall second"),
    ]
    environment = [SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE",
                                          os.path.join(share, "config", "fastdds_shm.xml"))]
    return LaunchDescription(arguments + environment + [OpaqueFunction(function=_nodes)])
