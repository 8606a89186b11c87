"""Array-level sensor preprocessing shared by the aligner, the nodes and bag replay (no ROS).

Each function here is a pure function of its input (``StreamResampler`` keeps
only its own stream's past), so a frame decoded live, in replay or for a
training set comes out bit-identical.

- camera: raw or compressed frame -> (H, W, 3) uint8 RGB at the model size
- lidar: returns at arbitrary azimuths -> the model's fixed beam grid
- audio: integer/float PCM -> mono float32; a chunked stream resampled without clicks
- imu: irregular samples -> a fixed-rate window
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np
from scipy.signal import firwin, resample_poly

from .samples import COMPRESSED_FORMATS, RAW_ENCODINGS, BadSample, CameraSample

# ---------------------------------------------------------------- camera

_RAW_CHANNELS = {"rgb8": 3, "bgr8": 3, "mono8": 1}
assert set(_RAW_CHANNELS) == set(RAW_ENCODINGS)


def decode_camera(sample: CameraSample, height: int, width: int) -> np.ndarray:
    """The frame as (height, width, 3) uint8 RGB, area-averaged to the model size.

    Raw frames honour ``step`` (row padding). Compressed frames are decoded with
    OpenCV; a JPEG much larger than the model size is decoded at 1/2, 1/4 or 1/8
    scale by the codec itself (DCT scaling), which is 3-4x cheaper than a full
    decode and loses nothing the model could see. Raises ``BadSample`` with cause
    ``camera.decode_failed`` for a frame that cannot be decoded.
    """
    if sample.encoding in _RAW_CHANNELS:
        image = _raw_view(sample)
    elif sample.encoding in COMPRESSED_FORMATS:
        image = _decode_compressed(sample, height, width)
    else:
        raise BadSample("camera.bad_encoding",
                        f"encoding {sample.encoding!r} is not one of {list(RAW_ENCODINGS + COMPRESSED_FORMATS)}")
    image = resize_area(image, height, width)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if sample.encoding == "rgb8":
        return np.array(image)   # a copy: never a view of the message's buffer
    # bgr8 and everything OpenCV decoded are BGR; swapping after the resize touches few pixels.
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _raw_view(sample: CameraSample) -> np.ndarray:
    channels = _RAW_CHANNELS[sample.encoding]
    h, w, step = sample.height, sample.width, sample.step
    if h <= 0 or w <= 0 or step < w * channels or sample.data.size < h * step:
        raise BadSample("camera.decode_failed",
                        f"{sample.encoding} frame {w}x{h} step {step} with {sample.data.size} bytes is inconsistent")
    rows = sample.data[: h * step].reshape(h, step)[:, : w * channels]
    return rows.reshape(h, w) if channels == 1 else rows.reshape(h, w, channels)


def _decode_compressed(sample: CameraSample, height: int, width: int) -> np.ndarray:
    flags = cv2.IMREAD_COLOR
    if sample.encoding == "jpeg":
        size = jpeg_size(sample.data)
        if size is not None:
            flags = _jpeg_reduction(size, height, width)
    image = cv2.imdecode(sample.data, flags) if sample.data.size else None
    if image is None:
        raise BadSample("camera.decode_failed",
                        f"{sample.encoding} frame of {sample.data.size} bytes could not be decoded")
    return image


def _jpeg_reduction(size: tuple[int, int], height: int, width: int) -> int:
    h, w = size
    for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                         (2, cv2.IMREAD_REDUCED_COLOR_2)):
        # The codec's scaled size is ceil(size / factor); it must not fall below the model size.
        if -(-h // factor) >= height and -(-w // factor) >= width:
            return flag
    return cv2.IMREAD_COLOR


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # DHT, JPG and DAC share the range


def jpeg_size(data: np.ndarray) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, or None if it cannot be found."""
    buf = data[:65536].tobytes()  # headers come first; never copy a whole frame for this
    if buf[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(buf):
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF_MARKERS:
            return int.from_bytes(buf[i + 5:i + 7], "big"), int.from_bytes(buf[i + 7:i + 9], "big")
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2  # markers without a length field
            continue
        i += 2 + int.from_bytes(buf[i + 2:i + 4], "big")
    return None


def resize_area(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-average ``image`` to (height, width).

    OpenCV's INTER_AREA is 3x faster for integer factors than for fractional
    ones, so a large frame is first reduced by the largest factors that divide
    each side exactly and keep it at least the target size, then area-resized
    the rest of the way.
    """
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    ky, kx = _exact_factor(h, height), _exact_factor(w, width)
    if (ky > 1 or kx > 1) and (h // ky, w // kx) != (height, width):
        image = cv2.resize(image, (w // kx, h // ky), interpolation=cv2.INTER_AREA)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def _exact_factor(size: int, target: int) -> int:
    """The largest k dividing ``size`` with size / k >= target (1 when upscaling)."""
    for k in range(max(size // max(target, 1), 1), 1, -1):
        if size % k == 0:
            return k
    return 1


# ---------------------------------------------------------------- lidar

def lidar_beams(angles: np.ndarray, ranges: np.ndarray, beams: int, valid_min: float,
                valid_max: float) -> np.ndarray:
    """Bin returns by azimuth onto ``beams`` equal bins over [-pi, pi), nearest valid return per bin.

    Bin i covers [-pi + i*w, -pi + (i+1)*w) with w = 2*pi/beams, so a scan with
    ``beams`` rays starting at -pi maps ray i to bin i (a ray on a bin edge goes
    to the bin it starts, despite rounding). A return is valid when finite and
    within [valid_min, valid_max]; bins without one are +inf, which the model
    masks per beam. Nearest wins because the closest obstacle in a direction is
    the one that matters for acting.
    """
    angles = np.asarray(angles, dtype=np.float64).ravel()
    ranges = np.asarray(ranges, dtype=np.float64).ravel()
    if angles.shape != ranges.shape:
        raise ValueError(f"lidar_beams: {angles.size} angles for {ranges.size} ranges")
    out = np.full(beams, np.inf, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(ranges) & np.isfinite(angles) & (ranges >= valid_min) & (ranges <= valid_max)
    if valid.any():
        position = np.mod(angles[valid] + math.pi, 2.0 * math.pi) * (beams / (2.0 * math.pi))
        index = np.floor(position + 1e-6).astype(np.int64) % beams
        np.minimum.at(out, index, ranges[valid])
    return out.astype(np.float32)


# ---------------------------------------------------------------- audio

_PCM_SCALE = {np.dtype(np.int8): 128.0, np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2147483648.0}


def pcm_to_mono(pcm: np.ndarray, channels: int, full_scale: float | None = None) -> np.ndarray:
    """Interleaved PCM (any supported dtype) -> mono float32, full scale +-1.

    Integers are scaled by their type's full scale (``full_scale`` overrides it,
    e.g. 2**23 for 24-bit samples in int32 containers); unsigned 8-bit is
    offset binary (128 is silence); floats are taken as already +-1. Channels
    are averaged.
    """
    pcm = np.asarray(pcm).ravel()
    if channels < 1 or pcm.size % channels:
        raise ValueError(f"{pcm.size} samples do not split into {channels} channels")
    if pcm.dtype == np.uint8:
        x = (pcm.astype(np.float32) - 128.0) / (full_scale or 128.0)
    elif pcm.dtype.kind == "f":
        x = pcm.astype(np.float32, copy=False)
    elif pcm.dtype.newbyteorder("=") in _PCM_SCALE:
        x = pcm.astype(np.float32) * np.float32(1.0 / (full_scale or _PCM_SCALE[pcm.dtype.newbyteorder("=")]))
    else:
        raise ValueError(f"unsupported PCM sample type {pcm.dtype}")
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return x


# Largest up/down factor resampled: every common rate is far below (44.1 kHz -> 16 kHz is 160/441);
# an odd rate like 44101 Hz would need a filter of ~900k taps, designed while audio waits.
MAX_RESAMPLE_FACTOR = 2000


def can_resample(src_rate: int, dst_rate: int) -> bool:
    """Whether ``src_rate`` -> ``dst_rate`` is a ratio ``StreamResampler`` accepts."""
    return src_rate > 0 and dst_rate > 0 and max(_ratio(src_rate, dst_rate)) <= MAX_RESAMPLE_FACTOR


def _ratio(src_rate: int, dst_rate: int) -> tuple[int, int]:
    g = math.gcd(int(src_rate), int(dst_rate))
    return int(dst_rate) // g, int(src_rate) // g


@lru_cache(maxsize=16)
def _lowpass(up: int, down: int) -> np.ndarray:
    # The filter scipy's resample_poly would design (Kaiser, beta 5, 10 zero crossings per side);
    # designing it per call costs more than the filtering itself, so it is made once per ratio.
    widest = max(up, down)
    taps = firwin(2 * 10 * widest + 1, 1.0 / widest, window=("kaiser", 5.0)).astype(np.float32)
    taps.flags.writeable = False
    return taps


def resample_audio(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Polyphase resampling of a whole signal (``scipy.signal.resample_poly``), float32 out."""
    up, down = _ratio(src_rate, dst_rate)
    x = np.asarray(samples, dtype=np.float32)
    if up == down:
        return x.copy()
    return resample_poly(x, up, down, window=_lowpass(up, down)).astype(np.float32, copy=False)


class StreamResampler:
    """Resamples a chunked PCM stream exactly as if it were resampled in one piece.

    Resampling each chunk alone treats the signal outside it as silence, which
    smears a click into every boundary (50 per second for 20 ms chunks, visible
    in a spectrogram), and chunks whose length is not a whole number of output
    samples (1024 at 44.1 kHz) would each start on a grid of their own. Here
    every output sample sits on one grid counted from the segment start, each
    chunk is filtered together with the end of the previous one, and the
    previous chunk's last outputs, computed before their right-hand neighbours
    were known, are computed again and returned again.
    """

    def __init__(self, src_rate: int, dst_rate: int):
        if not can_resample(src_rate, dst_rate):
            raise ValueError(f"cannot resample {src_rate} Hz -> {dst_rate} Hz: rates must be positive and their "
                             f"reduced ratio at most {MAX_RESAMPLE_FACTOR}")
        self.src_rate, self.dst_rate = int(src_rate), int(dst_rate)
        self.up, self.down = _ratio(src_rate, dst_rate)
        # Input samples on either side of an output that the filter reaches (its half-length, rounded up).
        self._reach = math.ceil(10 * max(self.up, self.down) / self.up) + 1
        self._history = np.zeros(2 * self._reach + self.down, dtype=np.float32)
        self.position = 0   # input samples consumed since the segment started

    @property
    def identity(self) -> bool:
        return self.up == self.down

    def restart(self) -> None:
        """The next chunk does not continue the previous one (a gap, a new stream)."""
        self._history[:] = 0.0
        self.position = 0

    def process(self, samples: np.ndarray, continues: bool) -> tuple[np.ndarray, int, float]:
        """Resample one chunk -> ``(out, first, start)``.

        ``out[i]`` is output sample ``first + i`` of the segment (output sample
        j lies at input sample j * src_rate / dst_rate); ``start`` is the output
        position of this chunk's first input sample, fractional in general. With
        ``continues``, ``first`` lies before ``start``: those outputs replace
        the previous chunk's last ones.
        """
        x = np.asarray(samples, dtype=np.float32).ravel()
        if not continues:
            self.restart()
        n0 = self.position
        start = n0 * self.up / self.down
        self.position += x.size
        if self.identity:
            return x, n0, float(n0)
        # The filter input starts on a multiple of `down`, so that its outputs fall on the segment's grid.
        context_start = self.down * ((n0 - 2 * self._reach) // self.down)
        joined = np.concatenate([self._history[self._history.size - (n0 - context_start):], x])
        self._history = np.concatenate([self._history, x])[-self._history.size:]
        out = resample_poly(joined, self.up, self.down, window=_lowpass(self.up, self.down))
        base = context_start * self.up // self.down
        redo_from = n0 - self._reach if continues else n0
        first = -((-redo_from * self.up) // self.down)   # ceil: the first output at or after redo_from
        return out[first - base:].astype(np.float32, copy=False), first, start


# ---------------------------------------------------------------- imu

def interpolate_rows(stamps: np.ndarray, rows: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linearly interpolate irregular ``rows`` (n, c) at ``stamps`` onto ``grid`` -> (len(grid), c) float32.

    Outside the samples the edge values are held, never extrapolated: an IMU
    that lags by a few ms must not turn into a ramp towards infinity.
    ``stamps`` must be increasing.
    """
    stamps = np.asarray(stamps, dtype=np.float64)
    rows = np.asarray(rows)
    if stamps.size == 0:
        raise ValueError("interpolate_rows needs at least one sample")
    out = np.empty((grid.size, rows.shape[1]), dtype=np.float32)
    for c in range(rows.shape[1]):
        out[:, c] = np.interp(grid, stamps, rows[:, c])
    return out
