"""Stepping an engine through time: the recurrent state, and sensor data hygiene.

``FusionStream`` owns the state between ticks (engines are stateless): the
CfC hidden vectors, and the log-mel frames of the audio window, of which the
step computes only the newest ``model.audio.stream_frames``. It is also where
NaN/Inf in sensor data is stopped: a camera frame cannot hold NaN (uint8),
audio or IMU windows with non-finite samples are zeroed and that modality is
masked for the tick, and the event is counted. LiDAR is different: inf/NaN are
normal "no return" beams, masked per beam inside the model. Live node, bag
replay and the demo all step through here.

The audio frame cache is exact, not an approximation: before a step it holds
the frames of the tick's window, moved along by the hops the window advanced
since the previous tick. Where that cannot be known (the caller passed no
window position, the window moved by more than ``stream_frames`` hops or by
part of a hop, samples older than the recomputed span were rewritten, audio
was missing on the previous tick, a reset), the whole window's frames are
computed here first (``LogMelFrames`` in torch; about a third of a millisecond)
and counted as ``audio_frame_resyncs``.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import numpy as np

import torch

from ..config import MODALITIES, AudioConfig, ModelConfig
from ..model.network import state_slots
from ..model.preprocess import LogMelFrames
from .base import Engine, InputError

_AUDIO = MODALITIES.index("audio")

# Modalities whose windows must be finite; a non-finite value masks the modality for the tick.
_MUST_BE_FINITE = {name: MODALITIES.index(name) for name in ("audio", "imu", "joint_state")}


@dataclass(frozen=True)
class StepResult:
    action: np.ndarray        # (dof,)
    fused_state: np.ndarray   # (fused_state_dim,)
    attention: np.ndarray     # (M, M)
    contribution: np.ndarray  # (M,)
    mask: np.ndarray          # (M,) the mask the model actually used


@functools.lru_cache(maxsize=8)
def _whole_window_frames(audio: AudioConfig) -> tuple[LogMelFrames, np.ndarray]:
    """The log-mel of a whole window, built and run once per audio config and process: the first call costs
    about 70 ms (filter bank, torch warm-up), which would otherwise land on the first control tick that hears
    audio, and eval builds a Runtime (so a stream) per episode. It has no state, so streams share it; with it, a
    silent window's frames, which a new stream starts from."""
    frames = LogMelFrames(audio).eval()
    with torch.inference_mode():
        silence = frames(torch.zeros(1, audio.window_samples)).numpy().astype(np.float32, copy=True)
    silence.flags.writeable = False
    return frames, silence


