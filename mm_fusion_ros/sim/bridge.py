"""The cell's readings as the ROS messages a real cell's drivers would send.

``mm-fusion record`` writes these messages into bags, and ``mm-fusion eval``
hands the very same bytes (serialised, then read back as a bag reader would)
to replay's decoder and so to the Runtime: a policy evaluated in-process sees
its inputs through the conversions it was trained through, byte for byte.
Topics and types are the config's ``fusion_node`` block's, resolved as a node
in the root namespace resolves them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..bag import messages as M
from ..bag.typestore import distro_of, make_typestore
from ..config import RobotConfig
from .config import CellConfig
from .panda import JOINT_NAMES
from .readings import JPEG_FORMAT, AudioChunk, CameraFrame, ImuReading, JointReading, LidarScan, encode_jpeg


class BridgeError(ValueError):
    """A fusion_node config whose topics or types the cell cannot produce."""


@dataclass(frozen=True)
class _Topics:
    camera: tuple[str, str]
    audio: tuple[str, str]
    audio_info: str
    lidar: tuple[str, str]
    imu: tuple[str, str]
    joint_states: str
    command: str


def cell_topics(robot: RobotConfig, cell: CellConfig) -> _Topics:
    """The bag's topics and types, from the fusion_node block; refuse combinations the cell cannot produce."""
    robot = robot.absolute()   # a bag holds absolute names, as a node in the root namespace resolves them
    inp = robot.inputs
    want_camera = "compressed_image" if cell.camera.encoding == "jpeg" else "image"
    if inp.camera.type != want_camera:
        raise BridgeError(f"inputs.camera.type is {inp.camera.type!r} but the cell's camera.encoding is "
                          f"{cell.camera.encoding!r} (which needs inputs.camera.type: {want_camera}); make them agree")
    if inp.audio.type not in ("audio_data_stamped", "image_pcm"):
        raise BridgeError(f"the cell sends audio as audio_data_stamped or image_pcm, not {inp.audio.type!r} "
                          "(inputs.audio.type)")
    if inp.audio.source_rate != cell.audio.sample_rate:
        raise BridgeError(f"inputs.audio.source_rate ({inp.audio.source_rate}) differs from the cell's "
                          f"audio.sample_rate ({cell.audio.sample_rate})")
    if inp.lidar.type != "laser_scan":
        raise BridgeError("the cell's LiDAR is planar: set inputs.lidar.type: laser_scan")
    if tuple(robot.model.action.names) != JOINT_NAMES:
        raise BridgeError(f"model.action.names must be the Panda's joints {list(JOINT_NAMES)} in order, "
                          f"got {list(robot.model.action.names)}")
    return _Topics(
        camera=(inp.camera.topic, M.INPUT_MSGTYPES[("camera", inp.camera.type)]),
        audio=(inp.audio.topic, M.INPUT_MSGTYPES[("audio", inp.audio.type)]),
        audio_info=inp.audio.info_topic,
        lidar=(inp.lidar.topic, M.INPUT_MSGTYPES[("lidar", "laser_scan")]),
        imu=(inp.imu.topic, M.INPUT_MSGTYPES[("imu", "")]),
        joint_states=inp.joint_state.topic,
        command=robot.outputs.action_topic)



class CellMessages:
    """Readings -> (topic, rosbags message), for one config."""

    def __init__(self, robot: RobotConfig, cell: CellConfig):
        self.robot, self.cell_cfg = robot, cell
        self.topics = cell_topics(robot, cell)
        self.ts = make_typestore(distro_of(robot), "ros_drivers")

    def message(self, r):
        ts, cfg = self.ts, self.cell_cfg
        ids = cfg.frame_ids
        if isinstance(r, CameraFrame):
            if cfg.camera.encoding == "jpeg":
                return self.topics.camera[0], M.compressed_image(ts, r.stamp, ids.camera,
                                                                  encode_jpeg(r.pixels, cfg.camera.jpeg_quality),
                                                                  fmt=JPEG_FORMAT)
            return self.topics.camera[0], M.image(ts, r.stamp, ids.camera, r.pixels)
        if isinstance(r, AudioChunk):
            if self.robot.inputs.audio.type == "image_pcm":
                return self.topics.audio[0], M.image_pcm(ts, r.stamp, ids.audio, r.pcm.astype("<i2"))
            return self.topics.audio[0], M.audio_data_stamped(ts, r.stamp, ids.audio, r.pcm.astype("<i2"))
        if isinstance(r, LidarScan):
            return self.topics.lidar[0], M.laser_scan(ts, r.stamp, ids.lidar, r.ranges, r.range_min,
                                                      r.range_max, r.scan_time)
        if isinstance(r, ImuReading):
            return self.topics.imu[0], M.imu(ts, r.stamp, ids.imu, r.accel, r.gyro)
        if isinstance(r, JointReading):
            return self.topics.joint_states, M.joint_state(ts, M.stamp_ns(r.stamp), JOINT_NAMES, r.position, r.velocity,
                                                     r.effort, frame_id=ids.joint_states)
        raise TypeError(type(r))

