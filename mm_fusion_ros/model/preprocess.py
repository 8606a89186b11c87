"""Per-modality preprocessing, inside the network so that it is compiled with it.

Each module maps one raw sensor array to a feature vector of ``out_dim``:

- camera: uint8 HxWx3 -> normalised float -> small CNN ('simple') or residual CNN ('resnet')
- audio:  raw samples -> log-mel spectrogram (two-stage STFT: grouped conv1d + matmul) -> small 2D conv stack
- imu:    (T, 6) accel + gyro window -> 1D convs
- lidar:  (beams,) ranges -> (normalised range, validity) -> 1D convs; invalid returns masked
- joint_state: (2 * dof,) positions + velocities -> standardised -> MLP

Pooling keeps what the robot needs to know: where (the camera's spatial
softmax keypoints, the LiDAR's bearing), which pitch (audio pools over time,
not over mel bands: a tone and its neighbour differ only by where they sit on
the mel axis, which a mean over bands would erase), and whether a transient
happened (the IMU's max over time, beside its mean).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..config import AudioConfig, CameraConfig, ImuConfig, LidarConfig

AMIN = 1e-10  # power floor before log10, as librosa.power_to_db


# ---------------------------------------------------------------- camera

class _ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 2):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


PIXEL_FILTER_GAIN = 10.0   # see CameraEncoder.pixel_filter


class CameraEncoder(nn.Module):
    """uint8 (B, H, W, 3) RGB -> (B, out_dim). Normalisation happens here, not in the node."""

    def __init__(self, cfg: CameraConfig, out_dim: int):
        super().__init__()
        self.height, self.width = cfg.height, cfg.width
        first = cfg.channels[0]
        # A stride-4 stem keeps the per-tick cost low enough for a 100 Hz loop on a CPU.
        layers: list[nn.Module] = [nn.Conv2d(3, first, 5, stride=cfg.strides[0], padding=2), nn.ReLU()]
        cin = first
        for cout, stride in zip(cfg.channels[1:], cfg.strides[1:]):
            if cfg.backbone == "resnet":
                layers.append(_ResidualBlock(cin, cout, stride))
            else:
                layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU()]
            cin = cout
        # The keypoints' spatial softmax reads the last conv before its ReLU, sharpened by a learned inverse
        # temperature: after the ReLU, at initialisation, the map is at most ~0.2, its softmax nearly
        # uniform, and keypoints moved 2e-4 across frames (README "Where learning stands", item 13); a
        # head reading them alone learned to place 3 buttons to 2.9 cm in 500 steps this way, 5.1 cm
        # after the ReLU.
        self.last_relu = isinstance(layers[-1], nn.ReLU)
        self.features = nn.Sequential(*(layers[:-1] if self.last_relu else layers))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))
        # Mean activation plus each channel's expected image position under a spatial softmax
        # (Levine et al. 2016): a global mean alone says what is in view, not where.
        self.proj = nn.Linear(3 * cin, out_dim)
        # Why a second set at full resolution: the CNN's spatial softmax reads a map of 6x6 cells (11 cm of
        # the cell's table each) after a stride-4 stem, and placed the buttons to 2.3 cm on held-out scenes
        # (0.8 cm on training ones: it memorised scenes), where the centroid of a cap's colour places it to
        # 0.5 mm (README item 23). A 1x1 convolution is a per-pixel colour filter: it cannot memorise a
        # scene, and its soft-argmax over every pixel is sub-pixel.
        self.pixel_keypoints = cfg.pixel_keypoints
        if self.pixel_keypoints:
            # Learning-rate scale by reparametrisation: the filter acts as PIXEL_FILTER_GAIN x its weights
            # (initialised that much smaller, so the same function at the start), so Adam moves it that many
            # times faster than the CNN at one learning rate. Measured at 1e-3 without it: 3.0 cm after 3000
            # camera pretraining steps; alone at 1e-2, 1.0 cm after 1500 (README item 23).
            self.pixel_filter = nn.Conv2d(3, self.pixel_keypoints, 1)
            with torch.no_grad():
                self.pixel_filter.weight.div_(PIXEL_FILTER_GAIN)
                self.pixel_filter.bias.div_(PIXEL_FILTER_GAIN)
            # Starting broad (1): at 10, as the CNN's keypoints start, a random filter's softmax sits on a few
            # extreme pixels and its gradient vanishes elsewhere (measured, 1000 pretraining steps, visible
            # buttons: 2.4 cm median at 10, 1.7 at 1).
            self.pixel_log_temperature = nn.Parameter(torch.zeros(self.pixel_keypoints))
        self.keypoints = cin + self.pixel_keypoints
        # (x / 255 - mean) / std as one scale and one offset per channel.
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("offset", -mean / std, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encode(image)[0]

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token (B, out_dim), keypoints (B, channels, 2)): each channel's expected (x, y) in [-1, 1]."""
        token, keypoints, _ = self.encode_reads(image)
        return token, keypoints

    def encode_reads(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``encode`` and how strongly each pixel keypoint's colour filter matches anywhere in the image
        (B, pixel_keypoints), a soft maximum of its response: low where its colour is out of sight (None
        without pixel keypoints)."""
        x = image.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.offset
        pre = self.features(x)
        f = torch.relu(pre) if self.last_relu else pre
        b, c, h, w = f.shape
        logits = (pre * self.log_temperature.exp()).reshape(b, c, h * w)
        probs = torch.softmax(logits, dim=-1).reshape(b, c, h, w)
        ys = torch.linspace(-1.0, 1.0, h, device=f.device, dtype=f.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=f.device, dtype=f.dtype)
        key_y = (probs.sum(dim=3) * ys).sum(dim=2)
        key_x = (probs.sum(dim=2) * xs).sum(dim=2)
        token = self.proj(torch.cat([f.mean(dim=(2, 3)), key_x, key_y], dim=1))
        keypoints = torch.stack([key_x, key_y], dim=-1)
        if not self.pixel_keypoints:
            return token, keypoints, None
        pixel, visibility = self._pixel_keypoints(x)
        return token, torch.cat([keypoints, pixel], dim=1), visibility

    def _pixel_keypoints(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, 2): each colour filter's soft-argmax over the normalised image's pixels, in [-1, 1]; and
        (B, K) the filter's soft maximum response (logsumexp at its temperature, less the uniform share)."""
        temperature = self.pixel_log_temperature.exp()
        logits = self.pixel_filter(x) * (PIXEL_FILTER_GAIN * temperature).view(1, -1, 1, 1)
        b, k, h, w = logits.shape
        flat = logits.reshape(b, k, h * w)
        probs = torch.softmax(flat, dim=-1)
        # logsumexp as the largest logit less the log of its softmax share: the same value from the softmax
        # already computed. ONNX Runtime's ReduceLogSumExp over the 9216 pixels was a quarter of the exported
        # step (0.82 -> 0.59 ms p50, one thread); the share is at least 1/(h w), so the log is finite.
        log_sum_exp = flat.amax(dim=-1) - torch.log(probs.amax(dim=-1))
        probs = probs.reshape(b, k, h, w)
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
        keypoints = torch.stack([(probs.sum(dim=2) * xs).sum(dim=2), (probs.sum(dim=3) * ys).sum(dim=2)], dim=-1)
        visibility = (log_sum_exp - math.log(h * w)) / temperature.view(1, -1)
        return keypoints, visibility


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


def stft_radix(n_fft: int, hop: int) -> int:
    """The decimation factor R of the two-stage STFT: a divisor of n_fft and hop.

    Stage 1 costs about n_fft * (n_fft / R) multiply-adds per frame and stage 2
    about 2 * n_fft * R, so R near sqrt(n_fft / 2) is cheapest (16 for 512).
    """
    common = math.gcd(n_fft, hop)
    return min((r for r in range(1, common + 1) if common % r == 0), key=lambda r: n_fft // r + 2 * r)


def mel_groups(mel: np.ndarray, node_cost: int = 1500) -> list[tuple[int, int, int, int]]:
    """Split mel bands (rows of ``mel``, ascending frequency) into runs ``(first, end, lo, hi)``
    whose nonzero weights lie in columns lo:hi, minimising the multiply-adds per frame plus
    ``node_cost`` for every extra product (about what two more graph nodes cost)."""
    nonzero = mel != 0
    cols = np.arange(mel.shape[1])

    def span(a: int, b: int) -> tuple[int, int]:
        used = cols[nonzero[a:b].any(axis=0)]
        return (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)

    n = mel.shape[0]
    best = [0.0] + [math.inf] * n  # best[b]: cheapest split of bands 0:b
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end):
            lo, hi = span(start, end)
            cost = best[start] + (end - start) * (hi - lo) + node_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], n
    while end > 0:
        groups.append((cut[end], end, *span(cut[end], end)))
        end = cut[end]
    return groups[::-1]


