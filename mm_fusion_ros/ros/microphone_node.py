"""microphone_node: PortAudio capture (sounddevice) or a WAV file -> the audio topic, in fixed chunks.

Each message is ``chunk_s`` of PCM stamped with the capture time of its first
sample. From a sound card that time comes from PortAudio's ADC clock: the
callback's ``inputBufferAdcTime`` is mapped onto the ROS clock through
``currentTime`` (both on the stream's clock), so the stamp does not carry the
callback's scheduling delay. A WAV file is paced in real time and stamped as if
it were being captured now.

Consecutive chunks are stamped back to back (the previous chunk's end) as long
as the measured time agrees within ``_RESYNC_S``: the aligner treats a chunk
that overlaps the previous one as out of order, and ADC timestamps jitter by
more than one sample period. A larger disagreement (an overflow, a stall) is a
real gap and re-anchors the stamps.

The message type is the configured one when audio_common_msgs is importable;
otherwise the documented fallback ``image_pcm`` (sensor_msgs/Image, height 1,
width = frames, encoding 16SC<channels> or 32FC<channels>, interleaved
little-endian PCM), logged as an error naming the fallback.
"""

from __future__ import annotations

import queue
import threading
import time
import wave
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from rclpy.node import Node

from ..procs import print_stats
from .convert import s_to_stamp_fields
from .params import MicrophoneNodeConfig, Spinner, audio_message_types, declare_config, node_main
from .qos import SubscriberGate, latched_qos, sensor_qos, wait_for_acks

NODE_NAME = "microphone_node"
_RESYNC_S = 0.005
# PortAudio sample format codes (portaudio.h), used by audio_common_msgs/AudioStamped's AudioInfo.format.
_PA_FORMAT = {"S16LE": 8, "F32LE": 1}


class ContiguousStamps:
    """Stamps for consecutive chunks: back to back unless the measured time disagrees by more than ``resync_s``."""

    def __init__(self, rate: int, resync_s: float = _RESYNC_S):
        self.rate = rate
        self.resync_s = resync_s
        self._next: float | None = None
        self.resyncs = 0

    def stamp(self, measured_s: float, frames: int) -> float:
        if self._next is None or abs(measured_s - self._next) > self.resync_s:
            if self._next is not None:
                self.resyncs += 1
            self._next = measured_s
        stamp = self._next
        self._next = stamp + frames / self.rate
        return stamp


# ---------------------------------------------------------------- messages

def pcm_image_msg(pcm: np.ndarray, stamp_s: float, frame_id: str) -> Any:
    """The image_pcm fallback: one row of interleaved PCM, (frames, channels) int16 or float32."""
    from sensor_msgs.msg import Image

    frames, channels = pcm.shape
    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = s_to_stamp_fields(stamp_s)
    msg.header.frame_id = frame_id
    msg.height, msg.width = 1, int(frames)
    msg.encoding = f"16SC{channels}" if pcm.dtype == np.int16 else f"32FC{channels}"
    msg.is_bigendian = 0
    msg.step = int(frames * channels * pcm.dtype.itemsize)
    msg.data = np.ascontiguousarray(pcm, dtype=pcm.dtype.newbyteorder("<")).tobytes()
    return msg


