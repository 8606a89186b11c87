"""The simulated cell (ROS-free): the arm against its published kinematics, episodes, sensors, outcomes.

Each sensor's test checks that it carries what the task needs from it (camera: where the buttons
are, not the intruder; microphone: the cued button's tone; LiDAR: the intruder; IMU: the click)
and the outcome tests drive the cell into every way an episode ends.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from mm_fusion_ros.config import ConfigError
from mm_fusion_ros.sim import panda
from mm_fusion_ros.sim.cell import Cell, sample_episode
from mm_fusion_ros.sim.config import CellConfig, cell_config_from_dict, load_cell_config
from mm_fusion_ros.sim.expert import Expert, run_expert_episode
from mm_fusion_ros.sim.readings import ArrivalQueue
from mm_fusion_ros.sim.scene import LIDAR_X

REPO = Path(__file__).resolve().parents[1]
SIM_YAML = REPO / "config" / "sim.yaml"


@pytest.fixture(scope="module")
def cfg() -> CellConfig:
    return load_cell_config(SIM_YAML)


@pytest.fixture(scope="module")
def cell(cfg):
    with Cell(cfg) as c:
        yield c


def _seed_with(cfg: CellConfig, intrusion: bool, start: int = 0) -> int:
    for seed in range(start, start + 200):
        if (sample_episode(cfg, seed).intrusion is not None) == intrusion:
            return seed
    raise AssertionError("no such seed")


def _run(cell: Cell, seconds: float, command=None) -> list:
    out, t = [], cell.t
    end = cell.t + seconds
    while t < end - 1e-9 and not cell.outcome.done:
        if command is not None:
            cell.command(command(cell))
        t += 0.01
        out += cell.advance(t)
    return out


# ---------------------------------------------------------------- the arm

def test_mjcf_matches_the_published_kinematics(cell):
    rng = np.random.default_rng(0)
    tcp = cell.model.site("tcp").id
    for _ in range(20):
        q = rng.uniform(panda.Q_MIN, panda.Q_MAX)
        cell.data.qpos[:7] = q
        import mujoco
        mujoco.mj_kinematics(cell.model, cell.data)
        expected = panda.forward_kinematics(q, panda.TOOL_LENGTH + panda.TIP_RADIUS)
        assert np.allclose(cell.data.site_xpos[tcp], expected[:3, 3], atol=1e-9)
        assert np.allclose(cell.data.site_xmat[tcp].reshape(3, 3) @ np.diag([1, 1, 1]) @ np.eye(3)[:, 2],
                           expected[:3, 2], atol=1e-9)   # the tool axis


def test_joint_limits_and_torques_are_the_published_ones(cell):
    m = cell.model
    for i, name in enumerate(panda.JOINT_NAMES):
        j = m.joint(name)
        assert tuple(np.round(j.range, 4)) == (round(panda.Q_MIN[i], 4), round(panda.Q_MAX[i], 4))
        assert tuple(m.jnt_actfrcrange[j.id]) == (-panda.TAU_MAX[i], panda.TAU_MAX[i])
    # The ready pose of the published facts puts the fingertip ahead of the base, pointing down.
    T = panda.forward_kinematics(panda.READY_Q)
    assert 0.25 < T[0, 3] < 0.35 and abs(T[1, 3]) < 1e-9 and np.allclose(T[:3, 2], [0, 0, -1], atol=1e-6)


# ---------------------------------------------------------------- episodes and commands

def test_episode_layout_is_seeded_and_valid(cfg):
    a, b = sample_episode(cfg, 5), sample_episode(cfg, 5)
    assert a == b
    layouts = {sample_episode(cfg, s).buttons for s in range(50)}
    assert len(layouts) == 50
    targets = {sample_episode(cfg, s).target for s in range(50)}
    assert targets == set(range(cfg.scene.targets))
    for s in range(50):
        e = sample_episode(cfg, s)
        for i, (x, y) in enumerate(e.buttons):
            assert cfg.scene.area_x[0] <= x <= cfg.scene.area_x[1] and cfg.scene.area_y[0] <= y <= cfg.scene.area_y[1]
            for x2, y2 in e.buttons[i + 1:]:
                assert math.hypot(x - x2, y - y2) >= cfg.scene.min_separation
            assert cfg.scene.click_depth[0] <= e.click_depth[i] <= cfg.scene.click_depth[1]


def _digest(readings) -> str:
    h = hashlib.sha256()
    for r in readings:
        h.update(r.sensor.encode())
        h.update(np.float64([r.stamp, r.receive]).tobytes())
        for name in ("pixels", "pcm", "ranges", "accel", "gyro", "position", "velocity", "effort"):
            if hasattr(r, name):
                h.update(np.ascontiguousarray(getattr(r, name)).tobytes())
    return h.hexdigest()


def test_same_seed_same_sensor_data_byte_for_byte(cfg, cell):
    def episode(c: Cell, seed: int) -> str:
        c.reset(seed)
        expert = Expert(c)
        return _digest(_run(c, 3.0, lambda _: expert.act()))

    first = episode(cell, 11)
    with Cell(cfg) as other:
        assert episode(other, 11) == first      # a fresh cell, the same seed
    assert episode(cell, 11) == first           # the same cell, reset
    assert episode(cell, 12) != first


def test_command_is_held_then_zeroed_after_the_timeout(cell):
    cell.reset(_seed_with(cell.cfg, intrusion=False))
    cell.command(np.array([0.3, 0, 0, 0, 0, 0, 0]))
    cell.advance(cell.t + 0.05)                        # younger than the 100 ms timeout: held
    assert cell.qdot[0] == pytest.approx(0.3, abs=0.03)
    cell.advance(cell.t + 0.15)                        # no new command for 200 ms: zero
    assert abs(cell.qdot[0]) < 0.02
    assert cell.stats.command_timeouts == 1
    q = cell.q
    cell.advance(cell.t + 0.3)
    assert np.abs(cell.q - q).max() < 1e-3              # and the arm holds where it stopped


@pytest.mark.parametrize("bad", [np.zeros(6), np.zeros(8), np.array([0, 0, np.nan, 0, 0, 0, 0]),
                                 np.array([0, 0, 0, np.inf, 0, 0, 0])])
def test_bad_commands_are_refused(cell, bad):
    cell.reset(1)
    with pytest.raises(ValueError, match="7 finite"):
        cell.command(bad)


def test_estop_stops_the_arm_within_one_tick(cell):
    cell.reset(_seed_with(cell.cfg, intrusion=False))
    for _ in range(20):
        cell.command(np.array([0.5, 0, 0, 0, 0, 0, 0]))
        cell.advance(cell.t + 0.01)
    moving, q_stop = cell.qdot[0], cell.q[0]
    assert moving > 0.4
    cell.estop()
    cell.advance(cell.t + cell.dt)                  # the very next physics step: the servo commands zero
    assert cell.data.ctrl[7] == 0.0 and cell.qdot[0] < moving
    cell.advance(cell.t + 0.01 - cell.dt)           # one control tick after the e-stop: all but stopped
    assert abs(cell.qdot[0]) < 0.2 * moving
    cell.advance(cell.t + 0.2)                      # and it stays stopped, a few mrad from where it was
    assert abs(cell.qdot[0]) < 0.02 and abs(cell.q[0] - q_stop) < 0.01


# ---------------------------------------------------------------- sensors

def test_sensor_rates_stamps_and_shapes(cfg, cell):
    cell.reset(_seed_with(cfg, intrusion=False))
    readings = _run(cell, 2.0)
    by = {}
    for r in readings:
        by.setdefault(r.sensor, []).append(r)
        assert r.receive > r.stamp                  # stamped at capture, delivered later
    assert len(by["camera"]) == pytest.approx(60, abs=1)
    assert len(by["lidar"]) == pytest.approx(20, abs=1)
    assert len(by["imu"]) == pytest.approx(400, abs=1)
    assert len(by["joint_states"]) == pytest.approx(200, abs=1)
    assert len(by["audio"]) == pytest.approx(100, abs=1)
    assert all(r.pixels.shape == (cfg.camera.height, cfg.camera.width, 3) and r.pixels.dtype == np.uint8
               for r in by["camera"])
    # Audio chunks are back to back: each starts where the last ended.
    a = by["audio"]
    assert all(len(c.pcm) == 320 and c.pcm.dtype == np.int16 for c in a)
    assert np.allclose(np.diff([c.stamp for c in a]), cfg.audio.chunk_s)
    # LiDAR: the configured beams, dropouts as inf (REP 117), the fence in range (the front of the cell is open).
    scan = by["lidar"][0]
    assert len(scan.ranges) == cfg.lidar.beams and np.isinf(scan.ranges).any() and np.isfinite(scan.ranges).mean() > 0.5
    # IMU at rest reads gravity (a specific force, as real accelerometers do), with the configured noise.
    accel = np.array([r.accel for r in by["imu"]])
    assert np.linalg.norm(accel.mean(axis=0)) == pytest.approx(9.81, abs=0.2)
    assert 0.5 * cfg.imu.accel_noise < accel.std(axis=0).mean() < 3 * cfg.imu.accel_noise


def test_arrival_queue_orders_by_receive_time(cfg, cell):
    cell.reset(3)
    q = ArrivalQueue()
    q.push(_run(cell, 0.5))
    out = q.drain()
    receives = [r.receive for r in out]
    assert receives == sorted(receives) and len(q) == 0


def _tone_power(pcm: np.ndarray, rate: int, freq: float) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(len(pcm))))
    bins = np.fft.rfftfreq(len(pcm), 1 / rate)
    return float(spectrum[np.abs(bins - freq) < 20].max() / np.median(spectrum))


def test_microphone_carries_the_cued_button(cfg, cell):
    a = cfg.audio
    for seed in range(6):
        spec = cell.reset(seed)
        audio = np.concatenate([r.pcm for r in _run(cell, 1.2) if r.sensor == "audio"])
        n0, n1 = int((a.cue_start_s + 0.05) * a.sample_rate), int((a.cue_start_s + a.cue_s - 0.05) * a.sample_rate)
        during, before = audio[n0:n1], audio[: int(0.4 * a.sample_rate)]
        tone = a.cue_tones_hz[spec.target]
        assert _tone_power(during, a.sample_rate, tone) > 50
        assert _tone_power(before, a.sample_rate, tone) < 10       # not before the cue
        for other in range(cfg.scene.targets):
            if other != spec.target:
                assert _tone_power(during, a.sample_rate, a.cue_tones_hz[other]) < 10


def _project(cfg: CellConfig, x: float, y: float, z: float) -> tuple[int, int]:
    """Pixel (row, col) of a base-frame point in the overhead camera (looking down, image up = +x)."""
    cam = cfg.camera
    cx, cy = np.mean(cfg.scene.area_x), np.mean(cfg.scene.area_y)
    f = (cam.height / 2) / math.tan(math.radians(cam.fovy_deg) / 2)
    depth = cam.height_m - z
    col = cam.width / 2 - f * (y - cy) / depth
    row = cam.height / 2 - f * (x - cx) / depth
    return int(round(row)), int(round(col))


def test_camera_sees_the_buttons_but_not_the_intruder(cfg, cell):
    seed = _seed_with(cfg, intrusion=True)
    spec = cell.reset(seed)
    frame = next(r for r in _run(cell, 0.05) if r.sensor == "camera").pixels.astype(int)
    colours = {0: (0, 1, 2), 1: (1, 0, 2), 2: (2, 0, 1)}   # the dominant channel of red, green, blue caps
    for k, (x, y) in enumerate(spec.buttons):
        r, c = _project(cfg, x, y, 0.036)
        px = frame[r, c]
        main, o1, o2 = colours[k]
        assert px[main] > px[o1] + 40 and px[main] > px[o2] + 40, (k, px)
    # The intruder at its deepest reach is outside the view: the frame is the same as with it parked.
    i = spec.intrusion
    cell.reset(seed)
    parked = next(r for r in _run(cell, 0.05) if r.sensor == "camera").pixels
    cell.data.mocap_pos[0] = (i.x, i.side * i.reach_y, 0.0)
    cell._renderer.update_scene(cell.data, camera="overhead")
    assert np.array_equal(cell._renderer.render(), parked)


def test_lidar_sees_the_intruder_and_the_protective_field(cfg, cell):
    seed = _seed_with(cfg, intrusion=True)
    spec = cell.reset(seed)
    i = spec.intrusion
    scans = [r for r in _run(cell, i.start + 2.0) if r.sensor == "lidar"]
    lx = LIDAR_X   # the LiDAR at the front edge of the table
    expected_angle = math.atan2(i.side * i.reach_y, i.x - lx)
    expected_range = math.hypot(i.x - lx, i.reach_y) - cfg.intruder.radius
    beam = int(round((expected_angle + math.pi) / (2 * math.pi / cfg.lidar.beams))) % cfg.lidar.beams
    first, last = scans[0], scans[-1]
    window = slice(beam - 2, beam + 3)
    assert np.all(np.abs(first.ranges[window] - expected_range) > 0.2)      # not there at the start
    assert np.nanmin(np.abs(last.ranges[window] - expected_range)) < 0.05    # there at its reach
    assert cell.in_protective_field()


def test_imu_feels_the_click(cfg, cell):
    """The detent's snap shows at the wrist before the arm reacts (here: it never reacts)."""
    seed = _seed_with(cfg, intrusion=False)
    cell.reset(seed)
    expert = Expert(cell)
    imu = []
    t = cell.t
    while expert.phase != "release" and not cell.outcome.done:
        cell.command(expert.act())
        t += 0.01
        imu += [r for r in cell.advance(t) if r.sensor == "imu"]
    clicked_at = cell.stats.target_clicked_at + cfg.episode.start_time_s
    # Keep pressing 40 ms after the click, as a policy that has not noticed yet would.
    deaf = _DeafToClickExpert(cell)
    deaf.phase = "descend"
    for _ in range(4):
        cell.command(deaf.act())
        t += 0.01
        imu += [r for r in cell.advance(t) if r.sensor == "imu"]
    stamps = np.array([r.stamp for r in imu])
    accel = np.array([r.accel for r in imu])
    base = np.median(accel[(stamps > clicked_at - 0.6) & (stamps < clicked_at - 0.1)], axis=0)
    dev = np.linalg.norm(accel - base, axis=1)
    before = dev[(stamps > clicked_at - 0.5) & (stamps < clicked_at - 0.02)].max()
    after = dev[(stamps >= clicked_at) & (stamps < clicked_at + 0.04)].max()
    assert after > 4 * before, (before, after)


