"""The fusion loop for robots and simulators without ROS: sensor samples in, the safe command out.

``PolicyClient`` is fusion_node without the node: the same ``Runtime`` (aligner, streaming state,
safety filter, diagnostics), fed with the ROS-free sample types of ``mm_fusion_ros.samples`` (what
the aligner takes from every shell) and stepped at the caller's tick times. The step runs on a
policy server (``endpoint=``, ``mm-fusion serve``) or in-process (any other backend); either way the
aligner and the safety filter run here, next to the arm, so a lost server costs ticks at rest, never
an unchecked command::

    from mm_fusion_ros.client import PolicyClient
    from mm_fusion_ros.samples import ImuSample

    with PolicyClient("config/robot.yaml", endpoint="tcp://gpu-box:5555",
                      server_key="keys/server.key", client_key="keys/clients/arm1.key_secret") as policy:
        policy.enable()
        while running:
            for sample in new_sensor_samples():      # CameraSample, AudioSample, ImuSample, LidarSample, ...
                policy.add(sample, now=clock())
            command = policy.step(clock())           # Command: values, commanded, held, reasons
            if command.commanded:
                send_to_arm(command.values)

``examples/sim_policy_client.py`` drives the simulated cell this way.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import RobotConfig, config_from_dict, config_to_dict, load_config


@dataclass(frozen=True)
class Command:
    """What one tick gives the arm."""

    t: float                    # the tick time it was computed for
    values: np.ndarray          # float64 (dof,), within the safety limits; rest when anything failed
    commanded: bool             # True: send it to the arm; False: dry run (disabled or e-stopped), preview only
    held: bool                  # the network's action was replaced (stale input, failed step, e-stop)
    reasons: tuple[str, ...]    # why it differs from the network's action
    failed: bool = False        # the tick itself raised: values are rest


class PolicyClient:
    """fusion_node's loop as a library. Not thread-safe for ``step``: call it from one control thread;
    ``add``, ``estop``, ``enable`` and ``disable`` may come from other threads, as the Runtime allows."""

    def __init__(self, config: str | Path | RobotConfig = "config/robot.yaml", *, endpoint: str | None = None,
                 timeout_ms: float | None = None, server_key: str | None = None, client_key: str | None = None,
                 backend: str | None = None, engine: Any = None, log: Callable[[str], None] = print):
        cfg = config if isinstance(config, RobotConfig) else load_config(config)
        engine_cfg = cfg.engine
        if endpoint is not None or timeout_ms is not None or server_key is not None or client_key is not None:
            remote = dataclasses.replace(
                engine_cfg.remote, **{k: v for k, v in (("endpoint", endpoint), ("timeout_ms", timeout_ms),
                                                       ("server_key", server_key), ("client_key", client_key))
                                      if v is not None})
            engine_cfg = dataclasses.replace(engine_cfg, remote=remote, backend="remote" if endpoint else engine_cfg.backend)
        if backend is not None:
            engine_cfg = dataclasses.replace(engine_cfg, backend=backend)
        # Through the dict form, so that every override is validated as the YAML would be.
        cfg = config_from_dict(config_to_dict(dataclasses.replace(cfg, engine=engine_cfg)))
        from .runtime import Runtime   # torch loads here

        self.cfg = cfg
        self.log = log
        self.runtime = Runtime(cfg, engine=engine, log=log)
        self.last = None                # the last tick's TickResult (None after a failed tick)
        self.failed_ticks = 0

    # ------------------------------------------------------------ inputs and switches

    def add(self, sample: Any, now: float) -> bool:
        """Buffer a sensor sample (its ``stamp`` the capture time); ``now`` the clock at arrival. False when
        it was dropped (counted in ``status()``)."""
        return self.runtime.add(sample, now)

    def enable(self) -> tuple[bool, str]:
        """Command the arm from the next tick (refused while the e-stop is asserted)."""
        return self.runtime.set_enabled(True)

    def disable(self) -> tuple[bool, str]:
        """Dry run: commands are computed and returned with ``commanded`` False."""
        return self.runtime.set_enabled(False)

    def estop(self, active: bool) -> None:
        """The e-stop input: asserted latches rest until re-enabled."""
        self.runtime.estop(active)

    # ------------------------------------------------------------ the tick

    def step(self, t: float) -> Command:
        """One control tick at time ``t`` (seconds on the samples' clock)."""
        wall = time.perf_counter()
        try:
            result = self.runtime.tick(t)
        except Exception as exc:  # noqa: BLE001 - as fusion_node: the arm gets rest, never a stale command
            self.failed_ticks += 1
            if self.failed_ticks == 1 or self.failed_ticks % 1000 == 0:
                self.log(f"tick at t={t:.3f} failed ({self.failed_ticks} so far): {type(exc).__name__}: {exc}")
            out = self.runtime.rest(t)
            self.last = None
            return Command(t, np.asarray(out.command), out.commanded, True, ("tick failed",), failed=True)
        self.runtime.record(result, 0.0, wall)
        self.last = result
        out = result.safety
        return Command(t, np.asarray(out.command), out.commanded, out.held, out.reasons)

    # ------------------------------------------------------------ diagnostics

    def status(self) -> list[Any]:
        """The diagnostics fusion_node publishes on /diagnostics (cadence, inputs, safety, engine);
        each call starts a new window."""
        return self.runtime.report()

    def summary(self) -> dict:
        return self.runtime.summary()

    def close(self) -> None:
        self.runtime.engine.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
