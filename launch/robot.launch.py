"""The robot's side of mm_fusion_ros: camera_node, microphone_node and fusion_node.

    ros2 launch mm_fusion_ros robot.launch.py [checkpoint:=PATH] [artifact_dir:=DIR]
        [use_sim_time:=true] [start_camera:=false] [start_microphone:=false]

Every node reads config/robot.yaml (its own block); the launch arguments
override single parameters. On a robot the LiDAR and IMU come from their own
drivers on /scan and /imu/data (see inputs.* in robot.yaml for the topics).
The Fast DDS profile config/fastdds_shm.xml gives shared memory a segment large
enough for whole camera frames; fusion_node asks for real-time scheduling of its
control and intake threads (MM_FUSION_RT_PRIORITY, used when permitted).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

PACKAGE = "mm_fusion_ros"


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    params_file = os.path.join(share, "config", "robot.yaml")
    profile = os.path.join(share, "config", "fastdds_shm.xml")
    use_sim_time = LaunchConfiguration("use_sim_time")

    def text(name):
        # Without value_type a value like "0" or "" would be read as YAML (an int, or nothing).
        return ParameterValue(LaunchConfiguration(name), value_type=str)

    arguments = [
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="trained weights (mm-fusion checkpoint); empty = seeded random init"),
        DeclareLaunchArgument("artifact_dir", default_value="artifacts",
                              description="where model.onnx and TensorRT plans are kept (engine.artifact_dir)"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="follow /clock"),
        DeclareLaunchArgument("start_camera", default_value="true", description="start camera_node"),
        DeclareLaunchArgument("start_microphone", default_value="true", description="start microphone_node"),
        DeclareLaunchArgument("camera_source", default_value="0",
                              description="camera_node source: device index, video file or URL"),
        DeclareLaunchArgument("rt_priority", default_value="50",
                              description="SCHED_FIFO priority of fusion_node's threads; 0 = normal scheduling"),
    ]
    environment = [
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", profile),
        SetEnvironmentVariable("MM_FUSION_RT_PRIORITY", LaunchConfiguration("rt_priority")),
    ]
    nodes = [
        Node(package=PACKAGE, executable="camera_node", name="camera_node", output="screen",
             condition=IfCondition(LaunchConfiguration("start_camera")),
             parameters=[params_file, {"use_sim_time": use_sim_time,
                                       "source": text("camera_source")}]),
        Node(package=PACKAGE, executable="microphone_node", name="microphone_node", output="screen",
             condition=IfCondition(LaunchConfiguration("start_microphone")),
             parameters=[params_file, {"use_sim_time": use_sim_time}]),
        Node(package=PACKAGE, executable="fusion_node", name="fusion_node", output="screen",
             parameters=[params_file, {"use_sim_time": use_sim_time,
                                       "checkpoint": text("checkpoint"),
                                       "engine.artifact_dir": text("artifact_dir")}]),
    ]
    return LaunchDescription(arguments + environment + nodes)