# ---------------------------------------------------------------- outcomes

def test_expert_solves_episodes_with_and_without_an_intruder(cfg, cell):
    early = [s for s in range(300) if (e := sample_episode(cfg, s)).intrusion is not None and e.intrusion.start < 2.5]
    for seed in (_seed_with(cfg, False), early[0], early[1]):
        run_expert_episode(cell, seed)
        assert cell.outcome.status == "success", (seed, cell.outcome)
        assert cell.stats.max_tool_force < cfg.safety.max_force
        if cell.spec.intrusion is not None:   # the whole intrusion came and went, and the arm waited it out
            assert cell.stats.protective_time_s == pytest.approx(cell._field_out - cell._field_in, abs=0.01)
            assert cell.stats.protective_time_s > 1.0
    # DART noise pushes the arm off the expert's path; the expert brings it back.
    run_expert_episode(cell, early[0], noise=0.1)
    assert cell.outcome.status == "success", cell.outcome
    # ... and from a drift, which holds it off its path for half a second at a time.
    for seed in (early[0], _seed_with(cfg, False)):
        run_expert_episode(cell, seed, noise=0.1, noise_tau_s=0.5)
        assert cell.outcome.status == "success", (seed, cell.outcome)


class _WrongButtonExpert(Expert):
    def act(self):
        spec = self.cell.spec
        self.cell.spec = dataclasses.replace(spec, target=(spec.target + 1) % len(spec.buttons))
        try:
            return super().act()
        finally:
            self.cell.spec = spec


