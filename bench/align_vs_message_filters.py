"""What reaches the model: the Aligner against message_filters' approximate-time policy.

A typical ROS user fuses camera, microphone, LiDAR and IMU with
``message_filters.ApproximateTimeSynchronizer([...], queue_size, slop)``. Its
documented behaviour: one queue per topic; a set holding exactly one message
per topic, with stamps within ``slop`` of each other, is handed to the callback
once such a set can be formed; the messages used, and older ones, leave the
queues. So the output rate is at most the slowest topic's rate and each output
carries one IMU message and one audio chunk. message_filters has no wheel
here, so ``ApproximateTimePolicy`` below models that documented behaviour (it
is not its code).

Both are fed the same synthetic stream (camera 30 Hz, audio 16 kHz in 20 ms
chunks, LiDAR 10 Hz, IMU 200 Hz, with stamp jitter and transport latency) for
60 s of simulated time. The Aligner is ticked at 100 Hz on the receiver's
clock, as the fusion node does. Reported per method: outputs per second, the
fraction of IMU and audio samples (and of camera frames and scans) that reach
the model, and the age of the inputs in each output.

    .venv/bin/python bench/align_vs_message_filters.py [--duration 60] [--json artifacts/align_vs_message_filters.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm_fusion_ros.align import Aligner  # noqa: E402
from mm_fusion_ros.config import MODALITIES, load_config  # noqa: E402
from mm_fusion_ros.samples import AudioSample, CameraSample, ImuSample, LidarSample, Sample  # noqa: E402

T0 = 1000.0   # stamps start here, as a robot's clock would not start at 0
AUDIO_RATE, AUDIO_CHUNK = 16000, 320


@dataclass(frozen=True)
class Arrival:
    arrival: float   # receiver clock
    topic: str
    index: int       # per-topic sequence number
    sample: Sample


def synthetic_stream(duration: float, seed: int, camera_size: tuple[int, int]) -> list[Arrival]:
    """All four sensors at their usual rates, stamped at capture with jitter, delivered with latency."""
    rng = np.random.default_rng(seed)
    h, w = camera_size
    pixels = rng.integers(0, 256, h * w * 3, dtype=np.uint8)   # one buffer shared by all frames: content is irrelevant
    events: list[Arrival] = []

    def stream(topic, period, jitter_s, latency, make):
        for k in range(int(duration / period)):
            stamp = T0 + k * period + (rng.normal(0.0, jitter_s) if jitter_s else 0.0)
            events.append(Arrival(stamp + latency(), topic, k, make(stamp, k)))

    stream("camera", 1 / 30, 0.001, lambda: rng.uniform(0.015, 0.040),
           lambda s, k: CameraSample(s, "rgb8", w, h, 3 * w, pixels))
    # Audio stamps come from the sample clock (no jitter); a chunk is sent once it is complete.
    stream("audio", AUDIO_CHUNK / AUDIO_RATE, 0.0, lambda: AUDIO_CHUNK / AUDIO_RATE + rng.uniform(0.002, 0.008),
           lambda s, k: AudioSample(s, AUDIO_RATE, (0.1 * rng.standard_normal(AUDIO_CHUNK)).astype(np.float32)))
    # A scan is stamped at the start of its sweep and published after the 100 ms sweep.
    stream("lidar", 0.1, 0.0005, lambda: 0.1 + rng.uniform(0.005, 0.015),
           lambda s, k: LidarSample(s, rng.uniform(0.5, 8.0, 360).astype(np.float32)))
    stream("imu", 1 / 200, 0.0002, lambda: rng.uniform(0.001, 0.003),
           lambda s, k: ImuSample(s, rng.normal(size=3), rng.normal(size=3)))
    events.sort(key=lambda e: e.arrival)
    return events


class ApproximateTimePolicy:
    """A model of message_filters' approximate-time synchronizer, from its documented behaviour.

    Each arrival joins its topic's queue (the newest ``queue_size`` kept). Then,
    for the arriving message, the nearest-stamped message of every other topic
    is looked up; if each lies within ``slop`` of it, the set is emitted and
    those messages and everything older leave their queues.
    """

    def __init__(self, topics: tuple[str, ...], queue_size: int, slop: float):
        self.topics, self.queue_size, self.slop = topics, queue_size, slop
        self.queues: dict[str, list[Arrival]] = {t: [] for t in topics}

    def add(self, event: Arrival) -> dict[str, Arrival] | None:
        queue = self.queues[event.topic]
        queue.append(event)
        del queue[:-self.queue_size]
        chosen = {event.topic: event}
        for topic in self.topics:
            if topic == event.topic:
                continue
            candidates = self.queues[topic]
            if not candidates:
                return None
            best = min(candidates, key=lambda e: abs(e.sample.stamp - event.sample.stamp))
            if abs(best.sample.stamp - event.sample.stamp) > self.slop:
                return None
            chosen[topic] = best
        for topic, used in chosen.items():
            self.queues[topic] = [e for e in self.queues[topic] if e.sample.stamp > used.sample.stamp]
        return chosen


@dataclass
class Reach:
    """What reached the model over a run."""

    outputs: int = 0
    complete_outputs: int = 0                       # outputs with all four modalities present
    imu_used: set = field(default_factory=set)       # IMU message indices
    audio_used: np.ndarray | None = None             # per audio sample: reached the model
    camera_used: set = field(default_factory=set)
    lidar_used: set = field(default_factory=set)
    max_age: list = field(default_factory=list)      # per output: age of its oldest input
    ages: dict = field(default_factory=lambda: {m: [] for m in MODALITIES})

    def summary(self, duration: float, totals: dict[str, int]) -> dict:
        ages = np.asarray(self.max_age) if self.max_age else np.asarray([math.nan])
        return {
            "outputs_per_s": self.outputs / duration,
            "complete_outputs_per_s": self.complete_outputs / duration,
            "imu_fraction": len(self.imu_used) / totals["imu"],
            "audio_fraction": float(self.audio_used.mean()),
            "camera_fraction": len(self.camera_used) / totals["camera"],
            "lidar_fraction": len(self.lidar_used) / totals["lidar"],
            "max_input_age_s": {"max": float(np.max(ages)), "p50": float(np.median(ages)),
                                "p99": float(np.percentile(ages, 99))},
            "mean_age_s": {m: (float(np.mean(v)) if v else None) for m, v in self.ages.items()},
        }


def run_aligner(events: list[Arrival], duration: float, cfg, totals) -> tuple[dict, dict]:
    aligner = Aligner(cfg)
    reach = Reach(audio_used=np.zeros(totals["audio"] * AUDIO_CHUNK, bool))
    imu_stamps = np.array(sorted(e.sample.stamp for e in events if e.topic == "imu"))
    imu_index = {e.sample.stamp: e.index for e in events if e.topic == "imu"}
    camera_index = {e.sample.stamp: e.index for e in events if e.topic == "camera"}
    lidar_index = {e.sample.stamp: e.index for e in events if e.topic == "lidar"}
    grid = -np.arange(cfg.model.imu.window_samples - 1, -1, -1) / cfg.model.imu.rate_hz
    window = cfg.model.audio.window_samples
    first_audio = round(T0 * AUDIO_RATE)
    period = 1.0 / cfg.control_rate_hz
    tick_s, add_s, decoded = [], [], []
    arrived_imu = 0
    i = 0
    for k in range(int(duration / period)):
        t = T0 + k * period
        while i < len(events) and events[i].arrival <= t:
            a0 = time.perf_counter()
            aligner.add(events[i].sample, events[i].arrival)
            add_s.append(time.perf_counter() - a0)
            arrived_imu += events[i].topic == "imu"
            i += 1
        t0 = time.perf_counter()
        obs = aligner.tick(t, period)
        tick_s.append(time.perf_counter() - t0)
        decoded.append("camera_decoded" in obs.notes)
        reach.outputs += 1
        reach.complete_outputs += bool(obs.mask.all())
        present = [m for m in MODALITIES if obs.mask[MODALITIES.index(m)]]
        if present:
            reach.max_age.append(max(obs.ages[m] for m in present))
        for m in present:
            reach.ages[m].append(obs.ages[m])
        if "camera" in present:
            reach.camera_used.add(camera_index[obs.stamps["camera"]])
        if "lidar" in present:
            reach.lidar_used.add(lidar_index[obs.stamps["lidar"]])
        if "imu" in present:
            # The samples np.interp brackets each grid point with (the ones that shape the window).
            stamps = imu_stamps[:arrived_imu]
            stamps = stamps[stamps <= t]
            right = np.searchsorted(stamps, t + grid, side="right")
            for j in np.unique(np.concatenate([right - 1, right[right < stamps.size]])):
                if j >= 0:
                    reach.imu_used.add(imu_index[stamps[j]])
        if "audio" in present:
            newest = round(obs.stamps["audio"] * AUDIO_RATE) - first_audio
            reach.audio_used[max(newest - window + 1, 0):newest + 1] = True
    tick_s, decoded = np.asarray(tick_s), np.asarray(decoded)
    timing = {"tick_p50_ms": 1e3 * float(np.median(tick_s)), "tick_p99_ms": 1e3 * float(np.percentile(tick_s, 99)),
              "tick_without_decode_p50_ms": 1e3 * float(np.median(tick_s[~decoded])),
              "tick_with_decode_p50_ms": 1e3 * float(np.median(tick_s[decoded])),
              "ticks_that_decode": float(decoded.mean()),
              "add_p50_us": 1e6 * float(np.median(add_s)), "add_p99_us": 1e6 * float(np.percentile(add_s, 99)),
              "drops": {k: v for k, v in aligner.counters.items() if not k.endswith(".accepted")}}
    return reach.summary(duration, totals), timing


def run_approximate_time(events: list[Arrival], duration: float, cfg, totals, queue_size: int,
                         slop: float) -> tuple[dict, dict]:
    policy = ApproximateTimePolicy(MODALITIES, queue_size, slop)
    at_emit = Reach(audio_used=np.zeros(totals["audio"] * AUDIO_CHUNK, bool))
    latest: dict[str, Arrival] | None = None
    at_ticks: list[float] = []        # a 100 Hz control loop that reuses the latest set
    period = 1.0 / cfg.control_rate_hz
    next_tick = T0
    for event in events:
        while next_tick < event.arrival:
            if latest is not None:
                at_ticks.append(next_tick - min(e.sample.stamp for e in latest.values()))
            next_tick += period
        chosen = policy.add(event)
        if chosen is None:
            continue
        latest = chosen
        at_emit.outputs += 1
        at_emit.complete_outputs += 1
        at_emit.max_age.append(event.arrival - min(e.sample.stamp for e in chosen.values()))
        for m, e in chosen.items():
            at_emit.ages[m].append(event.arrival - e.sample.stamp)
        at_emit.imu_used.add(chosen["imu"].index)
        at_emit.camera_used.add(chosen["camera"].index)
        at_emit.lidar_used.add(chosen["lidar"].index)
        a = chosen["audio"].index * AUDIO_CHUNK
        at_emit.audio_used[a:a + AUDIO_CHUNK] = True
    extra = {"queue_size": queue_size, "slop_s": slop,
             "max_input_age_at_100hz_ticks_s": (float(np.max(at_ticks)) if at_ticks else None)}
    return at_emit.summary(duration, totals), extra


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1e3 * seconds:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "config" / "robot.yaml"))
    parser.add_argument("--duration", type=float, default=60.0, help="simulated seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--camera", default="480x640", help="raw rgb8 frame size HxW (decoded by the aligner)")
    parser.add_argument("--slop", type=float, default=0.05, help="ApproximateTimeSynchronizer slop (s)")
    parser.add_argument("--queues", default="10,100", help="ApproximateTimeSynchronizer queue sizes to try")
    parser.add_argument("--json", default="artifacts/align_vs_message_filters.json")
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    h, w = (int(v) for v in args.camera.lower().split("x"))
    events = synthetic_stream(args.duration, args.seed, (h, w))
    totals = {m: sum(e.topic == m for e in events) for m in MODALITIES}
    results = {"duration_s": args.duration, "control_rate_hz": cfg.control_rate_hz, "messages": totals}
    aligner, timing = run_aligner(events, args.duration, cfg, totals)
    results["aligner"] = {**aligner, "timing": timing}
    for q in (int(v) for v in args.queues.split(",")):
        summary, extra = run_approximate_time(events, args.duration, cfg, totals, q, args.slop)
        results[f"approximate_time_q{q}"] = {**summary, **extra}

    rows = [("method", "out/s", "all4/s", "IMU", "audio", "camera", "LiDAR", "max age", "p50 age", "IMU age",
             "audio age")]
    for name, r in results.items():
        if not isinstance(r, dict) or "outputs_per_s" not in r:
            continue
        age = r["max_input_age_s"]
        rows.append((name, f"{r['outputs_per_s']:.1f}", f"{r['complete_outputs_per_s']:.1f}",
                     f"{r['imu_fraction']:.1%}", f"{r['audio_fraction']:.1%}", f"{r['camera_fraction']:.1%}",
                     f"{r['lidar_fraction']:.1%}", f"{1e3 * age['max']:.0f} ms", f"{1e3 * age['p50']:.0f} ms",
                     _ms(r["mean_age_s"]["imu"]), _ms(r["mean_age_s"]["audio"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"{args.duration:.0f} s simulated; fraction of samples that reach the model; age = oldest input per "
          f"output; IMU/audio age = mean age of the newest IMU sample / audio sample in an output")
    for row in rows:
        print("  ".join(cell.ljust(wd) for cell, wd in zip(row, widths)))
    print(f"aligner tick p50 {timing['tick_p50_ms']:.3f} ms, p99 {timing['tick_p99_ms']:.3f} ms; "
          f"p50 {timing['tick_without_decode_p50_ms']:.3f} ms without and {timing['tick_with_decode_p50_ms']:.3f} ms "
          f"with a camera decode ({h}x{w} rgb8 -> model size, {timing['ticks_that_decode']:.0%} of ticks); "
          f"add p50 {timing['add_p50_us']:.0f} us, p99 {timing['add_p99_us']:.0f} us")
    for q in args.queues.split(","):
        r = results[f"approximate_time_q{q}"]
        tick_age = r["max_input_age_at_100hz_ticks_s"]
        print(f"approximate_time_q{q}: a 100 Hz loop reusing the latest set sees inputs up to "
              f"{'n/a' if tick_age is None else f'{1e3 * tick_age:.0f} ms'} old")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
