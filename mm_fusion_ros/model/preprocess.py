"""Per-modality preprocessing, inside the network so that it is compiled with it.

Each module maps one raw sensor array to a feature vector of ``out_dim``:

- camera: uint8 HxWx3 -> normalised float -> small CNN ('simple') or residual CNN ('resnet')
- audio:  raw samples -> log-mel spectrogram (conv1d STFT basis) -> small 2D conv stack
- imu:    (T, 6) accel + gyro window -> 1D convs
- lidar:  (beams,) ranges -> (normalised range, validity) -> 1D convs; invalid returns masked
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..config import AudioConfig, CameraConfig, ImuConfig, LidarConfig

AMIN = 1e-10  # power floor before log10, as librosa.power_to_db


# ---------------------------------------------------------------- camera

class _ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class CameraEncoder(nn.Module):
    """uint8 (B, H, W, 3) RGB -> (B, out_dim). Normalisation happens here, not in the node."""

    def __init__(self, cfg: CameraConfig, out_dim: int):
        super().__init__()
        self.height, self.width = cfg.height, cfg.width
        first = cfg.channels[0]
        # A stride-4 stem keeps the per-tick cost low enough for a 100 Hz loop on a CPU.
        layers: list[nn.Module] = [nn.Conv2d(3, first, 5, stride=4, padding=2), nn.ReLU()]
        cin = first
        for cout in cfg.channels[1:]:
            if cfg.backbone == "resnet":
                layers.append(_ResidualBlock(cin, cout))
            else:
                layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(cin, out_dim)
        # (x / 255 - mean) / std as one scale and one offset per channel.
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("offset", -mean / std, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.offset
        return self.proj(self.features(x).mean(dim=(2, 3)))


# ---------------------------------------------------------------- audio

def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney's scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above.
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-12) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Triangular Slaney-normalised mel filters, (n_mels, n_fft // 2 + 1), float64."""
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    widths = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return weights * (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]  # equal area per filter