class _DeafToClickExpert(Expert):
    def act(self):
        self.cell.clicked = lambda k: False    # it never learns of the click (an instance attribute)
        try:
            return super().act()
        finally:
            del self.cell.clicked


class _IgnoresIntruderExpert(Expert):
    def _intruder_near(self) -> bool:
        return False


def _drive(cell: Cell, seed: int, expert_cls) -> str:
    cell.reset(seed)
    expert = expert_cls(cell)
    _run(cell, cell.cfg.episode.time_limit_s + 1, lambda _: expert.act())
    return cell.outcome.reason


def test_the_expert_labels_a_policy_that_comes_down_over_the_button_by_another_way(cfg, cell):
    """DAgger: the expert follows an arm someone else drives and labels each tick. A driver that comes in low from
    the side, never passing the point 5 cm above the button that the expert's own approach ends at, gets the
    descent as its label once over the button (not a climb back to that point), and the release once the
    detent clicks; drifted off the button's axis before pressing, it gets the approach again."""
    from mm_fusion_ros.sim.expert import APPROACH_DONE_M, DESCEND_ABORT_M

    seed = _seed_with(cfg, False)
    cell.reset(seed)
    driver, follower = Expert(cell), Expert(cell)
    target = cell.spec.target
    top = cell.button_top(target)
    side = np.array([top[0], top[1] + 0.08, top[2] + 0.025])   # low, beside the button
    over = np.array([top[0], top[1], top[2] + 0.025])         # 2.5 cm above the cap: 2.5 cm below the expert's point
    waypoints = [side, over]
    phases, rises = [], []

    def drive(c):
        label = follower.act()
        phases.append(follower.phase)
        rises.append(float((c.tcp_jacobian()[:3] @ label)[2]))
        if c.elapsed < 1.0:                     # after the cue, as the expert starts
            return np.zeros(7)
        p, _ = c.tcp()
        if waypoints and np.linalg.norm(waypoints[0] - p) < 0.004:
            waypoints.pop(0)
        if waypoints:
            return driver._ik(waypoints[0], np.zeros(3))
        return driver._ik(np.array([top[0], top[1], p[2]]), np.array([0.0, 0.0, -0.008]))   # press slowly
    _run(cell, 12.0, drive)
    assert not waypoints, "the driver did not reach the button"
    assert cell.stats.target_clicked_at == cell.stats.target_clicked_at, cell.outcome   # it clicked
    # Over the button and low, the follower descends; it never took the driver's path as an approach's end.
    assert "descend" in phases
    first_descend = phases.index("descend")
    assert all(ph == "approach" for ph in phases[first_descend - 5:first_descend])
    assert "release" in phases and rises[phases.index("release")] > 0.0
    # Pressing, before the click, its labels never rise.
    assert max(rises[first_descend:phases.index("release")]) <= 1e-3

    # Off the axis before pressing, the descent is given up for the approach.
    cell.reset(seed)
    follower = Expert(cell)
    follower.phase = "descend"
    p, _ = cell.tcp()
    assert np.linalg.norm(p[:2] - top[:2]) > DESCEND_ABORT_M > APPROACH_DONE_M
    follower.act()
    assert follower.phase == "approach"