class AudioPublisher:
    """Publishes PCM chunks as the configured audio type, or the image_pcm fallback."""

    def __init__(self, node: Node, cfg: MicrophoneNodeConfig, sample_rate: int, channels: int):
        self.cfg, self.rate, self.channels = cfg, sample_rate, channels
        self.kind, self.msg_type, info_type = audio_message_types(cfg.type)
        if self.kind != cfg.type:
            node.get_logger().error(
                f"type={cfg.type}: audio_common_msgs is not importable here; publishing the fallback image_pcm "
                f"(sensor_msgs/Image, one row of PCM) on {cfg.topic}")
        self.publisher = node.create_publisher(self.msg_type, cfg.topic, sensor_qos(cfg.qos, cfg.depth))
        if info_type is not None:  # AudioDataStamped carries no format: AudioInfo says it, latched
            info = info_type(channels=channels, sample_rate=sample_rate, sample_format=cfg.sample_format,
                             bitrate=sample_rate * channels * (16 if cfg.sample_format == "S16LE" else 32),
                             coding_format="wave")
            self._info_pub = node.create_publisher(info_type, cfg.info_topic, latched_qos())
            self._info_pub.publish(info)

    def publish(self, pcm: np.ndarray, stamp_s: float) -> None:
        if self.kind == "image_pcm":
            msg = pcm_image_msg(pcm, stamp_s, self.cfg.frame_id)
        elif self.kind == "audio_data_stamped":
            msg = self.msg_type()
            msg.header.stamp.sec, msg.header.stamp.nanosec = s_to_stamp_fields(stamp_s)
            msg.header.frame_id = self.cfg.frame_id
            msg.audio.data = np.ascontiguousarray(pcm).tobytes()
        else:  # audio_stamped (mgonzs13/audio_common): typed arrays plus the format in the message
            msg = self.msg_type()
            msg.header.stamp.sec, msg.header.stamp.nanosec = s_to_stamp_fields(stamp_s)
            msg.header.frame_id = self.cfg.frame_id
            info = msg.audio.info
            info.format, info.channels, info.rate, info.chunk = \
                _PA_FORMAT[self.cfg.sample_format], self.channels, self.rate, int(pcm.shape[0])
            if pcm.dtype == np.int16:
                msg.audio.audio_data.int16_data = pcm.reshape(-1).tolist()
            else:
                msg.audio.audio_data.float32_data = pcm.reshape(-1).tolist()
        self.publisher.publish(msg)


# ---------------------------------------------------------------- sources

def _as_format(pcm_int16: np.ndarray, sample_format: str) -> np.ndarray:
    return pcm_int16 if sample_format == "S16LE" else (pcm_int16.astype(np.float32) / 32768.0)


class WavSource:
    """16-bit PCM WAV read in chunks; ``loop`` starts again at the end."""

    def __init__(self, path: str, chunk_s: float, loop: bool):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"WAV file not found: {self.path}")
        try:
            with wave.open(str(self.path), "rb") as wav:
                self.rate, self.channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
                self.total = wav.getnframes()
        except (wave.Error, EOFError) as exc:
            raise ValueError(f"{self.path}: not a PCM WAV file ({exc})") from None
        if width != 2:
            raise ValueError(f"{self.path}: {8 * width}-bit samples; microphone_node reads 16-bit PCM WAV")
        if self.total == 0:
            raise ValueError(f"{self.path}: no audio frames")
        self.frames = max(1, int(round(chunk_s * self.rate)))
        self.loop = loop

    def chunks(self) -> Iterator[np.ndarray]:
        while True:
            with wave.open(str(self.path), "rb") as wav:
                while True:
                    raw = wav.readframes(self.frames)
                    if len(raw) < self.frames * self.channels * 2:
                        break  # the short tail would break the fixed chunk size; the loop restarts instead
                    yield np.frombuffer(raw, dtype="<i2").reshape(-1, self.channels)
            if not self.loop:
                return