class LogMelSpectrogram(nn.Module):
    """Raw samples (B, N) -> log-mel power in dB, time-major (B, frames, n_mels).

    No centre padding, and frames are anchored at the end of the window: the
    last frame ends at the newest sample, and the oldest ``(N - n_fft) % hop``
    samples are not used.

    The STFT is written by hand because TensorRT does not accept ONNX's DFT,
    and it is most of the network's arithmetic, so it is one decimation-in-time
    step of an FFT done as two dense products (only conv and matmul for the
    exporters). With R = ``stft_radix(n_fft, hop)`` and M = n_fft / R, split
    each frame by sample index n = R m + r:

        X[j + M q] = sum_r  e^(-2 pi i r q / R)  C_r[j]
        C_r[j]     = sum_m  w[R m + r] x[R m + r] e^(-2 pi i (R m + r) j / n_fft)

    Stage 1 is a grouped conv1d over the R polyphase components (window and
    twiddle factors baked into its basis) for j = 0 .. M/2 only; stage 2 is one
    R-point DFT across the components, one (2R x 2R) real matrix (real parts
    of the output, then imaginary) for every j and frame. Bins above M/2 within a block are the complex conjugates
    of bins that were computed (the input is real), so the powers of these
    R * (M/2 + 1) bins cover the half-spectrum; the mel matrix's columns follow
    that order and zero the few bins that occur twice. For n_fft = 512 this is
    3.4 M multiply-adds per 1 s window instead of 25 M for the plain basis. The
    mel product then runs per group of bands over the rows they touch
    (``mel_groups``): the filters are narrow, most of the dense matrix is zero.
    Same result as librosa (``test/test_logmel.py``).
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        n_fft = cfg.n_fft
        radix = stft_radix(n_fft, cfg.hop)
        taps = n_fft // radix
        n_bins = taps // 2 + 1  # j = 0 .. M/2 per polyphase component
        self.radix, self.n_bins, self.hop, self.n_fft = radix, n_bins, cfg.hop, n_fft

        window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann, as librosa
        n = radix * np.arange(taps)[None, :, None] + np.arange(radix)[:, None, None]  # (r, m, 1)
        phase = 2.0 * np.pi * n * np.arange(n_bins) / n_fft  # (r, m, j)
        basis = np.stack([np.cos(phase), -np.sin(phase)], axis=1) * window[n][:, None]  # (r, re/im, m, j)
        basis = basis.transpose(0, 1, 3, 2).reshape(radix * 2 * n_bins, 1, taps)  # conv channels (r, re/im, j)
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.float32), persistent=False)

        # Stage 2: C_r * e^(-i phi) for phi = 2 pi r q / R; columns follow the rows (r, re/im) of stage 1.
        # Output rows q are ordered by frequency (each q is a block of bins j + M q or its mirror), so
        # that every mel band reads a contiguous run of rows.
        k = np.arange(n_bins)[None, :] + taps * np.arange(radix)[:, None]  # (q, j)
        k = np.minimum(k, n_fft - k)
        order = np.argsort(k.mean(axis=1), kind="stable")
        phi = 2.0 * np.pi * np.outer(order, np.arange(radix)) / radix  # (q, r)
        dft_re = np.stack([np.cos(phi), np.sin(phi)], axis=-1).reshape(radix, 2 * radix)
        dft_im = np.stack([-np.sin(phi), np.cos(phi)], axis=-1).reshape(radix, 2 * radix)
        # Real parts in the first R rows, imaginary in the last R: one product instead of two
        # (one fewer graph node, and a (2R x 2R) product runs nearer peak than two (R x 2R) ones).
        dft = np.concatenate([dft_re, dft_im], axis=0)
        self.register_buffer("dft", torch.tensor(dft, dtype=torch.float32), persistent=False)

        # Mel weights for the bins in stage 2's order; a bin that occurs twice is counted once.
        fb = mel_filterbank(cfg.sample_rate, n_fft, cfg.n_mels, cfg.f_min, cfg.f_max)
        k = k[order].ravel()
        first = np.zeros(k.size, dtype=bool)
        first[np.unique(k, return_index=True)[1]] = True
        assert np.unique(k).size == n_fft // 2 + 1  # every bin of the half-spectrum is covered
        mel = fb[:, k] * first
        # Mel filters are narrow triangles, so the (n_mels x bins) product is mostly zeros: split
        # the bands into groups that each multiply only the rows they touch.
        self.mel_rows: list[tuple[int, int]] = []
        for i, (first_band, end_band, lo, hi) in enumerate(mel_groups(mel)):
            self.mel_rows.append((lo, hi))
            self.register_buffer(f"mel_{i}", torch.tensor(mel[first_band:end_band, lo:hi], dtype=torch.float32),
                                 persistent=False)

    def mel_power(self, samples: torch.Tensor) -> torch.Tensor:
        """Mel-band power, mel-major (B, n_mels, frames): the layout the matrix products leave."""
        x = samples[:, (samples.shape[1] - self.n_fft) % self.hop:]  # frames end at the newest sample
        b = x.shape[0]
        x = x.reshape(b, -1, self.radix).transpose(1, 2)  # (B, R, N/R): polyphase components
        spec = nn.functional.conv1d(x, self.basis, stride=self.hop // self.radix, groups=self.radix)
        frames = spec.shape[-1]
        c = spec.reshape(b, 2 * self.radix, self.n_bins * frames)  # rows (r, re/im), columns (j, frame)
        y = torch.matmul(self.dft, c)  # rows (re/im, q)
        re, im = y[:, :self.radix], y[:, self.radix:]
        power = (re * re + im * im).reshape(b, self.radix * self.n_bins, frames)
        if len(self.mel_rows) == 1 and self.mel_rows[0] == (0, power.shape[1]):
            return torch.matmul(self.mel_0, power)
        return torch.cat([torch.matmul(getattr(self, f"mel_{i}"), power[:, lo:hi])
                          for i, (lo, hi) in enumerate(self.mel_rows)], dim=1)

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        return (10.0 * torch.log10(torch.clamp(self.mel_power(samples), min=AMIN))).transpose(1, 2)


class LogMelFrames(nn.Module):
    """Raw samples (B, N) -> the audio encoder's input frames (B, n_mels, frames), mel-major.

    The log-mel scaled as (dB + 40) / 40, roughly [-1.5, 2] for microphone
    levels. No learned parameters: the runtime builds one from the config alone
    to recompute a whole window's frames when its cache cannot be shifted.
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.logmel = LogMelSpectrogram(cfg)

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        power = torch.clamp(self.logmel.mel_power(samples), min=AMIN)
        return torch.log(power) * (10.0 / (40.0 * math.log(10.0))) + 1.0  # natural log, one scale