def test_every_way_an_episode_fails(cfg, cell):
    assert _drive(cell, _seed_with(cfg, False), _WrongButtonExpert) == "wrong_button"
    assert _drive(cell, _seed_with(cfg, False), _DeafToClickExpert) == "overtravel"
    # An intrusion while the arm is on its way: moving on through it violates the protective stop.
    seed = next(s for s in range(300) if (e := sample_episode(cfg, s)).intrusion is not None
                and e.intrusion.start < 2.0)
    assert _drive(cell, seed, _IgnoresIntruderExpert) == "protective_stop_violation"
    cell.reset(_seed_with(cfg, False))
    _run(cell, cfg.episode.time_limit_s + 1)
    assert (cell.outcome.status, cell.outcome.reason) == ("failure", "timeout")
    assert cell.outcome.t == pytest.approx(cfg.episode.time_limit_s, abs=0.01)
    # Driving a joint into its limit.
    cell.reset(_seed_with(cfg, False))
    _run(cell, 3.0, lambda _: np.array([0, 0, 0, 1.0, 0, 0, 0]))   # joint 4's upper limit is -0.07 rad
    assert cell.outcome.reason == "joint_limit"
    # The intruder's arm where the tool is: contact fails the episode (and is counted).
    cell.reset(_seed_with(cfg, False))
    tip, _ = cell.tcp()
    cell.data.mocap_pos[0] = (tip[0], tip[1] + 0.03, 0.0)
    cell.advance(cell.t + 0.01)
    assert cell.outcome.reason == "intruder_contact" and cell.stats.intruder_contacts >= 1