class MicrophoneNode(Node):
    def __init__(self, *, context=None, parameter_overrides=None, cli_args=None):
        super().__init__(NODE_NAME, context=context, parameter_overrides=parameter_overrides, cli_args=cli_args,
                         automatically_declare_parameters_from_overrides=True)
        self.cfg: MicrophoneNodeConfig = declare_config(self, MicrophoneNodeConfig)
        self.published = 0
        self.overflows = 0
        self._spinner = Spinner(self)
        self.stopping = self._stop = self._spinner.stopping
        self._stream = None
        if self.cfg.source.lower().endswith(".wav"):
            self.wav = WavSource(self.cfg.source, self.cfg.chunk_s, self.cfg.loop)
            rate, channels = self.wav.rate, self.wav.channels
            if rate != self.cfg.sample_rate:
                self.get_logger().warning(f"{self.cfg.source} is {rate} Hz, not sample_rate={self.cfg.sample_rate}: "
                                          f"publishing at the file's rate")
            self._thread = threading.Thread(target=self._run_wav, name="microphone-wav", daemon=True)
        else:
            self.wav = None
            rate, channels = self.cfg.sample_rate, self.cfg.channels
            self._queue: queue.Queue = queue.Queue(maxsize=256)
            self._thread = threading.Thread(target=self._run_device, name="microphone-publish", daemon=True)
        self.rate, self.channels = rate, channels
        self.out = AudioPublisher(self, self.cfg, rate, channels)
        self.stamps = ContiguousStamps(rate)
        self.get_logger().info(f"publishing {self.cfg.source} ({rate} Hz, {channels} ch, {self.cfg.chunk_s * 1e3:g} ms "
                               f"chunks) on {self.cfg.topic} as {self.out.kind}")

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _emit(self, pcm: np.ndarray, measured_s: float) -> None:
        try:
            self.out.publish(pcm, self.stamps.stamp(measured_s, pcm.shape[0]))
        except Exception:  # the context went down between the check and the publish: we are stopping
            if self.context.ok():
                raise
            self._stop.set()
            return
        self.published += 1

    def _wait_for_subscribers(self) -> bool:
        return SubscriberGate([self.out.publisher], self.cfg.wait_for_subscribers).wait(self._stop)

    def _run_wav(self) -> None:
        if not self._wait_for_subscribers():
            return
        chunk_s = self.wav.frames / self.rate
        start, start_ros = time.monotonic(), self._now_s()
        for k, pcm in enumerate(self.wav.chunks()):
            # Chunk k is complete once its last sample "was captured", like a sound card delivers it.
            delay = start + (k + 1) * chunk_s - time.monotonic()
            if (delay > 0 and self._stop.wait(delay)) or self._stop.is_set() or not self.context.ok():
                return
            self._emit(_as_format(pcm, self.cfg.sample_format), start_ros + k * chunk_s)
        self.get_logger().info(f"end of {self.cfg.source} after {self.published} chunks")

    def _open_device(self) -> Any:
        try:
            import sounddevice
        except OSError as exc:  # PortAudio's shared library is missing
            raise RuntimeError(f"sounddevice cannot load PortAudio ({exc}); install libportaudio2 or use a .wav "
                               f"source") from None
        device: Any = int(self.cfg.source) if self.cfg.source.isdigit() else (
            None if self.cfg.source == "default" else self.cfg.source)

        def callback(indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
            now = self._now_s()
            if status.input_overflow:
                self.overflows += 1
            adc, current = time_info.inputBufferAdcTime, time_info.currentTime
            # Some host APIs report 0 for the ADC time: then assume the buffer just filled.
            captured = now - (current - adc) if adc > 0 and current >= adc else now - frames / self.rate
            try:
                self._queue.put_nowait((indata.copy(), captured))
            except queue.Full:
                self.overflows += 1

        return sounddevice.InputStream(
            samplerate=self.rate, channels=self.channels, device=device, callback=callback,
            dtype="int16" if self.cfg.sample_format == "S16LE" else "float32",
            blocksize=max(1, int(round(self.cfg.chunk_s * self.rate))))

    def _run_device(self) -> None:
        if not self._wait_for_subscribers():
            return
        while not self._stop.is_set() and self.context.ok():
            try:
                pcm, captured = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._emit(pcm, captured)

    def spin(self) -> None:
        if self.wav is None:  # open the sound card before the thread, so a missing device fails the start
            self._stream = self._open_device()
            self._stream.start()
        self._thread.start()
        self._spinner.spin()

    def close(self) -> None:
        self._spinner.close()
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        wait_for_acks([self.out.publisher])
        print_stats({"node": self.get_name(), "published": {"audio": self.published},
                     "overflows": self.overflows, "resyncs": self.stamps.resyncs})
        self.destroy_node()


def main(args: list[str] | None = None) -> int:
    return node_main(NODE_NAME, MicrophoneNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