class LogMelSpectrogram(nn.Module):
    """Raw samples (B, N) -> log-mel power in dB, time-major (B, frames, n_mels).

    The STFT is a strided conv1d against a fixed Hann-windowed cos/sin basis
    rather than torch.stft, because TensorRT does not accept ONNX's DFT. No
    centre padding, and frames are anchored at the end of the window: the last
    frame ends at the newest sample, and the oldest ``(N - n_fft) % hop``
    samples are not used.

    That conv is most of the network's arithmetic, so it is split four ways by
    sample index n = 4m + r (one radix-4 decimation step): a grouped conv
    computes C_r[j], the windowed DFT sum over samples with n = r (mod 4), for
    j = 0..n_fft/8 only, and four butterflies give every bin of the
    half-spectrum (K = n_fft/4)::

        bin j      : C0 + C2 + (C1 + C3)          bin 2K - j: conj(C0 + C2 - (C1 + C3))
        bin K + j  : (C0 - C2) - i (C1 - C3)      bin K - j : conj((C0 - C2) + i (C1 - C3))

    A quarter of the multiply-adds of the plain basis, same result (the tests
    compare with librosa), and still only conv, add and matmul for the exporters.
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        n_fft = cfg.n_fft
        n = np.arange(n_fft)
        j = np.arange(n_fft // 8 + 1)
        window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)  # periodic Hann, as librosa
        phase = 2.0 * np.pi * np.outer(j, n) / n_fft
        basis = np.concatenate([np.cos(phase) * window, -np.sin(phase) * window])  # (2J, n_fft): re, im
        polyphase = np.concatenate([basis[:, r::4] for r in range(4)])[:, None, :]  # (4 * 2J, 1, n_fft/4)
        self.hop, self.n_bins = cfg.hop, len(j)
        self.skip = (cfg.window_samples - n_fft) % cfg.hop
        self.register_buffer("basis", torch.tensor(polyphase, dtype=torch.float32), persistent=False)
        # Multiplying by i swaps re and im and negates the new re.
        self.register_buffer("i_sign", torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1), persistent=False)
        # Mel columns in the order the butterflies yield bins; the three bins two butterflies
        # share (K/2, K and 3K/2) are kept once.
        fb = mel_filterbank(cfg.sample_rate, n_fft, cfg.n_mels, cfg.f_min, cfg.f_max)
        k = n_fft // 4
        columns = [fb[:, j], fb[:, 2 * k - j], fb[:, k + j], fb[:, k - j]]
        columns[2][:, -1] = 0.0  # bin 3K/2, also group 1's last
        columns[3][:, [0, -1]] = 0.0  # bins K (group 2's first) and K/2 (group 0's last)
        # Stored transposed: the constant operand on the right lets the runtime prepack it.
        self.register_buffer("mel_t", torch.tensor(np.concatenate(columns, axis=1).T, dtype=torch.float32),
                             persistent=False)

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        x = samples[:, self.skip:]
        x = x.reshape(x.shape[0], -1, 4).transpose(1, 2)  # (B, 4, N/4): polyphase components
        spec = nn.functional.conv1d(x, self.basis, stride=self.hop // 4, groups=4)
        b, _, frames = spec.shape
        c = spec.view(b, 4, 2, self.n_bins, frames)
        even_sum, odd_sum = c[:, 0] + c[:, 2], c[:, 1] + c[:, 3]
        even_diff, odd_diff = c[:, 0] - c[:, 2], c[:, 1] - c[:, 3]
        i_odd_diff = odd_diff.flip(1) * self.i_sign
        bins = torch.stack([even_sum + odd_sum, even_sum - odd_sum,
                            even_diff - i_odd_diff, even_diff + i_odd_diff], dim=1)  # (B, 4, 2, J, F)
        power = (bins * bins).sum(dim=2).view(b, 4 * self.n_bins, frames)
        mel = torch.matmul(power.transpose(1, 2), self.mel_t)
        return 10.0 * torch.log10(torch.clamp(mel, min=AMIN))


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig, out_dim: int):
        super().__init__()
        self.logmel = LogMelSpectrogram(cfg)
        layers: list[nn.Module] = []
        cin = 1
        for cout in cfg.channels:
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(cin, out_dim)

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        db = self.logmel(samples)
        x = ((db + 40.0) * (1.0 / 40.0)).unsqueeze(1)  # roughly [-1.5, 2] for microphone levels
        return self.proj(self.features(x).mean(dim=(2, 3)))


# ---------------------------------------------------------------- IMU and LiDAR

def _conv1d_stack(cin: int, channels: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for cout in channels:
        layers += [nn.Conv1d(cin, cout, 5, stride=2, padding=2), nn.ReLU()]
        cin = cout
    return nn.Sequential(*layers), cin


class ImuEncoder(nn.Module):
    """(B, T, 6) = accel xyz (m/s^2) + gyro xyz (rad/s) on a fixed grid -> (B, out_dim)."""

    def __init__(self, cfg: ImuConfig, out_dim: int):
        super().__init__()
        self.features, width = _conv1d_stack(6, cfg.channels)
        self.proj = nn.Linear(width, out_dim)
        # Bring accel (gravity ~9.81) and gyro to comparable magnitudes.
        scale = torch.tensor([1 / 9.81] * 3 + [1.0] * 3).view(1, 6, 1)
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, imu: torch.Tensor) -> torch.Tensor:
        x = imu.transpose(1, 2) * self.scale
        return self.proj(self.features(x).mean(dim=2))


class LidarEncoder(nn.Module):
    """(B, beams) ranges in metres -> (B, out_dim).

    Returns that are inf, NaN or outside [range_min, range_max] are normal in a
    scan (no echo, too close); they become a validity channel and a zero range,
    so they never propagate as numbers.
    """

    def __init__(self, cfg: LidarConfig, out_dim: int):
        super().__init__()
        self.range_min, self.range_max = cfg.range_min, cfg.range_max
        self.features, width = _conv1d_stack(2, cfg.channels)
        self.proj = nn.Linear(width, out_dim)

    def forward(self, ranges: torch.Tensor) -> torch.Tensor:
        valid = torch.isfinite(ranges) & (ranges >= self.range_min) & (ranges <= self.range_max)
        r = torch.where(valid, ranges, torch.zeros_like(ranges)) * (1.0 / self.range_max)
        x = torch.stack([r, valid.to(ranges.dtype)], dim=1)
        return self.proj(self.features(x).mean(dim=2))
