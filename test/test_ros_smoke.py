"""Real rclpy from the Kilted wheels works in the test environment: an Imu round trip."""

import os
import time

import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install '.[ros]')")


def test_discovery_is_confined_to_loopback():
    # conftest sets these before rclpy is imported; without them Fast DDS multicasts discovery.
    assert os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert 0 <= int(os.environ["ROS_DOMAIN_ID"]) <= 232


def test_imu_publish_and_receive():
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Imu

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        talker = rclpy.create_node("smoke_talker", context=context)
        listener = rclpy.create_node("smoke_listener", context=context)
        received = []
        listener.create_subscription(Imu, "/smoke/imu", received.append, 10)
        publisher = talker.create_publisher(Imu, "/smoke/imu", 10)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(talker)
        executor.add_node(listener)

        sent = Imu()
        sent.header.frame_id = "imu_link"
        sent.header.stamp.sec, sent.header.stamp.nanosec = 12, 345
        sent.linear_acceleration.z = 9.81
        sent.angular_velocity.x = 0.25
        deadline = time.monotonic() + 10.0
        while not received and time.monotonic() < deadline:
            publisher.publish(sent)
            executor.spin_once(timeout_sec=0.05)
        assert received, "no Imu message arrived within 10 s"
        got = received[0]
        assert got.header.frame_id == "imu_link"
        assert (got.header.stamp.sec, got.header.stamp.nanosec) == (12, 345)
        assert got.linear_acceleration.z == pytest.approx(9.81)
        assert got.angular_velocity.x == pytest.approx(0.25)
        executor.shutdown()
        talker.destroy_node()
        listener.destroy_node()
    finally:
        rclpy.shutdown(context=context)
