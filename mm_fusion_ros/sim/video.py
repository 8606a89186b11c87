"""Episode videos: what a person watches to see how an episode went.

Each frame puts the "witness" camera (the whole cell, intruder included; not
a policy input) beside the overhead camera the policy sees, with the time, the
cued button, the expert's phase, whether the intruder is in the protective
field, the click, and at the end the outcome. MP4 (OpenCV's mp4v), written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .cell import Cell
from .scene import COLOUR_NAMES, WITNESS_SIZE

FPS = 30


class EpisodeVideo:
    def __init__(self, cell: Cell, path: str | Path, panel=None):
        import cv2
        import mujoco
        self.cv2, self.cell, self.path = cv2, cell, Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.stem}.partial-{os.getpid()}{self.path.suffix}")
        w, h = WITNESS_SIZE
        # Drawn to the right of the cameras (``viz.PolicyPanel``: what the policy commanded and attended to).
        self.panel = panel
        self._renderer = mujoco.Renderer(cell.model, h, w)
        self._overhead = mujoco.Renderer(cell.model, cell.cfg.camera.height, cell.cfg.camera.width)
        self._writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (w + h + (panel.width if panel else 0), h))
        if not self._writer.isOpened():  # pragma: no cover - opencv-python-headless ships mp4v
            raise RuntimeError(f"OpenCV cannot write {self._tmp} (mp4v)")
        self._next = 0.0
        self.frames = 0

    def maybe_frame(self, caption: str = "") -> None:
        """A frame if one is due (FPS on the sim clock)."""
        if self.cell.elapsed + 1e-9 < self._next:
            return
        self._next += 1.0 / FPS
        self._write(caption)

    def _write(self, caption: str, hold: int = 1) -> None:
        cv2, cell = self.cv2, self.cell
        self._renderer.update_scene(cell.data, camera="witness")
        witness = self._renderer.render()
        self._overhead.update_scene(cell.data, camera="overhead")
        h = witness.shape[0]
        overhead = cv2.resize(self._overhead.render(), (h, h), interpolation=cv2.INTER_NEAREST)
        frame = np.concatenate([witness, overhead], axis=1)[:, :, ::-1]
        if self.panel is not None:
            frame = np.concatenate([frame, self.panel.render(h)], axis=1)
        frame = np.ascontiguousarray(frame)
        spec = cell.spec
        lines = [f"seed {spec.seed}  t {cell.elapsed:5.2f} s  cue: {COLOUR_NAMES[spec.target]}",
                 ("INTRUDER IN PROTECTIVE FIELD" if cell.in_protective_field() else ""),
                 ("clicked" if cell.clicked(spec.target) else ""), caption]
        if cell.outcome.done:
            lines.append(f"{cell.outcome.status.upper()}: {cell.outcome.reason}")
        lines = [t for t in lines if t]
        cv2.rectangle(frame, (0, 0), (witness.shape[1], 10 + 22 * len(lines)), (30, 30, 30), -1)
        y = 22
        for text in lines:
            cv2.putText(frame, text, (10, y), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
            y += 22
        cv2.putText(frame, "policy's camera", (h + 10 + witness.shape[1] - h, h - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (255, 255, 255), 1, cv2.LINE_AA)
        for _ in range(hold):
            self._writer.write(frame)
            self.frames += 1

    def close(self, caption: str = "") -> Path:
        self._write(caption, hold=FPS)     # a second on the final state, outcome shown
        self._writer.release()
        self._renderer.close()
        self._overhead.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._writer.release()
        self._renderer.close()
        self._overhead.close()
        self._tmp.unlink(missing_ok=True)


def expert_video(config_path: str | Path, seed: int, path: str | Path, noise: float = 0.0,
                 control_rate_hz: float = 100.0, noise_tau_s: float = 0.0) -> dict:
    """Run the scripted expert on ``seed`` (the same episode ``record`` writes for it) into an MP4."""
    from .config import load_cell_config
    from .expert import DartNoise, Expert, expert_commands

    with Cell(load_cell_config(config_path), render=False) as cell:
        cell.reset(seed)
        expert = Expert(cell)
        dart = DartNoise(np.random.default_rng([seed, 7]), noise, noise_tau_s, 1.0 / control_rate_hz)
        video = EpisodeVideo(cell, path)
        try:
            t = cell.t
            while not cell.outcome.done:
                _, executed = expert_commands(expert, dart)
                cell.command(executed)
                t += 1.0 / control_rate_hz
                cell.advance(t)
                video.maybe_frame(f"expert: {expert.phase}")
            out = video.close(f"expert: {expert.phase}")
        except BaseException:
            video.abort()
            raise
        return {"video": str(out), "frames": video.frames, "outcome": cell.outcome.status,
                "reason": cell.outcome.reason}
