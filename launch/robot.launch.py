"""The robot's side of mm_fusion_ros: camera_node, microphone_node and fusion_node.

    ros2 launch mm_fusion_ros robot.launch.py [namespace:=left] [checkpoint:=PATH] [artifact_dir:=DIR]
        [use_sim_time:=true] [start_camera:=false] [start_microphone:=false] [camera_source:=...]
        [microphone_source:=...] [params_file:=PATH]

Every node reads its own block of config/robot.yaml (or ``params_file``); the launch arguments override
single parameters. The block is handed to each node as parameters (not as the file), so that the node
gets it under any ``namespace``: a parameters file's ``fusion_node:`` key matches only ``/fusion_node``,
not ``/left/fusion_node``. Every topic is relative, so ``namespace:=left`` moves them all (two arms in one
graph: two launches with two namespaces). On a robot the LiDAR, IMU and joint states come from their own drivers on
``scan``, ``imu/data`` and ``joint_states`` (see inputs.* in robot.yaml). The Fast DDS profile config/fastdds_shm.xml gives
shared memory a segment large enough for whole camera frames; fusion_node asks for real-time scheduling of
its control and intake threads (MM_FUSION_RT_PRIORITY, used when permitted). fusion_node is a lifecycle
node that configures and activates itself (``autostart``).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from mm_fusion_ros.config import launch_parameters as node_block

PACKAGE = "mm_fusion_ros"




def _nodes(context):
    params_file = LaunchConfiguration("params_file").perform(context)
    namespace = LaunchConfiguration("namespace").perform(context)
    use_sim_time = LaunchConfiguration("use_sim_time")

    def text(name):
        # Without value_type a value like "0" or "" would be read as YAML (an int, or nothing).
        return ParameterValue(LaunchConfiguration(name), value_type=str)

    return [
        Node(package=PACKAGE, executable="camera_node", name="camera_node", namespace=namespace, output="screen",
             condition=IfCondition(LaunchConfiguration("start_camera")),
             parameters=[node_block(params_file, "camera_node"),
                         {"use_sim_time": use_sim_time, "source": text("camera_source")}]),
        Node(package=PACKAGE, executable="microphone_node", name="microphone_node", namespace=namespace,
             output="screen", condition=IfCondition(LaunchConfiguration("start_microphone")),
             parameters=[node_block(params_file, "microphone_node"),
                         {"use_sim_time": use_sim_time, "source": text("microphone_source")}]),
        Node(package=PACKAGE, executable="fusion_node", name="fusion_node", namespace=namespace, output="screen",
             parameters=[node_block(params_file, "fusion_node"),
                         {"use_sim_time": use_sim_time, "checkpoint": text("checkpoint"),
                          "engine.artifact_dir": text("artifact_dir")}]),
    ]


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    profile = os.path.join(share, "config", "fastdds_shm.xml")
    arguments = [
        DeclareLaunchArgument("namespace", default_value="",
                              description="namespace for every node and topic (e.g. left, right)"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "robot.yaml"),
                              description="parameters file with a block per node"),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="trained weights (mm-fusion checkpoint); empty = seeded random init"),
        DeclareLaunchArgument("artifact_dir", default_value="",
                              description="where model.onnx and TensorRT plans are kept (engine.artifact_dir); "
                                          "empty = $ROS_HOME/mm_fusion_ros"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="follow /clock"),
        DeclareLaunchArgument("start_camera", default_value="true", description="start camera_node"),
        DeclareLaunchArgument("start_microphone", default_value="true", description="start microphone_node"),
        DeclareLaunchArgument("camera_source", default_value="0",
                              description="camera_node source: device index, video file or URL"),
        DeclareLaunchArgument("microphone_source", default_value="default",
                              description="microphone_node source: 'default', a PortAudio device, or a .wav file"),
        DeclareLaunchArgument("rt_priority", default_value="50",
                              description="SCHED_FIFO priority of fusion_node's threads; 0 = normal scheduling"),
    ]
    environment = [
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", profile),
        SetEnvironmentVariable("MM_FUSION_RT_PRIORITY", LaunchConfiguration("rt_priority")),
    ]
    return LaunchDescription(arguments + environment + [OpaqueFunction(function=_nodes)])
