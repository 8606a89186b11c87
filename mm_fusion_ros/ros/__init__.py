"""The ROS side of the pipeline: message conversion (``convert``) and the nodes.

``convert`` imports without rclpy (message classes are imported lazily where a
message is built), so bag replay and training can use it with rosbags alone.
"""
