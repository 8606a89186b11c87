"""Temporal alignment: sensor samples in, one model input (Observation) per control tick out.

Why not message_filters: its approximate-time policy emits one message per
topic at the slowest topic's rate, so a 10 Hz LiDAR throttles the whole model
to 10 Hz and 19 of 20 IMU messages and most audio never reach it. Here each
modality has its own ring buffer keyed by capture stamp, and every tick takes
from each what the model wants: the newest camera frame and LiDAR scan, the
last second of audio, the last 0.2 s of IMU resampled onto a fixed grid, the
joint state carried to the tick time from the newest sample (position plus
velocity times its age: the same first-order hold the IMU grid's newest point
gets, without waiting for a sample after the tick). A
modality that is late or silent is masked for the tick; it never blocks it.

Determinism: the result depends only on the sequence of ``add``/``tick``
calls (no wall clock in the data path), and data stamped after the tick time
is never used, so a bag replayed at any speed gives the same observations.

Threads: ``add`` runs in subscription callbacks, ``tick`` on the control
thread. One lock guards the buffers and is held only to copy in or out;
image decoding, audio resampling and IMU interpolation run outside it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from .config import MODALITIES, RobotConfig
from .samples import (COMPRESSED_FORMATS, RAW_ENCODINGS, AudioSample, BadSample, CameraSample, ImuSample,
                      JointStateSample, LidarSample, Observation, Sample)
from .sensors import StreamResampler, can_resample, decode_camera, interpolate_rows

_INDEX = {name: i for i, name in enumerate(MODALITIES)}
# A sample stamped exactly on a grid point must land on it despite float rounding of t * rate.
_GRID_EPS = 1e-6
# Camera frames and scans kept at most, whatever their rate; ticks drop the ones they can no longer use.
_MAX_FRAMES = 64


class _Newest:
    """Whole samples (camera frames, LiDAR scans, joint states) in stamp order; a tick takes the newest
    at or before t."""

    def __init__(self, maxlen: int = _MAX_FRAMES) -> None:
        self.items: deque = deque(maxlen=maxlen)

    def order_problem(self, stamp: float) -> str | None:
        if not self.items:
            return None
        newest = self.items[-1].stamp
        return "duplicate" if stamp == newest else "out_of_order" if stamp < newest else None

    def append(self, sample, keep_s: float) -> None:
        self.items.append(sample)
        while self.items[0].stamp < sample.stamp - keep_s:
            self.items.popleft()

    def at(self, t: float):
        """The newest sample stamped at or before t; older ones are dropped (later ticks cannot use them)."""
        for i in range(len(self.items) - 1, -1, -1):
            if self.items[i].stamp <= t:
                for _ in range(i):
                    self.items.popleft()
                return self.items[0]
        return None


class _ImuRing:
    """IMU rows (accel xyz, gyro xyz) by stamp in a fixed ring written twice, so the newest n are contiguous."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.stamps = np.zeros(2 * capacity, dtype=np.float64)
        self.rows = np.zeros((2 * capacity, 6), dtype=np.float64)
        self.pos = 0
        self.count = 0

    @property
    def newest(self) -> float | None:
        return float(self.stamps[self.pos - 1 + self.capacity]) if self.count else None

    def append(self, stamp: float, accel: np.ndarray, gyro: np.ndarray) -> None:
        for p in (self.pos, self.pos + self.capacity):
            self.stamps[p] = stamp
            self.rows[p, :3] = accel
            self.rows[p, 3:] = gyro
        self.pos = (self.pos + 1) % self.capacity
        self.count = min(self.count + 1, self.capacity)

    def window(self, t: float, t_first: float) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the samples stamped <= t, from the last one at or before ``t_first``."""
        end = self.pos + self.capacity
        stamps = self.stamps[end - self.count:end]
        hi = int(np.searchsorted(stamps, t, side="right"))
        lo = max(int(np.searchsorted(stamps, t_first, side="right")) - 1, 0)
        return stamps[lo:hi].copy(), self.rows[end - self.count + lo:end - self.count + hi].copy()


def hop_grid_end(index: int, hop: int) -> int:
    """The last sample index at or before ``index`` that ends a hop ((k + 1) % hop == 0): where audio
    windows end, so that consecutive windows differ by whole hops."""
    return (index + 1) // hop * hop - 1


@dataclass
class _Run:
    """A run of written audio samples [start, end) in absolute model-rate sample indices."""

    start: int
    end: int


class _AudioRing:
    """Mono audio at the model rate on an absolute sample grid: sample k is at time k / rate.

    Writes never leave stale data behind: samples skipped by a gap are zeroed,
    and the runs of real samples are kept so a window can count its zeros.
    """

    def __init__(self, rate: int, capacity: int, hop: int):
        self.rate = rate
        self.capacity = capacity
        self.hop = hop
        self.data = np.zeros(capacity, dtype=np.float32)
        self.head: int | None = None      # one past the newest written sample
        self.runs: deque[_Run] = deque()
        # Lowest index written over (below the head) since take_rewritten(): the model's cached
        # log-mel frames of older samples are only valid if nothing under them changed.
        self.rewritten_from: int | None = None
        # The previous chunk in its own (source) time, for the order and continuity checks.
        self.last_stamp: float | None = None
        self.last_end: float | None = None
        self.last_src_rate: int | None = None

    def classify(self, chunk: AudioSample) -> tuple[str | None, bool]:
        """(drop cause or None, whether the chunk continues the previous one without a gap)."""
        if self.last_stamp is None:
            return None, False
        if chunk.stamp == self.last_stamp:
            return "duplicate", False
        half = 0.5 / chunk.sample_rate
        if chunk.stamp < self.last_end - half:
            return "out_of_order", False
        continues = chunk.stamp <= self.last_end + half and chunk.sample_rate == self.last_src_rate
        return None, continues

    def _put(self, index: int, values: np.ndarray) -> None:
        p = index % self.capacity
        first = min(values.size, self.capacity - p)
        self.data[p:p + first] = values[:first]
        self.data[:values.size - first] = values[first:]

    def _zero(self, start: int, stop: int) -> None:
        if stop - start >= self.capacity:
            self.data[:] = 0.0
            return
        p, n = start % self.capacity, stop - start
        first = min(n, self.capacity - p)
        self.data[p:p + first] = 0.0
        self.data[:n - first] = 0.0

    def write(self, index: int, values: np.ndarray, continues: bool, chunk: AudioSample) -> int:
        """Write ``values`` starting at sample ``index``; returns the gap (zeros filled) before them."""
        gap = 0
        if self.head is None:
            self.head = index
        if continues and self.runs and index < self.runs[-1].start:
            # The resampler's recomputed lead may reach back past where this run began: that is silence.
            values, index = values[self.runs[-1].start - index:], self.runs[-1].start
        if index > self.head:
            gap = index - self.head if self.runs else 0
            self._zero(self.head, index)
        stop = index + values.size
        new_head = max(self.head, stop)
        oldest = new_head - self.capacity
        if index < oldest:
            values, index = values[oldest - index:], oldest
        if index < self.head:
            self.rewritten_from = index if self.rewritten_from is None else min(self.rewritten_from, index)
        self._put(index, values)
        self.head = new_head
        if self.runs and index <= self.runs[-1].end:
            run = self.runs[-1]
            run.start, run.end = min(run.start, index), max(run.end, stop)
        else:
            self.runs.append(_Run(index, stop))
        while self.runs and self.runs[0].end <= oldest:
            self.runs.popleft()
        if self.runs and self.runs[0].start < oldest:
            self.runs[0].start = oldest
        self.last_stamp, self.last_end, self.last_src_rate = chunk.stamp, chunk.end, chunk.sample_rate
        return gap

    def take_rewritten(self) -> int | None:
        first, self.rewritten_from = self.rewritten_from, None
        return first

    def window(self, t: float, n: int) -> tuple[np.ndarray, int, int] | None:
        """(the n samples ending at the newest hop-grid sample at or before t, its index, zeros in it) or None.

        The window ends on the grid of sample indices k with (k + 1) % hop == 0, at most one hop
        before the newest sample: consecutive windows then differ by whole hops, so the model's
        log-mel frames of the previous window are this window's frames moved along.
        """
        kt = math.floor(t * self.rate + _GRID_EPS)
        newest = None
        for run in reversed(self.runs):
            if run.start <= kt:
                newest = min(kt, run.end - 1)
                break
        if newest is None:
            return None
        newest = hop_grid_end(newest, self.hop)
        if newest < self.runs[0].start:
            return None
        lo = newest - n + 1
        p = lo % self.capacity
        first = min(n, self.capacity - p)
        out = np.empty(n, dtype=np.float32)
        out[:first] = self.data[p:p + first]
        out[first:] = self.data[:n - first]
        # Slots of samples older than head - capacity now hold newer samples written over them:
        # with audio stamped ahead of the tick, audio from after t. Those samples are gone; they read
        # as zeros (counted below, since the runs start at or after that index), never as later audio.
        lost = min(self.head - self.capacity - lo, n)
        if lost > 0:
            out[:lost] = 0.0
        real = sum(max(0, min(run.end, newest + 1) - max(run.start, lo)) for run in self.runs)
        return out, newest, n - real


class _AudioIntake:
    """One audio stream's resampler and where its segment sits on the model-rate grid.

    Within a segment, samples are placed by count (the sample clock), which
    keeps chunks gapless whatever the rounding of their stamps; when the stamps
    drift more than one model sample away from that count (the sound card's
    clock against the robot's), the placement follows the stamps.
    """

    def __init__(self, src_rate: int, dst_rate: int, generation: int):
        self.key = (src_rate, generation)
        self.dst_rate = dst_rate
        self.resampler = StreamResampler(src_rate, dst_rate)
        self.origin = 0   # model-rate index of the segment's first sample

    def place(self, chunk: AudioSample, continues: bool) -> tuple[np.ndarray, int]:
        """(samples at the model rate, index of the first on the absolute grid)."""
        values, first, start = self.resampler.process(chunk.samples, continues)
        target = chunk.stamp * self.dst_rate
        if not continues:
            self.origin = round(target - start)
        elif abs(target - (self.origin + start)) > 1.0:
            self.origin += round(target - (self.origin + start))
        return values, self.origin + first


class Aligner:
    """Ring buffers by capture stamp and the per-tick assembly of the model input.

    ``counters`` counts drops by cause (``"imu.out_of_order"``,
    ``"camera.duplicate"``, ``"lidar.future_stamp"``, ``"camera.decode_failed"``,
    ...), accepted samples (``"<modality>.accepted"``), ``"audio.gap_samples"``
    (zeros filled between chunks, counted once when the gap is found) and
    ``"resets"``.
    """

    def __init__(self, cfg: RobotConfig):
        self.cfg = cfg
        m, inputs = cfg.model, cfg.inputs
        self.counters: Counter[str] = Counter()
        self._max_age = {name: getattr(inputs, name).max_age for name in MODALITIES}
        self._lock = threading.Lock()
        self._audio_lock = threading.Lock()   # one audio add at a time: the resampler has state
        self._generation = 0
        self._intake: _AudioIntake | None = None
        self._camera_shape = (m.camera.height, m.camera.width, 3)
        self._audio_n = m.audio.window_samples
        self._audio_rate = m.audio.sample_rate
        # buffer_s behind the tick even while audio arrives stamped up to max_future_s ahead of it
        # (the ring's window check keeps anything later out regardless).
        self._audio_capacity = int(math.ceil((inputs.buffer_s + inputs.max_future_s) * m.audio.sample_rate))
        self._imu_n = m.imu.window_samples
        self._imu_offsets = -np.arange(m.imu.window_samples - 1, -1, -1, dtype=np.float64) / m.imu.rate_hz
        # Enough for a 1 kHz IMU over the whole history; faster ones keep at least the model window.
        self._imu_capacity = max(256, int(math.ceil(inputs.buffer_s * 1000.0)))
        self._beams = m.lidar.beams
        self._dof = m.action.dof
        # Joint states come at up to 1 kHz: room for the history and for samples stamped up to max_future_s
        # ahead of the tick (64 would hold only 64 ms of them, and push out the ones a tick needs).
        self._joints_capacity = max(_MAX_FRAMES, int(math.ceil((inputs.buffer_s + inputs.max_future_s) * 1000.0)))
        self._nominal_dt = 1.0 / cfg.control_rate_hz
        self._last_t: float | None = None
        self._clear()

    # ------------------------------------------------------------ state

    def _clear(self) -> None:
        self._camera = _Newest()
        self._lidar = _Newest()
        self._joints = _Newest(self._joints_capacity)
        self._imu = _ImuRing(self._imu_capacity)
        self._audio = _AudioRing(self._audio_rate, self._audio_capacity, self.cfg.model.audio.hop)
        self._decoded: OrderedDict[float, np.ndarray | None] = OrderedDict()

    def reset(self) -> None:
        """Forget all buffered data (a looping bag, a restarted simulator)."""
        with self._lock:
            self._clear()
            self._generation += 1
            self._last_t = None
            self.counters["resets"] += 1

    # ------------------------------------------------------------ add

    def add(self, sample: Sample, now: float) -> bool:
        """Buffer one sample; False when it is dropped (and counted).

        ``now`` is the receiver's clock at arrival (the ROS clock live, the
        bag's receive time in replay); it only serves to refuse stamps from the
        future.
        """
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite time in seconds, got {now}")
        name = _modality(sample)
        cause = _check(sample, self.cfg) or self._stamp_problem(sample.stamp, now)
        if cause is not None:
            return self._drop(name, cause)
        if name == "audio":
            return self._add_audio(sample)
        with self._lock:
            if name == "imu":
                newest = self._imu.newest
                cause = None if newest is None else (
                    "duplicate" if sample.stamp == newest else "out_of_order" if sample.stamp < newest else None)
                if cause is None:
                    self._imu.append(sample.stamp, sample.accel, sample.gyro)
            else:
                buffer = {"camera": self._camera, "lidar": self._lidar, "joint_state": self._joints}[name]
                cause = buffer.order_problem(sample.stamp)
                if cause is None:
                    buffer.append(sample, self.cfg.inputs.buffer_s)
            return self._count(name, cause)

    def _stamp_problem(self, stamp: float, now: float) -> str | None:
        if not math.isfinite(stamp):
            return "bad_stamp"
        if stamp > now + self.cfg.inputs.max_future_s:
            return "future_stamp"
        return None

    def _drop(self, name: str, cause: str) -> bool:
        with self._lock:
            return self._count(name, cause)

    def _count(self, name: str, cause: str | None) -> bool:
        # Called with the lock held.
        self.counters[f"{name}.{cause or 'accepted'}"] += 1
        return cause is None

    def _add_audio(self, chunk: AudioSample) -> bool:
        with self._audio_lock:
            with self._lock:
                cause, continues = self._audio.classify(chunk)
                if cause is not None:
                    return self._count("audio", cause)
                generation = self._generation
            intake = self._intake
            if intake is None or intake.key != (chunk.sample_rate, generation):
                intake = self._intake = _AudioIntake(chunk.sample_rate, self._audio_rate, generation)
                continues = False
            values, index = intake.place(chunk, continues)
            with self._lock:
                if generation != self._generation:
                    return self._count("audio", "dropped_by_reset")
                gap = self._audio.write(index, values, continues, chunk)
                self.counters["audio.gap_samples"] += gap
                return self._count("audio", None)

    # ------------------------------------------------------------ tick

    def tick(self, t: float, dt: float) -> Observation:
        """The model input for the control tick at time ``t`` (``dt`` since the previous tick).

        A tick time earlier than the previous one (a looping bag, a restarted
        simulator) resets the buffers and sets ``reset``; a non-positive or
        non-finite ``dt`` is replaced by the nominal tick period (counted as
        ``"tick.bad_dt"``), because it feeds the recurrent cells directly.
        """
        start = time.perf_counter()
        if not math.isfinite(t):
            raise ValueError(f"tick time must be finite, got {t}")
        was_reset = self._last_t is not None and t < self._last_t
        if was_reset:
            self.reset()
        self._last_t = t
        if not (math.isfinite(dt) and dt > 0.0):
            dt = self._nominal_dt
            with self._lock:
                self.counters["tick.bad_dt"] += 1

        imu_first = t + self._imu_offsets[0]
        with self._lock:
            frame = self._camera.at(t)
            scan = self._lidar.at(t)
            joints = self._joints.at(t)
            imu_stamps, imu_rows = self._imu.window(t, imu_first)
            audio = self._audio.window(t, self._audio_n)
            audio_rewritten_from = self._audio.take_rewritten()
            cached = frame is not None and frame.stamp in self._decoded

        ages = {name: math.inf for name in MODALITIES}
        stamps = {name: math.nan for name in MODALITIES}
        mask = np.zeros(len(MODALITIES), dtype=np.float32)
        notes: dict[str, int] = {}
        preprocess = 0.0

        def use(name: str, stamp: float) -> bool:
            ages[name] = t - stamp
            if ages[name] > self._max_age[name]:
                return False
            stamps[name] = stamp
            mask[_INDEX[name]] = 1.0
            return True

        camera = np.zeros(self._camera_shape, dtype=np.uint8)
        if frame is not None and use("camera", frame.stamp):
            p0 = time.perf_counter()
            image = self._decoded_frame(frame, cached)
            preprocess += time.perf_counter() - p0
            if not cached:
                notes["camera_decoded"] = 1
            if image is None:
                mask[_INDEX["camera"]] = 0.0
                stamps["camera"] = math.nan
            else:
                camera[...] = image

        audio_window = np.zeros(self._audio_n, dtype=np.float32)
        gap_samples = 0   # counted for a window the model uses; a masked one is all zeros by definition
        audio_end = None
        if audio is not None:
            values, newest, zeros = audio
            if use("audio", newest / self._audio_rate):
                audio_window, gap_samples, audio_end = values, zeros, newest

        imu = np.zeros((self._imu_n, 6), dtype=np.float32)
        if imu_stamps.size and use("imu", float(imu_stamps[-1])):
            p0 = time.perf_counter()
            # Relative to t: absolute stamps (~1.7e9 s) would cost precision in the interpolation weights.
            imu = interpolate_rows(imu_stamps - t, imu_rows, self._imu_offsets)
            preprocess += time.perf_counter() - p0

        lidar = np.zeros(self._beams, dtype=np.float32)
        if scan is not None and use("lidar", scan.stamp):
            lidar = scan.ranges.astype(np.float32, copy=True)

        joint_state = np.zeros(2 * self._dof, dtype=np.float32)
        if joints is not None and use("joint_state", joints.stamp):
            joint_state[:self._dof] = joints.position + joints.velocity * (t - joints.stamp)
            joint_state[self._dof:] = joints.velocity

        total = time.perf_counter() - start
        return Observation(t=t, dt=dt, camera=camera, audio=audio_window, imu=imu, lidar=lidar,
                           joint_state=joint_state, mask=mask,
                           ages=ages, stamps=stamps, audio_gap_samples=int(gap_samples), reset=was_reset,
                           audio_end=audio_end, audio_rewritten_from=audio_rewritten_from,
                           notes=notes, timings={"align": total - preprocess, "preprocess": preprocess})

    def _decoded_frame(self, frame: CameraSample, cached: bool) -> np.ndarray | None:
        """The frame at the model size, decoded at most once (None if it cannot be decoded)."""
        if cached:
            with self._lock:
                if frame.stamp in self._decoded:
                    self._decoded.move_to_end(frame.stamp)
                    return self._decoded[frame.stamp]
        try:
            image = decode_camera(frame, self._camera_shape[0], self._camera_shape[1])
        except BadSample as exc:
            image = None
            with self._lock:
                self.counters[exc.cause] += 1
        with self._lock:
            self._decoded[frame.stamp] = image
            while len(self._decoded) > self.cfg.inputs.camera_cache:
                self._decoded.popitem(last=False)
        return image


def _modality(sample: Sample) -> str:
    if isinstance(sample, CameraSample):
        return "camera"
    if isinstance(sample, AudioSample):
        return "audio"
    if isinstance(sample, ImuSample):
        return "imu"
    if isinstance(sample, LidarSample):
        return "lidar"
    if isinstance(sample, JointStateSample):
        return "joint_state"
    raise TypeError(f"not a sensor sample: {type(sample).__name__}")


def _check(sample: Sample, cfg: RobotConfig) -> str | None:
    """A cause (without the modality prefix) if the sample cannot be buffered, else None."""
    if isinstance(sample, CameraSample):
        if sample.encoding not in RAW_ENCODINGS + COMPRESSED_FORMATS:
            return "bad_encoding"
    elif isinstance(sample, AudioSample):
        if not can_resample(sample.sample_rate, cfg.model.audio.sample_rate):
            return "bad_rate"
        if sample.samples.ndim != 1 or sample.samples.size == 0:
            return "empty"
        if sample.samples.size > cfg.model.audio.window_s * sample.sample_rate + 0.5:
            return "oversize"
    elif isinstance(sample, ImuSample):
        if np.shape(sample.accel) != (3,) or np.shape(sample.gyro) != (3,):
            return "bad_shape"
        if not (np.isfinite(sample.accel).all() and np.isfinite(sample.gyro).all()):
            return "non_finite"
    elif isinstance(sample, LidarSample):
        if np.shape(sample.ranges) != (cfg.model.lidar.beams,):
            return "bad_beams"
    elif isinstance(sample, JointStateSample):
        dof = cfg.model.action.dof
        if np.shape(sample.position) != (dof,) or np.shape(sample.velocity) != (dof,):
            return "bad_shape"
        if not (np.isfinite(sample.position).all() and np.isfinite(sample.velocity).all()):
            return "non_finite"
    return None
