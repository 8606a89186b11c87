"""The simulated cell: physics, one seeded episode at a time, the sensors, and what ends an episode.

``Cell`` is ROS-free: ``reset(seed)`` lays out an episode, ``command(qdot)``
holds a joint velocity command (as ros2_control's forward velocity controller:
held until replaced, zero once it is older than ``safety.command_timeout_s``),
``advance(t)`` steps physics up to sim time ``t`` and returns the sensor
readings captured on the way. ``outcome`` says whether the episode is running,
succeeded or failed, and why.

The task, and which sensor carries what (no other sensor carries it):

- camera (overhead, fixed): where the buttons are; they move every episode;
- microphone: which button to press; a tone per button colour, played at the start and repeated;
- LiDAR: the intruder; while it is in the protective field the tool must be (nearly) still;
- IMU (wrist): the click; each button's detent snaps at a depth drawn per episode, and it bottoms out
  soon after, so the arm must feel the click and let go before the stop (pushing into it is a force
  violation);
- joint states: the arm's own configuration.

Same seed and same commands -> the same readings, byte for byte (MuJoCo is deterministic on one
thread; every random draw comes from generators seeded by the episode seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import gl  # noqa: F401  (sets MUJOCO_GL before mujoco is imported)
from .config import CellConfig
from .panda import JOINT_NAMES, Q_MAX, Q_MIN, QD_MAX
from .readings import AudioChunk, CameraFrame, ImuReading, JointReading, LidarScan, Reading
from .scene import CAP_HEIGHT, COLOUR_NAMES, HOUSING_HEIGHT, INTRUDER_PARK_Y, cell_mjcf

import mujoco  # noqa: E402  (after gl)

BUTTON_PRELOAD_N = 1.0
RELEASE_FRACTION = 0.3       # a clicked button is released once it rises above this fraction of its click depth
OVERTRAVEL_MARGIN = 0.0005  # m short of the end stop at which a press counts as pressing into it
JOINT_LIMIT_MARGIN = 0.005
MAX_LAG_RAD = 0.1            # the servo reference runs at most this far ahead of a blocked joint   # rad; closer than this to a published limit fails the episode
HUM_HZ = 140.0               # the joint motors' hum fundamental


@dataclass(frozen=True)
class Intrusion:
    side: float               # +1: from the left (+y), -1: from the right
    x: float                  # m, where it reaches in
    reach_y: float            # |y| it reaches
    start: float              # s after the episode start when it starts moving in
    dwell: float              # s it stays at reach_y

    def y_at(self, t: float, speed: float) -> float:
        """|y| of its axis, ``t`` s after the episode start."""
        travel = (INTRUDER_PARK_Y - self.reach_y) / speed
        u = t - self.start
        if u <= 0 or u >= 2 * travel + self.dwell:
            return INTRUDER_PARK_Y
        if u < travel:
            return INTRUDER_PARK_Y - speed * u
        if u < travel + self.dwell:
            return self.reach_y
        return self.reach_y + speed * (u - travel - self.dwell)


@dataclass(frozen=True)
class EpisodeSpec:
    """Everything the seed decides."""

    seed: int
    target: int                       # which button the cue names
    buttons: tuple[tuple[float, float], ...]   # (x, y) of each button
    click_depth: tuple[float, ...]    # m, per button
    intrusion: Intrusion | None
    task: str = "press_cued_button"

    @property
    def target_colour(self) -> str:
        return COLOUR_NAMES[self.target]

    def as_dict(self) -> dict:
        return {"seed": self.seed, "task": self.task, "target": self.target, "target_colour": self.target_colour,
                "buttons": [list(b) for b in self.buttons], "click_depth": list(self.click_depth),
                "intrusion": None if self.intrusion is None else vars(self.intrusion).copy()}


@dataclass
class Outcome:
    status: str = "running"           # running | success | failure
    reason: str = ""                  # success | wrong_button | overtravel | excess_force | collision | intruder_contact |
                                      # protective_stop_violation | joint_limit | timeout
    t: float = float("nan")           # s after the episode start when it ended
    detail: str = ""

    @property
    def done(self) -> bool:
        return self.status != "running"


@dataclass
class EpisodeStats:
    """Counted while an episode runs (what eval and the episode metadata report)."""

    max_joint_speed: float = 0.0      # rad/s, largest |qdot| of any joint
    max_tool_force: float = 0.0       # N
    intruder_contacts: int = 0
    protective_time_s: float = 0.0    # s the intruder spent in the protective field
    target_clicked_at: float = float("nan")
    commands: int = 0
    command_timeouts: int = 0


def sample_episode(cfg: CellConfig, seed: int) -> EpisodeSpec:
    rng = np.random.default_rng([seed, 1])
    s = cfg.scene
    buttons: list[tuple[float, float]] = []
    for _ in range(10_000):
        if len(buttons) == s.targets:
            break
        p = (float(rng.uniform(*s.area_x)), float(rng.uniform(*s.area_y)))
        if all(math.hypot(p[0] - q[0], p[1] - q[1]) >= s.min_separation for q in buttons):
            buttons.append(p)
    else:  # pragma: no cover - the config's capacity check makes this unreachable in practice
        raise RuntimeError(f"seed {seed}: could not place {s.targets} buttons; loosen scene.min_separation")
    click = tuple(float(rng.uniform(*s.click_depth)) for _ in range(s.targets))
    target = int(rng.integers(s.targets))
    ic = cfg.intruder
    intrusion = None
    if rng.uniform() < ic.probability:
        intrusion = Intrusion(side=float(rng.choice([-1.0, 1.0])), x=float(rng.uniform(*ic.x)),
                              reach_y=float(rng.uniform(*ic.reach_y)), start=float(rng.uniform(*ic.start_s)),
                              dwell=float(rng.uniform(*ic.dwell_s)))
    return EpisodeSpec(seed, target, tuple(buttons), click, intrusion)


class Cell:
    """The MuJoCo cell. One instance runs many episodes; ``close()`` frees the renderer."""

    def __init__(self, cfg: CellConfig, render: bool = True):
        cfg.validate()
        self.cfg = cfg
        self.model = mujoco.MjModel.from_xml_string(cell_mjcf(cfg))
        self.data = mujoco.MjData(self.model)
        m = self.model
        self.dt = float(m.opt.timestep)
        self._arm_dofs = np.array([m.joint(n).dofadr[0] for n in JOINT_NAMES])
        self._arm_qpos = np.array([m.joint(n).qposadr[0] for n in JOINT_NAMES])
        k = cfg.scene.targets
        self._button_bodies = [m.body(f"button{i}").id for i in range(k)]
        self._button_jnt = [m.joint(f"button{i}").id for i in range(k)]
        self._button_qpos = np.array([m.jnt_qposadr[j] for j in self._button_jnt])
        self._button_dof = np.array([m.jnt_dofadr[j] for j in self._button_jnt])
        self._cap_geoms = {m.geom(f"button{i}_cap").id: i for i in range(k)}
        self._tip = m.geom("tip").id
        self._intruder_geom = m.geom("intruder").id
        self._arm_geoms = {i for i in range(m.ngeom) if m.geom_contype[i] == 1}
        self._tcp = m.site("tcp").id
        self._imu_site = m.site("imu").id
        self._lidar_site = m.site("lidar").id
        self._lidar_body = m.body("lidar").id
        self._accel_adr = m.sensor("imu_accel").adr[0]
        self._gyro_adr = m.sensor("imu_gyro").adr[0]
        beams = cfg.lidar.beams
        self._lidar_angles = -math.pi + np.arange(beams) * (2 * math.pi / beams)
        self._lidar_dirs = np.stack([np.cos(self._lidar_angles), np.sin(self._lidar_angles),
                                     np.zeros(beams)], axis=1).reshape(-1)
        self._ray_geom = np.zeros(beams, np.int32)
        self._ray_dist = np.zeros(beams, np.float64)
        # The arm's joints are the model's first seven, in order: views below rely on it.
        assert list(self._arm_qpos) == list(range(7)) and list(self._arm_dofs) == list(range(7))
        assert self._gyro_adr == self._accel_adr + 3
        self._q_view = self.data.qpos[:7]
        self._qdot_view = self.data.qvel[:7]
        self._imu_view = self.data.sensordata[self._accel_adr:self._accel_adr + 6]
        self._q_low, self._q_high = Q_MIN + JOINT_LIMIT_MARGIN, Q_MAX - JOINT_LIMIT_MARGIN
        self._command_timeout = cfg.safety.command_timeout_s
        self._intruder_speed = cfg.intruder.speed
        self._force6 = np.zeros(6)
        self._command = np.zeros(7)
        self._renderer = mujoco.Renderer(m, cfg.camera.height, cfg.camera.width) if render else None
        self.spec: EpisodeSpec | None = None
        self.outcome = Outcome()
        self.stats = EpisodeStats()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    def __enter__(self) -> "Cell":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ episode

    @property
    def t(self) -> float:
        """Sim clock (s): ``episode.start_time_s`` at the episode's start."""
        return self.cfg.episode.start_time_s + self.data.time

    @property
    def elapsed(self) -> float:
        return float(self.data.time)

    def reset(self, seed: int, q0: np.ndarray | None = None) -> EpisodeSpec:
        cfg, m, d = self.cfg, self.model, self.data
        spec = sample_episode(cfg, seed)
        mujoco.mj_resetData(m, d)
        rng = np.random.default_rng([seed, 2])
        from .panda import READY_Q
        q = READY_Q + rng.uniform(-0.05, 0.05, 7) if q0 is None else np.asarray(q0, float)
        d.qpos[self._arm_qpos] = q
        self._reference = q.copy()   # the joint servo's position reference (see panda.arm_mjcf)
        for i, body in enumerate(self._button_bodies):
            m.body_pos[body] = (*spec.buttons[i], 0.0)
            m.jnt_range[self._button_jnt[i]] = (-(spec.click_depth[i] + cfg.scene.free_travel), 0.0)
        d.mocap_pos[0] = (spec.intrusion.x if spec.intrusion else 0.5,
                          (spec.intrusion.side if spec.intrusion else 1.0) * INTRUDER_PARK_Y, 0.0)
        mujoco.mj_forward(m, d)
        self.spec = spec
        self.outcome = Outcome()
        self.stats = EpisodeStats()
        self._clicked = np.zeros(cfg.scene.targets, bool)
        self._command = np.zeros(7)
        self._command_t = -math.inf
        self._sensor_rng = {name: np.random.default_rng([seed, 3, i]) for i, name in
                            enumerate(("camera", "audio", "lidar", "imu", "joint_states", "latency"))}
        imu_rng = self._sensor_rng["imu"]
        self._accel_bias = imu_rng.normal(0, cfg.imu.accel_bias, 3)
        self._gyro_bias = imu_rng.normal(0, cfg.imu.gyro_bias, 3)
        self._imu_sum = np.zeros(6)
        self._imu_n = 0
        self._speed_sum = 0.0
        self._speed_n = 0
        self._next = {"camera": 0.0, "audio": cfg.audio.chunk_s, "lidar": 0.0, "imu": 1.0 / cfg.imu.rate_hz,
                      "joint_states": 0.0}
        if self._renderer is None:
            self._next["camera"] = math.inf
        self._next_reading = min(self._next.values())
        self._audio_index = 0  # samples emitted so far
        self._intrusion = spec.intrusion
        self._field_in, self._field_out = self._field_interval(spec)
        self._click_depth = np.array(spec.click_depth)
        self._bottom = self._click_depth + cfg.scene.free_travel
        self._detent_changed()
        self._commanding = False
        return spec

    def _field_interval(self, spec: EpisodeSpec) -> tuple[float, float]:
        """When the intruder is in the protective field, in s after the start (its path is known in advance)."""
        ic, i = self.cfg.intruder, spec.intrusion
        if i is None or not ic.field_x[0] <= i.x <= ic.field_x[1] or i.reach_y >= ic.field_y:
            return (math.inf, math.inf)
        to_edge = (INTRUDER_PARK_Y - ic.field_y) / ic.speed
        inside = 2 * (ic.field_y - i.reach_y) / ic.speed + i.dwell
        return (i.start + to_edge, i.start + to_edge + inside)

    def command(self, qdot: np.ndarray) -> None:
        """A joint velocity command (rad/s, the 7 joints in JOINT_NAMES order), held until replaced."""
        qdot = np.asarray(qdot, np.float64).reshape(-1)
        if qdot.shape != (7,) or not np.all(np.isfinite(qdot)):
            raise ValueError(f"a command is 7 finite joint velocities, got {qdot!r}")
        self._command[:] = np.clip(qdot, -QD_MAX, QD_MAX)
        self._command_t = self.elapsed
        self._commanding = True
        self.stats.commands += 1

    def estop(self) -> None:
        """Stop now: the held command becomes zero and the servo holds the joints where they are (it brakes
        within a few milliseconds); the next command moves the arm again."""
        self._command[:] = 0.0
        self._reference[:] = self._q_view
        self._command_t = self.elapsed

    def advance(self, until: float) -> list[Reading]:
        """Step physics until sim time ``until`` (clock time, as ``t``) or the episode's end."""
        readings: list[Reading] = []
        while not self.outcome.done and self.t + 0.5 * self.dt < until:
            self._step(readings)
        return readings

    # ------------------------------------------------------------ privileged state (the expert's, the checks')

    @property
    def q(self) -> np.ndarray:
        return self.data.qpos[self._arm_qpos].copy()

    @property
    def qdot(self) -> np.ndarray:
        return self.data.qvel[self._arm_dofs].copy()

    def tcp(self) -> tuple[np.ndarray, np.ndarray]:
        """Tool tip position (3,) and orientation (3x3) in the base frame."""
        d = self.data
        return d.site_xpos[self._tcp].copy(), d.site_xmat[self._tcp].reshape(3, 3).copy()

    def tcp_jacobian(self) -> np.ndarray:
        """(6, 7): linear then angular velocity of the tool tip per joint velocity."""
        jacp = np.zeros((3, self.model.nv))
        jacr = np.zeros((3, self.model.nv))
        mujoco.mj_jacSite(self.model, self.data, jacp, jacr, self._tcp)
        return np.vstack([jacp[:, self._arm_dofs], jacr[:, self._arm_dofs]])

    def tcp_speed(self) -> float:
        return float(np.linalg.norm(self.tcp_jacobian()[:3] @ self.qdot))

    def button_depth(self, k: int) -> float:
        return float(-self.data.qpos[self._button_qpos[k]])

    def button_top(self, k: int) -> np.ndarray:
        x, y = self.spec.buttons[k]
        return np.array([x, y, HOUSING_HEIGHT + CAP_HEIGHT - self.button_depth(k)])

    def clicked(self, k: int) -> bool:
        return bool(self._clicked[k])

    def intruder_xy(self) -> np.ndarray:
        return self.data.mocap_pos[0, :2].copy()

    def in_protective_field(self) -> bool:
        return self._field_in <= self.elapsed < self._field_out

    # ------------------------------------------------------------ one physics step

    def _step(self, readings: list[Reading]) -> None:
        # The hot path (1 kHz): views into MjData and plain floats, no per-step allocation where avoidable.
        d = self.data
        elapsed = d.time
        if elapsed - self._command_t > self._command_timeout and self._commanding:
            self._command[:] = 0.0
            self._commanding = False
            self.stats.command_timeouts += 1
        q = self._q_view
        ref = self._reference
        ref += self._command * self.dt
        # np.clip's result, without its Python wrapper (this runs 400 times a simulated second)
        np.minimum(np.maximum(ref, q - MAX_LAG_RAD, out=ref), q + MAX_LAG_RAD, out=ref)
        d.ctrl[:7] = ref
        d.ctrl[7:14] = self._command
        self._button_forces()
        if self._intrusion is not None:
            d.mocap_pos[0, 1] = self._intrusion.side * self._intrusion.y_at(elapsed, self._intruder_speed)
        mujoco.mj_step(self.model, d)
        self._imu_sum += self._imu_view
        self._imu_n += 1
        speed = np.abs(self._qdot_view)
        self._speed_sum += float(speed.sum())
        self._speed_n += 1
        peak = float(speed.max())
        if peak > self.stats.max_joint_speed:
            self.stats.max_joint_speed = peak
        self._check()
        if d.time + 0.5 * self.dt >= self._next_reading:
            self._sense(readings)

    def _button_forces(self) -> None:
        """Each button's spring and detent: rising force to the click depth, then a snap to a low force.

        The drop is the click: the tool, pushing with the spring's force, lurches forward for a few
        milliseconds until the servo catches it, which the wrist accelerometer feels. Released (risen
        above RELEASE_FRACTION of the click depth), the detent re-arms.
        """
        s, d = self.cfg.scene, self.data
        depth = -d.qpos[self._button_qpos]
        xc = self._click_depth
        clicked = self._clicked
        if (depth >= self._press_at).any() or (depth < self._release_at).any():
            for k in range(s.targets):   # a state change: rare, so the plain loop
                x = depth[k]
                if not clicked[k] and x >= xc[k]:
                    self._on_click(k)
                elif clicked[k] and x < RELEASE_FRACTION * xc[k]:
                    clicked[k] = False
                    if k == self.spec.target:
                        self._end("success", "success", f"{COLOUR_NAMES[k]} button clicked and released")
                if x >= self._bottom[k] - OVERTRAVEL_MARGIN:
                    self._end("failure", "overtravel", f"{COLOUR_NAMES[k]} button pressed into its end stop")
            self._detent_changed()
        spring = BUTTON_PRELOAD_N + (s.click_force - BUTTON_PRELOAD_N) * np.maximum(depth, 0.0) / xc
        d.qfrc_applied[self._button_dof] = np.where(clicked, s.after_click_force, spring)

    def _detent_changed(self) -> None:
        """The depths at which each button's state changes next, from its clicked flag (checked every physics
        step, so kept rather than rebuilt): an unclicked one clicks at its click depth; a clicked one hits
        its end stop near the bottom, or re-arms above RELEASE_FRACTION of the click depth."""
        clicked, xc = self._clicked, self._click_depth
        self._press_at = np.where(clicked, self._bottom - OVERTRAVEL_MARGIN, xc)
        self._release_at = np.where(clicked, RELEASE_FRACTION * xc, -np.inf)

    def _on_click(self, k: int) -> None:
        self._clicked[k] = True
        if k == self.spec.target:
            if math.isnan(self.stats.target_clicked_at):
                self.stats.target_clicked_at = self.elapsed
        else:
            self._end("failure", "wrong_button",
                      f"{COLOUR_NAMES[k]} clicked; the cue named {COLOUR_NAMES[self.spec.target]}")

    def _end(self, status: str, reason: str, detail: str) -> None:
        if not self.outcome.done:
            self.outcome = Outcome(status, reason, self.elapsed, detail)

    def _check(self) -> None:
        cfg, d = self.cfg, self.data
        if d.ncon:
            self._check_contacts()
        q = self._q_view
        if (q < self._q_low).any() or (q > self._q_high).any():
            j = int(np.flatnonzero((q < self._q_low) | (q > self._q_high))[0])
            self._end("failure", "joint_limit", f"{JOINT_NAMES[j]} at {q[j]:.3f} rad")
        elapsed = d.time
        if self._field_in <= elapsed < self._field_out:
            self.stats.protective_time_s += self.dt
            if elapsed - self._field_in > cfg.safety.reaction_s:
                speed = self.tcp_speed()
                if speed > cfg.safety.protective_speed:
                    self._end("failure", "protective_stop_violation",
                              f"tool at {speed:.3f} m/s with the intruder in the protective field "
                              f"(limit {cfg.safety.protective_speed} m/s)")
        if elapsed >= cfg.episode.time_limit_s - 0.5 * self.dt:
            self._end("failure", "timeout", f"no success within {cfg.episode.time_limit_s:g} s")

    def _check_contacts(self) -> None:
        cfg, m, d = self.cfg, self.model, self.data
        tool_force = 0.0
        force = self._force6
        for i in range(d.ncon):
            c = d.contact[i]
            g1, g2 = int(c.geom1), int(c.geom2)
            arm, other = (g1, g2) if g1 in self._arm_geoms else (g2, g1)
            if arm not in self._arm_geoms:
                continue
            if other == self._intruder_geom:
                self.stats.intruder_contacts += 1
                self._end("failure", "intruder_contact", "the arm touched the intruder")
                continue
            if arm == self._tip and other in self._cap_geoms:
                mujoco.mj_contactForce(m, d, i, force)
                tool_force += abs(force[0])
                continue
            self._end("failure", "collision", f"{m.geom(arm).name} touched {m.geom(other).name}")
        self.stats.max_tool_force = max(self.stats.max_tool_force, tool_force)
        if tool_force > cfg.safety.max_force:
            self._end("failure", "excess_force", f"{tool_force:.0f} N on the tool (limit {cfg.safety.max_force:g} N)")

    # ------------------------------------------------------------ sensors

    def _due(self, name: str, period: float) -> bool:
        if self.data.time + 0.5 * self.dt >= self._next[name]:
            self._next[name] += period
            return True
        return False

    def _latency(self, bounds: tuple[float, ...]) -> float:
        return float(self._sensor_rng["latency"].uniform(bounds[0], bounds[1]))

    def _sense(self, readings: list[Reading]) -> None:
        cfg, d = self.cfg, self.data
        now = self.t
        if self._due("imu", 1.0 / cfg.imu.rate_hz):
            mean = self._imu_sum / max(self._imu_n, 1)   # the IMU's own decimation filter
            rng = self._sensor_rng["imu"]
            accel = mean[:3] + self._accel_bias + rng.normal(0, cfg.imu.accel_noise, 3)
            gyro = mean[3:] + self._gyro_bias + rng.normal(0, cfg.imu.gyro_noise, 3)
            self._imu_sum[:] = 0.0
            self._imu_n = 0
            readings.append(ImuReading(now, now + self._latency(cfg.imu.latency_s), accel, gyro))
        if self._due("joint_states", 1.0 / cfg.joint_states.rate_hz):
            rng = self._sensor_rng["joint_states"]
            js = cfg.joint_states
            readings.append(JointReading(
                now, now + self._latency(js.latency_s),
                d.qpos[self._arm_qpos] + rng.normal(0, js.position_noise, 7),
                d.qvel[self._arm_dofs] + rng.normal(0, js.velocity_noise, 7),
                d.qfrc_actuator[self._arm_dofs].copy()))
        if self._due("audio", cfg.audio.chunk_s):
            readings.append(self._audio_chunk())
        if self._due("lidar", 1.0 / cfg.lidar.rate_hz):
            readings.append(self._lidar_scan(now))
        if self._renderer is not None and self._due("camera", 1.0 / cfg.camera.rate_hz):
            self._renderer.update_scene(d, camera="overhead")
            pixels = self._renderer.render()
            readings.append(CameraFrame(now, now + self._latency(cfg.camera.latency_s), pixels))
        self._next_reading = min(self._next.values())

    def _audio_chunk(self) -> AudioChunk:
        """The last chunk_s of sound: background noise, the motors' hum, and the cue while it plays."""
        a = self.cfg.audio
        n = int(round(a.chunk_s * a.sample_rate))
        i0 = self._audio_index
        self._audio_index += n
        t = (i0 + np.arange(n)) / a.sample_rate          # s since the episode start
        rng = self._sensor_rng["audio"]
        sound = a.noise_level * rng.standard_normal(n)
        speed = self._speed_sum / max(self._speed_n, 1)
        self._speed_sum, self._speed_n = 0.0, 0
        sound += a.hum_level * min(speed, 3.0) * (np.sin(2 * np.pi * HUM_HZ * t) + 0.5 * np.sin(4 * np.pi * HUM_HZ * t))
        phase = t - a.cue_start_s
        on = (phase >= 0) & (np.mod(phase, a.cue_period_s) < a.cue_s)
        if np.any(on):
            u = np.mod(phase, a.cue_period_s)
            ramp = np.clip(np.minimum(u, a.cue_s - u) / 0.02, 0.0, 1.0)   # 20 ms fades: no clicks in the cue
            sound += on * ramp * a.cue_level * np.sin(2 * np.pi * a.cue_tones_hz[self.spec.target] * t)
        pcm = np.clip(np.round(sound * 32767.0), -32768, 32767).astype(np.int16)
        stamp = self.cfg.episode.start_time_s + i0 / a.sample_rate
        end = stamp + n / a.sample_rate
        return AudioChunk(stamp, end + self._latency(a.latency_s), pcm, a.sample_rate)

    def _lidar_scan(self, now: float) -> LidarScan:
        cfg, m, d = self.cfg, self.model, self.data
        lc = cfg.lidar
        mujoco.mj_multiRay(m, d, d.site_xpos[self._lidar_site], self._lidar_dirs, None, 1, self._lidar_body,
                           self._ray_geom, self._ray_dist, None, lc.beams, lc.range_max)
        rng = self._sensor_rng["lidar"]
        ranges = self._ray_dist + rng.normal(0, lc.noise_std, lc.beams)
        lost = (self._ray_geom < 0) | (ranges > lc.range_max) | (ranges < lc.range_min) \
            | (rng.uniform(size=lc.beams) < lc.dropout)
        ranges = np.where(lost, np.inf, ranges).astype(np.float32)
        scan_time = 1.0 / lc.rate_hz
        return LidarScan(now, now + scan_time + self._latency(lc.latency_s), ranges, float(self._lidar_angles[0]),
                         2 * math.pi / lc.beams, scan_time, lc.range_min, lc.range_max)