class AudioEncoder(nn.Module):
    """Streaming: (samples (B, N), cached frames (B, n_mels, F)) -> (token, this window's frames).

    Consecutive control ticks see windows that overlap by all but a few hops,
    so recomputing all F frames every tick would redo the same arithmetic F - 1
    times out of F (the STFT is about half of the whole step's cost on a CPU).
    The step computes only the newest ``stream_frames`` frames from the end of
    the window and takes the older ones from ``cached``, which the runtime
    (``FusionStream``) keeps: the previous tick's frames moved by the number of
    hops the window advanced, or the whole window recomputed when it moved by
    more, jumped off the hop grid or had older samples rewritten. The result
    is the same as the log-mel of the whole window (``test/test_streaming_audio.py``).
    """

    def __init__(self, cfg: AudioConfig, out_dim: int):
        super().__init__()
        self.frames = LogMelFrames(cfg)
        self.n_frames = cfg.n_frames
        self.new_frames = min(cfg.stream_frames, cfg.n_frames)
        self.tail = (self.new_frames - 1) * cfg.hop + cfg.n_fft  # the samples the newest frames read
        layers: list[nn.Module] = []
        cin = 1
        # 3x3, stride 2; padded on the mel axis only. Unpadded in time, a window's features are a slice
        # of the features of the whole recording (``track_tokens``), which is what lets training compute
        # them once per chunk instead of once per tick (97 frames each, 96 of them shared with the
        # previous tick): 1.06 s -> ~0.05 s forward+backward for a chunk of 16 x 120 ticks.
        for cout in cfg.channels:
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=(1, 0)), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        bands, steps = cfg.n_mels, cfg.n_frames
        for _ in cfg.channels:
            bands = (bands - 1) // 2 + 1
            steps = (steps - 3) // 2 + 1
        if steps < 1:
            raise ValueError(f"audio window of {cfg.n_frames} frames is too short for {len(cfg.channels)} "
                             "stride-2 conv layers")
        self.steps = steps           # feature columns per window
        self.stride = 2 ** len(cfg.channels)
        self.proj = nn.Linear(cin * bands, out_dim)

    def forward(self, samples: torch.Tensor, cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        newest = self.frames(samples[:, samples.shape[1] - self.tail:])
        if self.new_frames < self.n_frames:
            frames = torch.cat([cached[:, :, :self.n_frames - self.new_frames], newest], dim=2)
        else:
            frames = newest
        return self.token(frames), frames

    def token(self, frames: torch.Tensor) -> torch.Tensor:
        """A window's frames (B, n_mels, F) -> its token; training calls this on precomputed frames."""
        # The conv stack sees the spectrogram mel-major (B, 1, n_mels, frames), as it comes; the mean
        # is over time only, so the bands stay apart.
        return self.proj(self.features(frames.unsqueeze(1)).mean(dim=3).flatten(1))

    def track_tokens(self, track: torch.Tensor, episode: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Tokens of many windows cut from a few recordings, each recording's features computed once.

        track (E, n_mels, L): log-mel frames; window ``n`` is ``track[episode[n], :, start[n]:start[n] +
        n_frames]``, or all zeros where ``start[n] < 0``. The same result as ``token`` of each window:
        the conv stack runs densely over the track (stride 1 in time, each layer dilated by the strides
        before it), and a window's columns are every ``stride``-th dense column from its start.
        """
        x = track.unsqueeze(1)
        dilation = 1
        for layer in self.features:
            if isinstance(layer, nn.Conv2d):
                # The layer's own mel-axis stride and padding; in time stride 1, dilated instead.
                x = nn.functional.conv2d(x, layer.weight, layer.bias, stride=(layer.stride[0], 1),
                                         padding=layer.padding, dilation=(1, dilation))
                dilation *= layer.stride[1]
            else:
                x = layer(x)
        dense = x.permute(0, 3, 1, 2).flatten(2)                        # (E, L', C * bands)
        have = start >= 0
        cols = start.clamp(min=0).unsqueeze(1) + self.stride * torch.arange(self.steps, device=start.device)
        pooled = dense[episode.unsqueeze(1), cols.clamp(max=dense.shape[1] - 1)].mean(dim=1)
        tokens = self.proj(pooled)
        if bool((~have).any()):
            zero = self.token(torch.zeros(1, track.shape[1], self.n_frames, dtype=track.dtype, device=track.device))
            tokens = torch.where(have.unsqueeze(1), tokens, zero)
        return tokens


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
        self.proj = nn.Linear(2 * width, out_dim)
        self.high_pass = cfg.high_pass
        # Standardisation per channel: the training set's statistics once trained (``set_normalization``);
        # until then gravity's ~9.81 brought to the gyro's magnitude. Persistent: saved in checkpoints
        # and baked into exported engines, never applied by a caller.
        self.register_buffer("mean", torch.zeros(1, 6, 1))
        self.register_buffer("inv_std", torch.tensor([1 / 9.81] * 3 + [1.0] * 3).view(1, 6, 1))

    def forward(self, imu: torch.Tensor) -> torch.Tensor:
        x = (imu.transpose(1, 2) - self.mean) * self.inv_std
        if self.high_pass:
            x = x - x.mean(dim=2, keepdim=True)
        f = self.features(x)
        return self.proj(torch.cat([f.mean(dim=2), f.amax(dim=2)], dim=1))


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
        beams = cfg.beams
        for _ in cfg.channels:
            beams = (beams - 1) // 2 + 1   # kernel 5, stride 2, padding 2
        # Flattened, not pooled: the bearing of a return is what says whether it is in the protective field.
        self.proj = nn.Linear(width * beams, out_dim)

    def forward(self, ranges: torch.Tensor) -> torch.Tensor:
        valid = torch.isfinite(ranges) & (ranges >= self.range_min) & (ranges <= self.range_max)
        r = torch.where(valid, ranges, torch.zeros_like(ranges)) * (1.0 / self.range_max)
        x = torch.stack([r, valid.to(ranges.dtype)], dim=1)
        return self.proj(self.features(x).flatten(1))


class JointStateEncoder(nn.Module):
    """(B, 2 * dof) joint positions then velocities -> (B, out_dim); ``velocity=False`` reads the positions only."""

    def __init__(self, dof: int, out_dim: int, velocity: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dof, out_dim), nn.Tanh(), nn.Linear(out_dim, out_dim))
        # The training set's statistics once trained (``set_normalization``); identity until then.
        self.register_buffer("mean", torch.zeros(1, 2 * dof))
        self.register_buffer("inv_std", torch.ones(1, 2 * dof))
        self.register_buffer("keep", torch.tensor([1.0] * dof + [1.0 if velocity else 0.0] * dof).view(1, -1),
                             persistent=False)

    def forward(self, joints: torch.Tensor) -> torch.Tensor:
        return self.mlp((joints - self.mean) * self.inv_std * self.keep)