# ---------------------------------------------------------------- configuration

def test_sim_yaml_is_the_single_source_of_defaults(cfg):
    assert cfg == CellConfig()


@pytest.mark.parametrize("params, key", [
    ({"scene": {"targets": 6, "min_separation": 0.2}}, "scene.targets"),
    ({"camera": {"rate_hz": 0.0}}, "camera.rate_hz"),
    ({"camera": {"width": 0}}, "camera.width"),
    ({"lidar": {"rate_hz": 0.0}}, "lidar.rate_hz"),
    ({"imu": {"rate_hz": 1000.0}}, "imu.rate_hz"),   # faster than the 400 Hz physics
    ({"audio": {"cue_tones_hz": [500.0]}}, "audio.cue_tones_hz"),
    ({"scene": {"after_click_force": 9.0}}, "scene.after_click_force"),
    ({"intruder": {"field_y": 0.4}}, "intruder.field_y"),
    ({"scene": {"colour": "red"}}, "scene"),
])
def test_impossible_scenes_are_refused_naming_the_key(params, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cell_config_from_dict(params)


def test_missing_render_backend_names_the_package(monkeypatch):
    from mm_fusion_ros.sim import gl
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.setattr(gl.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(gl.RenderBackendError, match="apt-get install libosmesa6.*MUJOCO_GL=egl"):
        gl.check_backend()


def test_wilson_interval():
    from mm_fusion_ros.stats import wilson_interval
    lo, hi = wilson_interval(199, 200)
    assert (round(lo, 4), round(hi, 4)) == (0.9722, 0.9991)   # the textbook Wilson bounds for 199/200
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
