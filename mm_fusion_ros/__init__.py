"""mm_fusion_ros: real-time multi-modal sensor fusion for robots on ROS 2."""

__version__ = "0.1.0"
