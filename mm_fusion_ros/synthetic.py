"""Synthetic but plausible sensor data, for the demo, benchmarks and tests.

A robot in a 6 x 4 m room: a camera that sees a moving bright object, a
microphone hearing a motor hum with harmonics and noise, an IMU feeling gravity
plus vibration, a LiDAR seeing the walls (with a few beams returning nothing), an arm whose joints sway.
Deterministic for a given seed and time.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig


class SyntheticSensors:
    def __init__(self, cfg: ModelConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        h, w = cfg.camera.height, cfg.camera.width
        self._yy, self._xx = np.mgrid[0:h, 0:w].astype(np.float32)
        beams = cfg.lidar.beams
        self._angles = np.linspace(-np.pi, np.pi, beams, endpoint=False)

    def _rng(self, t: float, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, salt, int(round(t * 1e6))])

    def camera(self, t: float) -> np.ndarray:
        h, w = self.cfg.camera.height, self.cfg.camera.width
        cx, cy = w * (0.5 + 0.3 * np.sin(0.7 * t)), h * (0.5 + 0.3 * np.cos(0.5 * t))
        blob = np.exp(-((self._xx - cx) ** 2 + (self._yy - cy) ** 2) / (2 * (0.08 * w) ** 2))
        frame = np.stack([60 + 150 * blob, 40 + 80 * self._yy / h, 90 + 20 * np.sin(0.2 * t) + 0 * blob], axis=-1)
        noise = self._rng(t, 1).normal(0, 3, frame.shape)
        return np.clip(frame + noise, 0, 255).astype(np.uint8)

    def audio(self, t_end: float, n: int | None = None, rate: int | None = None) -> np.ndarray:
        """``n`` samples at ``rate`` ending at ``t_end``.

        Sample k (at time k / rate) is the same in every window that holds it, noise
        included, as a real stream's would be: overlapping windows of consecutive ticks
        must differ only by the samples that moved in and out.
        """
        rate = rate or self.cfg.audio.sample_rate
        n = n or self.cfg.audio.window_samples
        index = int(round(t_end * rate)) - np.arange(n, dtype=np.int64)[::-1]
        ts = index / rate
        hum = 0.2 * np.sin(2 * np.pi * 120 * ts) + 0.05 * np.sin(2 * np.pi * 240 * ts + 0.3)
        chirp = 0.1 * np.sin(2 * np.pi * (400 + 200 * np.sin(0.3 * ts)) * ts) * (np.sin(0.5 * ts) > 0)
        noise = 0.01 * np.sqrt(12.0) * (self._index_uniform(index, rate) - 0.5)  # std 0.01
        return (hum + chirp + noise).astype(np.float32)

    def _index_uniform(self, index: np.ndarray, salt: int) -> np.ndarray:
        """Uniform [0, 1) noise as a pure function of (seed, salt, sample index): splitmix64's mixer."""
        with np.errstate(over="ignore"):
            x = (index.astype(np.uint64) + np.uint64((self.seed * 1_000_003 + salt) % 2**63)) \
                * np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x ^= x >> np.uint64(31)
        return (x >> np.uint64(11)).astype(np.float64) / float(2**53)

    def imu(self, t_end: float, n: int | None = None, rate: float | None = None) -> np.ndarray:
        rate = rate or self.cfg.imu.rate_hz
        n = n or self.cfg.imu.window_samples
        ts = t_end - np.arange(n)[::-1] / rate
        accel = np.stack([0.3 * np.sin(2 * np.pi * 1.5 * ts), 0.2 * np.cos(2 * np.pi * 0.8 * ts),
                          9.81 + 0.05 * np.sin(2 * np.pi * 25 * ts)], axis=-1)
        gyro = np.stack([0.02 * np.sin(2 * np.pi * 0.5 * ts), 0.01 * np.cos(ts), 0.1 * np.sin(0.4 * ts)], axis=-1)
        noise = self._rng(t_end, 3).normal(0, 0.01, (n, 6))
        return (np.concatenate([accel, gyro], axis=-1) + noise).astype(np.float32)

    def lidar(self, t: float) -> np.ndarray:
        # Distance to the walls of a 6 x 4 m room from a robot drifting around its centre.
        px, py = 0.5 * np.sin(0.2 * t), 0.3 * np.cos(0.15 * t)
        c, s = np.cos(self._angles), np.sin(self._angles)
        with np.errstate(divide="ignore"):
            tx = np.where(c > 0, (3.0 - px) / c, (-3.0 - px) / c)
            ty = np.where(s > 0, (2.0 - py) / s, (-2.0 - py) / s)
        ranges = np.minimum(np.abs(tx), np.abs(ty)) + self._rng(t, 4).normal(0, 0.01, len(c))
        ranges[self._rng(t, 5).random(len(c)) < 0.02] = np.inf  # no return: glass, black surfaces
        return ranges.astype(np.float32)

    def joint_state(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """(positions, velocities) of the arm's joints at ``t``: each joint sways about its own offset."""
        k = np.arange(self.cfg.action.dof, dtype=np.float64)
        w = 0.3 + 0.1 * k
        return 0.2 * k - 0.6 + 0.4 * np.sin(w * t + k), 0.4 * w * np.cos(w * t + k)

    def joint_vector(self, t: float) -> np.ndarray:
        """What the model takes: positions then velocities, float32."""
        q, qd = self.joint_state(t)
        return np.concatenate([q, qd]).astype(np.float32)
