"""camera_node: an OpenCV VideoCapture source published as sensor_msgs/Image, stamped at capture.

The source is a device index, a video file or a URL. A video file plays at its
own frame rate (or ``fps``), optionally looping, and is published exactly like
a camera, which is how the live pipeline is tested on machines without one.

Stamps. A device frame is stamped when ``grab()`` returns, before it is
decoded, which is the closest this API gets to the exposure. A file frame is
stamped after it is decoded: decoding the file stands in for the sensor's
readout, so capture -> receipt measures what a real camera driver would add
(colour conversion, message, transport), not our video codec.

Capture runs on its own thread (a device read blocks until the next frame); the
executor on the main thread serves parameters and shutdown.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import Image

from ..bag.typestore import make_typestore
from ..procs import print_stats
from .convert import s_to_stamp_fields
from .params import CameraNodeConfig, Spinner, declare_config, node_main
from .qos import SubscriberGate, sensor_qos, wait_for_acks

NODE_NAME = "camera_node"


def image_cdr(frame_bgr: np.ndarray, stamp_s: float, frame_id: str, encoding: str) -> bytes:
    """A serialized sensor_msgs/Image from an OpenCV frame (BGR, or grey for mono sources).

    Built by rosbags straight from the numpy frame instead of an rclpy Image message (whose
    conversion in publish() copies the pixels element by element), because all of it is inside the
    capture -> receipt time of every frame: about 0.05 ms for 640x480 once freed buffers are kept
    (``mm_fusion_ros.memory``, applied by ``node_main``), about 1 ms of page faults without that.
    """
    if frame_bgr.ndim == 2:
        frame_bgr = cv2.cvtColor(frame_bgr, cv2.COLOR_GRAY2BGR)
    pixels = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB) if encoding == "rgb8" else frame_bgr
    store = make_typestore()
    types = store.types
    sec, nanosec = s_to_stamp_fields(stamp_s)
    header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec),
                                          frame_id=frame_id)
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    msg = types["sensor_msgs/msg/Image"](header=header, height=height, width=width, encoding=encoding,
                                         is_bigendian=0, step=width * 3,
                                         data=np.ascontiguousarray(pixels).reshape(-1))
    return bytes(store.serialize_cdr(msg, "sensor_msgs/msg/Image"))


def open_capture(source: str) -> tuple[cv2.VideoCapture, bool]:
    """(capture, is_file). Raises ValueError naming the source when it cannot be opened."""
    is_file = Path(source).is_file()
    capture = cv2.VideoCapture(int(source)) if source.isdigit() else cv2.VideoCapture(source)
    if not capture.isOpened():
        kind = "device" if source.isdigit() else "file" if is_file else "source (no such file, or an unreachable URL)"
        raise ValueError(f"cannot open camera {kind} {source!r}")
    return capture, is_file


class CameraNode(Node):
    def __init__(self, *, context=None, parameter_overrides=None, cli_args=None):
        super().__init__(NODE_NAME, context=context, parameter_overrides=parameter_overrides, cli_args=cli_args,
                         automatically_declare_parameters_from_overrides=True)
        self.cfg: CameraNodeConfig = declare_config(self, CameraNodeConfig)
        self.capture, self.is_file = open_capture(self.cfg.source)
        if self.cfg.width and not self.is_file:  # ask the device first; frames are resized anyway if it declines
            self.capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.cfg.width)
            self.capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.height)
        source_fps = self.capture.get(cv2.CAP_PROP_FPS) or 0.0
        self.fps = self.cfg.fps or (source_fps if source_fps > 0 else 30.0)
        self.publisher = self.create_publisher(Image, self.cfg.topic, sensor_qos(self.cfg.qos, self.cfg.depth))
        image_cdr(np.zeros((2, 2, 3), np.uint8), 1.0, "", self.cfg.encoding)   # builds rosbags' serializer now
        self.published = 0
        self.read_failures = 0
        self._spinner = Spinner(self)
        self.stopping = self._stop = self._spinner.stopping
        self._thread = threading.Thread(target=self._run, name="camera-capture", daemon=True)
        what = f"file {self.cfg.source} at {self.fps:g} fps{' (looping)' if self.cfg.loop else ''}" \
            if self.is_file else f"device/stream {self.cfg.source}"
        self.get_logger().info(f"publishing {what} on {self.cfg.topic} as {self.cfg.encoding}")

    def _read(self) -> tuple[np.ndarray | None, float]:
        """One frame and its capture stamp; (None, 0) at the end of a file or on a read error."""
        if not self.capture.grab():
            return None, 0.0
        grabbed = self.get_clock().now().nanoseconds * 1e-9
        ok, frame = self.capture.retrieve()
        if not ok or frame is None:
            return None, 0.0
        stamp = self.get_clock().now().nanoseconds * 1e-9 if self.is_file else grabbed
        return frame, stamp

    def _run(self) -> None:
        if not SubscriberGate([self.publisher], self.cfg.wait_for_subscribers).wait(self._stop):
            return
        period = 1.0 / self.fps
        next_frame = time.monotonic()
        rewound = False
        while not self._stop.is_set() and self.context.ok():
            if self.is_file:  # a file has no clock of its own: pace it in real time
                delay = next_frame - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
            frame, stamp = self._read()
            if frame is None:
                if self.is_file and self.cfg.loop and not rewound:  # rewound twice in a row: the file is unreadable
                    rewound = True
                    self.capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    continue
                self.read_failures += 1
                if self.is_file:
                    self.get_logger().info(f"end of {self.cfg.source} after {self.published} frames")
                    return
                if self.read_failures % 30 == 1:
                    self.get_logger().warning(f"camera {self.cfg.source}: read failed ({self.read_failures} so far)")
                self._stop.wait(0.1)
                continue
            rewound = False
            if self.cfg.width and (frame.shape[1], frame.shape[0]) != (self.cfg.width, self.cfg.height):
                frame = cv2.resize(frame, (self.cfg.width, self.cfg.height), interpolation=cv2.INTER_AREA)
            try:
                self.publisher.publish(image_cdr(frame, stamp, self.cfg.frame_id, self.cfg.encoding))
            except Exception:  # the context went down between the check and the publish: we are stopping
                if self.context.ok():
                    raise
                return
            self.published += 1
            next_frame += period
            if next_frame < time.monotonic() - period:  # fell behind (a stall): skip, never burst
                next_frame = time.monotonic()

    def spin(self) -> None:
        self._thread.start()
        self._spinner.spin()

    def close(self) -> None:
        self._spinner.close()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        self.capture.release()
        wait_for_acks([self.publisher])
        print_stats({"node": self.get_name(), "published": {"camera": self.published}})
        self.destroy_node()


def main(args: list[str] | None = None) -> int:
    return node_main(NODE_NAME, CameraNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
