#!/usr/bin/env python3
"""Drive the simulated cell through ``PolicyClient``: a robot loop without ROS.

The cell's sensor readings become the same samples fusion_node's converters make, go into the
client as they "arrive" (each reading's receive time), and the client's safe command goes to the
cell's joint velocity controller, at 100 Hz of sim time::

    # in-process engine
    .venv/bin/python examples/sim_policy_client.py --seconds 5
    # or with the step on a policy server
    .venv/bin/mm-fusion serve --config config/sim.yaml &
    .venv/bin/python examples/sim_policy_client.py --endpoint tcp://127.0.0.1:5555 --seconds 5

The weights are random until a checkpoint is trained (#11), so the arm wanders; what this shows is
the loop: masks, rests, the engine's round-trip times.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from mm_fusion_ros import samples as S
from mm_fusion_ros.client import PolicyClient
from mm_fusion_ros.config import load_config
from mm_fusion_ros.safety import NONFINITE_REASON
from mm_fusion_ros.sensors import lidar_beams
from mm_fusion_ros.sim.cell import Cell
from mm_fusion_ros.sim.config import load_cell_config
from mm_fusion_ros.sim.readings import ArrivalQueue


def to_sample(reading, cfg):
    """A cell reading as the sample its ROS driver + converter would give; None for a sensor the model lacks."""
    kind = reading.sensor
    if kind == "camera":
        h, w, _ = reading.pixels.shape
        return S.CameraSample(reading.stamp, "rgb8", w, h, 3 * w, np.ascontiguousarray(reading.pixels).reshape(-1))
    if kind == "audio":
        return S.AudioSample(reading.stamp, reading.sample_rate, reading.pcm.astype(np.float32) / 32768.0)
    if kind == "imu":
        return S.ImuSample(reading.stamp, np.asarray(reading.accel, np.float64), np.asarray(reading.gyro, np.float64))
    if kind == "lidar":
        lidar = cfg.model.lidar
        angles = reading.angle_min + reading.angle_increment * np.arange(len(reading.ranges))
        lo, hi = max(reading.range_min, lidar.range_min), min(reading.range_max, lidar.range_max)
        return S.LidarSample(reading.stamp, lidar_beams(angles, reading.ranges, lidar.beams, lo, hi))
    joint_sample = getattr(S, "JointStateSample", None)   # the arm's own joints, where the model takes them
    if kind == "joint_states" and joint_sample is not None:
        return joint_sample(reading.stamp, np.asarray(reading.position), np.asarray(reading.velocity))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config/sim.yaml", help="fusion_node and sim_node blocks")
    parser.add_argument("--endpoint", help="policy server (mm-fusion serve); default: the config's engine")
    parser.add_argument("--backend", help="in-process backend instead (torch, onnxruntime, ...)")
    parser.add_argument("--server-key", help="CURVE: the server's public key file")
    parser.add_argument("--client-key", help="CURVE: this client's key pair")
    parser.add_argument("--timeout-ms", type=float, help="a remote step's deadline (default: the config's)")
    parser.add_argument("--seconds", type=float, default=5.0, help="sim time per episode")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    client = PolicyClient(cfg, endpoint=args.endpoint, backend=args.backend, server_key=args.server_key,
                          client_key=args.client_key, timeout_ms=args.timeout_ms, log=lambda m: print(m, file=sys.stderr))
    period = 1.0 / cfg.control_rate_hz
    with client, Cell(load_cell_config(args.config)) as cell:
        cell.reset(args.seed)
        client.enable()
        arrivals = ArrivalQueue()
        t, ticks, commanded, rested, dropped = cell.t, 0, 0, 0, 0
        wall = time.perf_counter()
        while not cell.outcome.done and cell.t - cell.cfg.episode.start_time_s < args.seconds:
            t += period
            arrivals.push(cell.advance(t))
            for reading in arrivals.pop_due(t):
                sample = to_sample(reading, cfg)
                if sample is not None and not client.add(sample, now=reading.receive):
                    dropped += 1
            command = client.step(t)
            ticks += 1
            if command.commanded:
                cell.command(command.values)
                commanded += 1
            rested += command.failed or NONFINITE_REASON in command.reasons
        wall = time.perf_counter() - wall
        summary = client.summary()
        masked = {k: round(v, 3) for k, v in summary["mask_rate"].items()}
        print(f"{ticks} ticks in {wall:.1f} s wall ({ticks * period / wall:.2f}x real time): {commanded} commanded, "
              f"{rested} at rest after a failed step, {dropped} samples dropped; mask rate {masked}; "
              f"episode {cell.outcome.status} {cell.outcome.reason}".rstrip())
        for status in client.status():
            if status.name == "mm_fusion: engine":
                print(f"engine: {status.message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
