"""What the policy did and why, drawn beside an episode video: the commanded joint velocities,
each modality's contribution to the fused state, and the attention between modalities, over time.

OpenCV drawing (the video is written with OpenCV anyway); a panel is a BGR image the height of the
video, rendered once per video frame from the ticks seen so far.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np

WIDTH = 360
HISTORY_S = 3.0
# BGR, one per modality / joint; distinguishable on a dark background.
MODALITY_COLOURS = ((80, 175, 255), (90, 220, 120), (255, 160, 80), (220, 110, 230), (120, 220, 230))
JOINT_COLOURS = ((255, 255, 255), (80, 175, 255), (90, 220, 120), (255, 160, 80), (220, 110, 230), (120, 220, 230),
                 (150, 150, 255))


class PolicyPanel:
    def __init__(self, modalities: Sequence[str], control_rate_hz: float = 100.0):
        self.modalities = tuple(modalities)
        self.n = int(HISTORY_S * control_rate_hz)
        self.command: deque = deque(maxlen=self.n)
        self.contribution: deque = deque(maxlen=self.n)
        self.attention = np.zeros((len(modalities), len(modalities)))
        self.mask = np.ones(len(modalities))
        self.held = False
        self.width = WIDTH

    def add(self, result) -> None:
        """One tick's ``runtime.TickResult``."""
        self.command.append(np.asarray(result.safety.command, float))
        self.contribution.append(np.asarray(result.contribution, float))
        self.attention = np.asarray(result.attention, float)
        self.mask = np.asarray(result.mask, float)
        self.held = bool(result.safety.held)

    def render(self, height: int) -> np.ndarray:
        import cv2
        img = np.full((height, self.width, 3), 24, np.uint8)
        font = cv2.FONT_HERSHEY_SIMPLEX
        third = height // 3
        # 1. commanded joint velocities
        x0, x1, y0, y1 = 34, self.width - 8, 22, third - 6
        cv2.putText(img, "command (rad/s)" + ("  HELD" if self.held else ""), (8, 15), font, 0.42,
                    (0, 0, 255) if self.held else (220, 220, 220), 1, cv2.LINE_AA)
        cv2.line(img, (x0, (y0 + y1) // 2), (x1, (y0 + y1) // 2), (70, 70, 70), 1)
        for v, label in ((1.0, "+1"), (-1.0, "-1")):
            cv2.putText(img, label, (4, int((y0 + y1) / 2 - v * (y1 - y0) / 2) + 4), font, 0.35, (150, 150, 150), 1)
        if len(self.command) > 1:
            c = np.clip(np.asarray(self.command), -1, 1)
            xs = x0 + (x1 - x0) * np.arange(len(c)) / (self.n - 1)
            for j in range(c.shape[1]):
                pts = np.stack([xs, (y0 + y1) / 2 - c[:, j] * (y1 - y0) / 2], 1).astype(np.int32)
                cv2.polylines(img, [pts], False, JOINT_COLOURS[j % len(JOINT_COLOURS)], 1, cv2.LINE_AA)
        # 2. contribution over time (stacked) and now (bars)
        y0, y1 = third + 20, 2 * third - 6
        cv2.putText(img, "contribution to the fused state", (8, third + 12), font, 0.42, (220, 220, 220), 1,
                    cv2.LINE_AA)
        if self.contribution:
            hist = np.asarray(self.contribution)
            col_w = (x1 - x0) / self.n
            for i, share in enumerate(hist):
                bottom = y1
                for m, v in enumerate(share):
                    top = bottom - v * (y1 - y0)
                    cv2.rectangle(img, (int(x0 + i * col_w), int(top)), (int(x0 + (i + 1) * col_w), int(bottom)),
                                  MODALITY_COLOURS[m % 5], -1)
                    bottom = top
        # 3. attention between modalities now, and the legend
        y0 = 2 * third + 16
        cv2.putText(img, "attention (row attends to column)", (8, 2 * third + 10), font, 0.42, (220, 220, 220), 1,
                    cv2.LINE_AA)
        m = len(self.modalities)
        cell = max(8, min((height - y0 - 8) // m, 26))
        for i in range(m):
            for j in range(m):
                v = float(np.clip(self.attention[i, j], 0, 1))
                cv2.rectangle(img, (x0 + j * cell, y0 + i * cell), (x0 + (j + 1) * cell - 1, y0 + (i + 1) * cell - 1),
                              (int(40 + 215 * v),) * 3, -1)
        lx = x0 + m * cell + 12
        for i, name in enumerate(self.modalities):
            y = y0 + i * cell + cell // 2 + 4
            colour = MODALITY_COLOURS[i % 5] if self.mask[i] > 0.5 else (90, 90, 90)
            cv2.rectangle(img, (lx, y - 7), (lx + 10, y + 3), colour, -1)
            label = name + ("" if self.mask[i] > 0.5 else " (masked)")
            cv2.putText(img, label, (lx + 16, y + 2), font, 0.4, colour, 1, cv2.LINE_AA)
        return img