class FusionStream:
    def __init__(self, engine: Engine, cfg: ModelConfig):
        self.engine = engine
        self.cfg = cfg
        self.counters: Counter[str] = Counter()
        self.state = np.zeros((1, state_slots(cfg), cfg.encoder.hidden), dtype=np.float32)
        self._whole_window, silence = _whole_window_frames(cfg.audio)
        self.audio_frames = silence.copy()   # (1, n_mels, n_frames)
        self._audio_end: int | None = None  # sample index the cached frames' window ended at

    def reset(self) -> None:
        """Forget the recurrent state (a clock jump backwards, a restarted bag)."""
        self.state[:] = 0.0
        self._audio_end = None
        self.counters["state_resets"] += 1

    def _cached_frames_valid(self, audio_end: int | None, rewritten_from: int | None) -> bool:
        """Move the cache along to the window ending at ``audio_end``; False if it cannot be."""
        a = self.cfg.audio
        if audio_end is None or self._audio_end is None:
            return False
        shift, part = divmod(audio_end - self._audio_end, a.hop)
        new = min(a.stream_frames, a.n_frames)
        if part or not 0 <= shift <= new:
            return False
        # Cached frames keep positions < n_frames - new; they read samples up to audio_end - new * hop.
        if rewritten_from is not None and rewritten_from <= audio_end - new * a.hop:
            return False
        if shift:
            self.audio_frames[:, :, :-shift] = self.audio_frames[:, :, shift:].copy()
        return True

    def _recompute_frames(self, audio: np.ndarray) -> None:
        with torch.inference_mode():
            frames = self._whole_window(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)[None]))
        self.audio_frames = frames.numpy().astype(np.float32, copy=True)
        self.counters["audio_frame_resyncs"] += 1

    def step(self, camera: np.ndarray, audio: np.ndarray, imu: np.ndarray, lidar: np.ndarray,
             joint_state: np.ndarray, mask: np.ndarray, dt: float, audio_end: int | None = None,
             audio_rewritten_from: int | None = None) -> StepResult:
        """One tick. Arrays are unbatched: camera (H, W, 3) uint8, audio (N,), imu (T, 6), lidar (beams,),
        joint_state (2 * dof,).

        ``audio_end`` is the absolute index (at the model rate) of the audio window's last sample
        and ``audio_rewritten_from`` the lowest sample index written over since the previous tick
        (None: nothing); without ``audio_end`` every tick recomputes the whole window's frames.
        """
        prepared = self.prepare(camera, audio, imu, lidar, joint_state, mask, dt, audio_end, audio_rewritten_from)
        return self.finish(prepared, self.engine.step(prepared.inputs))

    def prepare(self, camera: np.ndarray, audio: np.ndarray, imu: np.ndarray, lidar: np.ndarray,
                joint_state: np.ndarray, mask: np.ndarray, dt: float, audio_end: int | None = None,
                audio_rewritten_from: int | None = None) -> "PreparedStep":
        """``step`` up to the engine: the engine's batch-1 inputs, with this stream's state. Whoever runs them
        (``step``, or one batched call for several streams: ``BatchedSteps``) hands the outputs to ``finish``."""
        if not np.isfinite(dt) or dt <= 0.0:
            raise InputError(f"dt must be a positive finite number of seconds, got {dt}")
        mask = np.asarray(mask, dtype=np.float32).reshape(1, len(MODALITIES)).copy()
        windows = {"audio": audio, "imu": imu, "joint_state": joint_state}
        for name, index in _MUST_BE_FINITE.items():
            window = windows[name]
            if window.dtype.kind == "f" and not np.isfinite(window).all():
                windows[name] = np.where(np.isfinite(window), window, 0.0).astype(window.dtype)
                mask[0, index] = 0.0
                self.counters[f"nonfinite_{name}"] += 1
        audio_used = bool(mask[0, _AUDIO] > 0.5)
        if audio_used and not self._cached_frames_valid(audio_end, audio_rewritten_from):
            self._recompute_frames(windows["audio"])
        inputs = {
            "camera": camera[None], "audio": windows["audio"][None], "imu": windows["imu"][None],
            "lidar": lidar[None], "joint_state": windows["joint_state"][None], "mask": mask, "dt": np.array([[dt]], dtype=np.float32), "state": self.state,
            "audio_frames": self.audio_frames,
        }
        # The cache was moved in place: until this step's frames are back (an engine may raise),
        # it matches no window.
        self._audio_end = None
        return PreparedStep(inputs, mask, audio_used, audio_end)

    def finish(self, prepared: "PreparedStep", out: dict[str, np.ndarray]) -> StepResult:
        """The engine's outputs for ``prepared`` (batch 1): keep the new state and frames, return the tick's."""
        # A masked tick's frames are of a zeroed or stale window: the next audio tick starts over.
        if prepared.audio_used and np.isfinite(out["new_audio_frames"]).all():
            self.audio_frames = np.ascontiguousarray(out["new_audio_frames"], dtype=np.float32)
            self._audio_end = prepared.audio_end
        if np.isfinite(out["new_state"]).all():
            self.state = np.ascontiguousarray(out["new_state"], dtype=np.float32)
        else:  # never feed a poisoned state back; start clean instead
            self.counters["nonfinite_state"] += 1
            self.reset()
        self.counters["ticks"] += 1
        return StepResult(out["action"][0], out["fused_state"][0], out["attention"][0],
                          out["contribution"][0], prepared.mask[0])


@dataclass(frozen=True)
class PreparedStep:
    """One stream's tick, ready for the engine (``FusionStream.prepare``)."""

    inputs: dict[str, np.ndarray]   # batch 1
    mask: np.ndarray                # (1, M) after the finiteness checks
    audio_used: bool
    audio_end: int | None


class BatchedSteps:
    """Several streams' ticks in one engine call: an engine exported for a batch of K (``create_engine(...,
    batch=K)``) steps up to K prepared ticks at once. Each row's outputs depend on that row's inputs alone
    (checked bit for bit in test_eval.py), so which row a stream takes changes nothing, and rows left over keep
    their last inputs, whose outputs nobody reads."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.batch = engine.input_specs[0].shape[0]
        self._inputs = {s.name: np.zeros(s.shape, s.dtype) for s in engine.input_specs}

    def run(self, prepared: list[PreparedStep]) -> list[dict[str, np.ndarray]]:
        if not 1 <= len(prepared) <= self.batch:
            raise InputError(f"a batch of {self.batch} steps takes 1 to {self.batch} streams, got {len(prepared)}")
        for name, batch in self._inputs.items():
            for row, p in enumerate(prepared):
                batch[row] = p.inputs[name][0]
        out = self.engine.step(self._inputs)
        return [{name: value[row:row + 1] for name, value in out.items()} for row in range(len(prepared))]
