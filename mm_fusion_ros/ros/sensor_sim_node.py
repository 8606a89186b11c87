"""sensor_sim_node: synthetic LiDAR (sensor_msgs/LaserScan), IMU (sensor_msgs/Imu) and joint state
(sensor_msgs/JointState, as joint_state_broadcaster) publishers.

Stands in for the LiDAR and IMU drivers and the arm's joint_state_broadcaster in the demo, the integration tests and
the live benchmark. Data come from ``mm_fusion_ros.synthetic`` (a robot
drifting in a 6 x 4 m room, gravity plus vibration), stamped at generation on
the node clock. A stream can be told to stop after ``stop_after_s`` seconds, as
a dead driver would, to exercise the fusion node's watchdog.
"""

from __future__ import annotations

import array
import dataclasses
import math
import time
from typing import Any

from rclpy.node import Node
from sensor_msgs.msg import Imu, JointState, LaserScan

from ..config import ActionConfig, LidarConfig, ModelConfig
from ..synthetic import SyntheticSensors
from ..procs import print_stats
from .convert import s_to_stamp_fields
from .params import SensorSimConfig, Spinner, declare_config, node_main
from .qos import SubscriberGate, sensor_qos, wait_for_acks

NODE_NAME = "sensor_sim_node"


def laser_scan_msg(ranges: Any, stamp_s: float, frame_id: str, range_min: float, range_max: float,
                   scan_time: float) -> LaserScan:
    """A full 360-degree scan, beam i at -pi + i * 2pi / beams (the model's beam grid)."""
    beams = len(ranges)
    msg = LaserScan()
    msg.header.stamp.sec, msg.header.stamp.nanosec = s_to_stamp_fields(stamp_s)
    msg.header.frame_id = frame_id
    msg.angle_increment = 2 * math.pi / beams
    msg.angle_min = -math.pi
    msg.angle_max = -math.pi + (beams - 1) * msg.angle_increment
    msg.scan_time = scan_time
    msg.time_increment = scan_time / beams
    msg.range_min, msg.range_max = range_min, range_max
    msg.ranges = array.array("f", ranges.astype("float32").tobytes())
    return msg


def imu_msg(accel: Any, gyro: Any, stamp_s: float, frame_id: str) -> Imu:
    msg = Imu()
    msg.header.stamp.sec, msg.header.stamp.nanosec = s_to_stamp_fields(stamp_s)
    msg.header.frame_id = frame_id
    msg.linear_acceleration.x, msg.linear_acceleration.y, msg.linear_acceleration.z = (float(v) for v in accel)
    msg.angular_velocity.x, msg.angular_velocity.y, msg.angular_velocity.z = (float(v) for v in gyro)
    msg.orientation_covariance[0] = -1.0  # no orientation estimate (REP 145)
    return msg


def joint_states_msg(names: Any, position: Any, velocity: Any, stamp_s: float) -> JointState:
    """As joint_state_broadcaster: names, positions, velocities, efforts, no frame."""
    msg = JointState()
    msg.header.stamp.sec, msg.header.stamp.nanosec = s_to_stamp_fields(stamp_s)
    msg.name = list(names)
    msg.position = array.array("d", (float(v) for v in position))
    msg.velocity = array.array("d", (float(v) for v in velocity))
    msg.effort = array.array("d", [0.0] * len(msg.name))
    return msg


class _Stream:
    """One timer-driven publisher that can stop after a while and waits for its subscribers."""

    def __init__(self, node: "SensorSimNode", name: str, msg_type: Any, topic: str, rate_hz: float,
                 stop_after_s: float, make: Any):
        self.node, self.name, self.make = node, name, make
        self.publisher = node.create_publisher(msg_type, topic, sensor_qos(node.cfg.qos, node.cfg.depth))
        self.gate = SubscriberGate([self.publisher], node.cfg.wait_for_subscribers)
        self.rate_hz = rate_hz
        self.stop_after_s = stop_after_s
        self.published = 0
        self.started: float | None = None
        self.stopped = False
        self.timer = node.create_timer(1.0 / rate_hz, self._on_timer)

    def _on_timer(self) -> None:
        if self.stopped:
            return
        if self.started is None:
            if not self.gate.is_open():
                return
            self.started = time.monotonic()
        if self.stop_after_s and time.monotonic() - self.started >= self.stop_after_s:
            self.stopped = True
            self.timer.cancel()
            self.node.get_logger().warning(f"{self.name} stream stopped after {self.stop_after_s:g} s (as configured)")
            return
        self.publisher.publish(self.make(self.node.now_s()))
        self.published += 1


class SensorSimNode(Node):
    def __init__(self, *, context=None, parameter_overrides=None, cli_args=None):
        super().__init__(NODE_NAME, context=context, parameter_overrides=parameter_overrides, cli_args=cli_args,
                         automatically_declare_parameters_from_overrides=True)
        self.cfg: SensorSimConfig = declare_config(self, SensorSimConfig)
        lidar, imu, joints = self.cfg.lidar, self.cfg.imu, self.cfg.joint_states
        model = dataclasses.replace(ModelConfig(), lidar=LidarConfig(beams=lidar.beams, range_min=lidar.range_min,
                                                                     range_max=lidar.range_max),
                                    action=ActionConfig(names=joints.names, lower=(-1.0,) * len(joints.names),
                                                        upper=(1.0,) * len(joints.names)))
        self.sensors = SyntheticSensors(model, self.cfg.seed)
        self.streams: list[_Stream] = []
        if lidar.enabled:
            self.streams.append(_Stream(self, "lidar", LaserScan, lidar.topic, lidar.rate_hz, lidar.stop_after_s,
                                        self._scan))
        if imu.enabled:
            self.streams.append(_Stream(self, "imu", Imu, imu.topic, imu.rate_hz, imu.stop_after_s, self._imu))
        if joints.enabled:
            self.streams.append(_Stream(self, "joint_state", JointState, joints.topic, joints.rate_hz,
                                        joints.stop_after_s, self._joints))
        self._spinner = Spinner(self)
        self.stopping = self._spinner.stopping
        self.get_logger().info("publishing " + ", ".join(
            f"{s.name} at {s.rate_hz:g} Hz on {s.publisher.topic_name}" for s in self.streams) if self.streams
            else "nothing (every stream disabled)")

    def now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _scan(self, t: float) -> LaserScan:
        lidar = self.cfg.lidar
        return laser_scan_msg(self.sensors.lidar(t), t, lidar.frame_id, lidar.range_min, lidar.range_max,
                              1.0 / lidar.rate_hz)

    def _imu(self, t: float) -> Imu:
        sample = self.sensors.imu(t, n=1, rate=self.cfg.imu.rate_hz)[0]
        return imu_msg(sample[:3], sample[3:], t, self.cfg.imu.frame_id)

    def _joints(self, t: float) -> JointState:
        q, qd = self.sensors.joint_state(t)
        return joint_states_msg(self.cfg.joint_states.names, q, qd, t)

    def published(self) -> dict[str, int]:
        return {s.name: s.published for s in self.streams}

    def spin(self) -> None:
        self._spinner.spin()

    def close(self) -> None:
        self._spinner.close()
        wait_for_acks([s.publisher for s in self.streams])
        print_stats({"node": self.get_name(), "published": self.published()})
        self.destroy_node()


def main(args: list[str] | None = None) -> int:
    return node_main(NODE_NAME, SensorSimNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
