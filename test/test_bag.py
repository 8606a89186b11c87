"""rosbag2 I/O without ROS: pinned types, synthetic bags with faults, damaged bags read as far as they go."""

from __future__ import annotations

import dataclasses
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from mm_fusion_ros.bag import messages as M
from mm_fusion_ros.bag.make_bag import Faults, MakeBagError, MakeBagOptions, make_bag
from mm_fusion_ros.bag.reader import BagError, BagReader
from mm_fusion_ros.bag.typestore import (DEFAULT_DISTRO, TypestoreError, audio_flavour_for, make_typestore,
                                         typestore_with)
from mm_fusion_ros.bag.writer import BagWriteError, BagWriter
from mm_fusion_ros.synthetic import SyntheticSensors

DURATION = 2.0
SMALL = dict(camera_width=64, camera_height=48)


def _quiet(_msg: str) -> None:
    pass


def _read_all(path: Path) -> list[tuple[str, int, bytes]]:
    with BagReader(path, log=_quiet) as bag:
        return [(m.topic, m.t_ns, m.data) for m in bag.messages()]


@pytest.fixture(scope="module")
def clean_bag(tmp_path_factory, default_config) -> Path:
    out = tmp_path_factory.mktemp("bags") / "clean"
    make_bag(out, default_config, MakeBagOptions(duration_s=DURATION, seed=3, **SMALL), progress=False, log=_quiet)
    return out


@pytest.fixture(scope="module")
def faulty_bag(tmp_path_factory, default_config):
    out = tmp_path_factory.mktemp("bags") / "faulty"
    faults = Faults.parse("dropout,out_of_order,duplicate,nan,corrupt_image")
    report = make_bag(out, default_config, MakeBagOptions(duration_s=DURATION, seed=3, faults=faults, **SMALL),
                      progress=False, log=_quiet)
    return out, report


def _decoded(path: Path, topic: str) -> list[tuple[int, object]]:
    with BagReader(path, log=_quiet) as bag:
        return [(m.t_ns, bag.decode(m)) for m in bag.messages(topics=[topic])]


def _stamp(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


# ---------------------------------------------------------------- type store

def test_typestore_is_pinned_and_knows_audio_common():
    ts = make_typestore()
    assert DEFAULT_DISTRO == "kilted"
    for name in ("AudioData", "AudioDataStamped", "AudioInfo"):
        assert f"audio_common_msgs/msg/{name}" in ts.fielddefs
    assert "audio_common_msgs/msg/AudioStamped" not in ts.fielddefs  # the other flavour's
    assert [f for f, _ in ts.fielddefs["audio_common_msgs/msg/AudioInfo"][1]] == [
        "channels", "sample_rate", "sample_format", "bitrate", "coding_format"]
    other = make_typestore(DEFAULT_DISTRO, "mgonzs13")
    assert [f for f, _ in other.fielddefs["audio_common_msgs/msg/AudioInfo"][1]] == ["format", "channels", "rate",
                                                                                      "chunk"]
    with pytest.raises(TypestoreError, match="unknown ROS distribution 'rolling-ish'"):
        make_typestore("rolling-ish")


def test_audio_flavour_follows_the_types_in_the_bag():
    assert audio_flavour_for(["sensor_msgs/msg/Image", "audio_common_msgs/msg/AudioDataStamped"]) == "ros_drivers"
    assert audio_flavour_for(["audio_common_msgs/msg/AudioStamped"]) == "mgonzs13"
    assert audio_flavour_for([]) == "ros_drivers"


def test_both_audio_flavours_round_trip_through_cdr():
    pcm = (np.arange(320) - 160).astype(np.int16)
    ts = make_typestore()
    raw = ts.serialize_cdr(M.audio_data_stamped(ts, 12.5, "mic", pcm), "audio_common_msgs/msg/AudioDataStamped")
    back = ts.deserialize_cdr(raw, "audio_common_msgs/msg/AudioDataStamped")
    assert np.array_equal(np.frombuffer(back.audio.data.tobytes(), "<i2"), pcm)
    assert (back.header.stamp.sec, back.header.stamp.nanosec) == (12, 500_000_000)
    ts2 = make_typestore(DEFAULT_DISTRO, "mgonzs13")
    raw = ts2.serialize_cdr(M.audio_stamped(ts2, 1.0, "mic", pcm, 16000), "audio_common_msgs/msg/AudioStamped")
    back = ts2.deserialize_cdr(raw, "audio_common_msgs/msg/AudioStamped")
    assert np.array_equal(back.audio.audio_data.int16_data, pcm)
    assert (back.audio.info.rate, back.audio.info.chunk, back.audio.info.format) == (16000, 320, M.PA_INT16)


def test_definitions_from_a_bag_override_the_defaults():
    from rosbags.typesys import get_types_from_msg

    custom = get_types_from_msg("uint16 data\n", "audio_common_msgs/msg/AudioData")
    ts = typestore_with(DEFAULT_DISTRO, "ros_drivers", custom)
    assert ts.fielddefs["audio_common_msgs/msg/AudioData"][1][0][0] == "data"
    assert ts.fielddefs["audio_common_msgs/msg/AudioData"][1][0][1][1] == ("uint16", 0)


# ---------------------------------------------------------------- make-bag

def test_make_bag_has_all_five_sensors_at_their_rates(clean_bag, default_config):
    inputs = default_config.inputs
    with BagReader(clean_bag, log=_quiet) as bag:
        types = {t: info.msgtype for t, info in bag.topics.items()}
        counts = {t: info.count for t, info in bag.topics.items()}
        assert bag.problems == [] and bag.unknown_types == {}
    assert types == {inputs.camera.topic: "sensor_msgs/msg/Image",
                     inputs.audio.topic: "audio_common_msgs/msg/AudioDataStamped",
                     inputs.audio.info_topic: "audio_common_msgs/msg/AudioInfo",
                     inputs.lidar.topic: "sensor_msgs/msg/LaserScan",
                     inputs.imu.topic: "sensor_msgs/msg/Imu",
                     inputs.joint_state.topic: "sensor_msgs/msg/JointState"}
    assert counts[inputs.camera.topic] == 60
    assert counts[inputs.audio.topic] == 100
    assert counts[inputs.lidar.topic] == 20
    assert counts[inputs.imu.topic] == 400
    assert counts[inputs.joint_state.topic] == 200


def test_make_bag_messages_look_recorded(clean_bag, default_config):
    inputs = default_config.inputs
    for topic in (inputs.camera.topic, inputs.audio.topic, inputs.lidar.topic, inputs.imu.topic,
                  inputs.joint_state.topic):
        msgs = _decoded(clean_bag, topic)
        stamps = np.array([_stamp(m) for _, m in msgs])
        received = np.array([t for t, _ in msgs]) / 1e9
        assert np.all(received > stamps), topic            # received after capture
        assert np.all(np.diff(stamps) > 0), topic          # no faults asked for: in order
    frame = _decoded(clean_bag, inputs.camera.topic)[0][1]
    assert (frame.width, frame.height, frame.encoding, frame.step) == (64, 48, "rgb8", 64 * 3)
    assert len(frame.data) == 48 * 64 * 3
    chunk = _decoded(clean_bag, inputs.audio.topic)
    assert len(chunk[0][1].audio.data) == 320 * 2               # 20 ms of S16LE at 16 kHz
    gaps = np.diff([_stamp(m) for _, m in chunk])
    assert np.allclose(gaps, 0.02, atol=1e-6)                  # a sample clock: no jitter
    info = _decoded(clean_bag, inputs.audio.info_topic)[0][1]
    assert (info.sample_rate, info.channels, info.sample_format) == (16000, 1, "S16LE")
    scan = _decoded(clean_bag, inputs.lidar.topic)[0][1]
    assert len(scan.ranges) == 360 and scan.scan_time == pytest.approx(0.1)
    imu = _decoded(clean_bag, inputs.imu.topic)[0][1]
    assert imu.linear_acceleration.z == pytest.approx(9.81, abs=0.5)
    # As joint_state_broadcaster publishes: every configured joint by name, positions and velocities.
    names = default_config.model.action.names
    for _, joints in _decoded(clean_bag, inputs.joint_state.topic)[:5]:
        assert list(joints.name) == list(names) and joints.header.frame_id == ""
        assert len(joints.position) == len(joints.velocity) == len(names)
        q, qd = SyntheticSensors(default_config.model, seed=3).joint_state(_stamp(joints))
        np.testing.assert_allclose(joints.position, q, atol=1e-5)   # stamps near 1.7e9 s: ~0.2 us
        np.testing.assert_allclose(joints.velocity, qd, atol=1e-5)


def test_make_bag_is_deterministic_for_a_seed(clean_bag, default_config, tmp_path):
    again = tmp_path / "again"
    make_bag(again, default_config, MakeBagOptions(duration_s=DURATION, seed=3, **SMALL), progress=False, log=_quiet)
    assert _read_all(again) == _read_all(clean_bag)
    other = tmp_path / "other"
    make_bag(other, default_config, MakeBagOptions(duration_s=DURATION, seed=4, **SMALL), progress=False, log=_quiet)
    assert _read_all(other) != _read_all(clean_bag)


def test_make_bag_faults_leave_their_marks(faulty_bag, default_config):
    path, report = faulty_bag
    inputs = default_config.inputs
    assert set(report.faults) == {"dropout", "out_of_order", "duplicate", "nan", "corrupt_image"}
    camera = _decoded(path, inputs.camera.topic)
    stamps = sorted(_stamp(m) for _, m in camera)
    assert max(np.diff(stamps)) > 0.3                             # the camera dropped out
    corrupt = [m for _, m in camera if len(m.data) != m.height * m.step]
    assert len(corrupt) == 1
    imu = _decoded(path, inputs.imu.topic)
    imu_stamps = [_stamp(m) for _, m in imu]
    assert any(b < a for a, b in zip(imu_stamps, imu_stamps[1:]))   # out of order on arrival
    assert any(math_isnan(m.linear_acceleration.x) for _, m in imu)
    with BagReader(path, log=_quiet) as bag:
        raw = [m.data for m in bag.messages(topics=[inputs.imu.topic])]
    assert len(raw) > len(set(raw))                                  # duplicates: the same bytes twice
    scans = _decoded(path, inputs.lidar.topic)
    assert any(np.isnan(m.ranges).any() for _, m in scans)


def math_isnan(x: float) -> bool:
    return x != x


def test_make_bag_refuses_unknown_faults_and_bad_sizes():
    with pytest.raises(MakeBagError, match="unknown fault 'nans'"):
        Faults.parse("nan,nans")
    with pytest.raises(MakeBagError, match="dropout sensor 'radar'"):
        Faults.parse("dropout:radar")
    assert Faults.parse("dropout:imu").dropout_sensor == "imu"
    with pytest.raises(MakeBagError, match="duration"):
        MakeBagOptions(duration_s=0).validate()


def test_make_bag_sqlite3_and_compressed_camera(default_config, tmp_path):
    cfg = dataclasses.replace(default_config, inputs=dataclasses.replace(
        default_config.inputs, camera=dataclasses.replace(default_config.inputs.camera, type="compressed_image")))
    out = tmp_path / "sq"
    make_bag(out, cfg, MakeBagOptions(duration_s=1.0, storage="sqlite3", **SMALL), progress=False, log=_quiet)
    assert any(p.suffix == ".db3" for p in out.iterdir())
    frames = _decoded(out, cfg.inputs.camera.topic)
    assert len(frames) == 30 and frames[0][1].format == "jpeg"
    assert bytes(frames[0][1].data[:2]) == b"\xff\xd8"               # a JPEG stream


def test_make_bag_audio_stamped_flavour(default_config, tmp_path):
    cfg = dataclasses.replace(default_config, inputs=dataclasses.replace(
        default_config.inputs, audio=dataclasses.replace(default_config.inputs.audio, type="audio_stamped")))
    out = tmp_path / "mg"
    make_bag(out, cfg, MakeBagOptions(duration_s=0.5, **SMALL), progress=False, log=_quiet)
    with BagReader(out, log=_quiet) as bag:
        assert bag.audio_flavour == "mgonzs13"
        assert cfg.inputs.audio.info_topic not in bag.topics
        msg = bag.decode(next(bag.messages(topics=[cfg.inputs.audio.topic])))
    assert len(msg.audio.audio_data.int16_data) == 320 and msg.audio.info.rate == 16000


# ---------------------------------------------------------------- writer

def test_writer_leaves_nothing_under_the_final_name_on_failure(tmp_path):
    ts = make_typestore()
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with BagWriter(out, ts) as bag:
            bag.add_topic("/a", "std_msgs/msg/Float64MultiArray")
            bag.write("/a", 1, M.float64_array(ts, [1.0]))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with BagWriter(out, ts) as bag:
        bag.add_topic("/a", "std_msgs/msg/Float64MultiArray")
        bag.write("/a", 1, M.float64_array(ts, [1.0]))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(BagWriteError, match="exists already"):
        BagWriter(out, ts)
    with BagWriter(out, ts, overwrite=True) as bag:
        with pytest.raises(BagWriteError, match="not in the type store"):
            bag.add_topic("/b", "nope_msgs/msg/Nope")
        with pytest.raises(BagWriteError, match="was not added"):
            bag.write_raw("/b", 1, b"")


# ---------------------------------------------------------------- damaged and wrong input

def test_reader_refuses_what_is_not_a_bag(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(BagError, match="notes.txt: not a rosbag2 bag"):
        BagReader(text, log=_quiet)
    with pytest.raises(BagError, match="does not exist"):
        BagReader(tmp_path / "missing", log=_quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BagError, match="empty: not a rosbag2 bag"):
        BagReader(tmp_path / "empty", log=_quiet)
    fake = tmp_path / "fake.mcap"
    fake.write_bytes(b"not mcap at all" * 10)
    with pytest.raises(BagError, match="fake.mcap is not an MCAP file"):
        BagReader(fake, log=_quiet)


def _mcap(path: Path) -> Path:
    return next(path.glob("*.mcap"))


def test_truncated_mcap_is_read_up_to_the_cut(clean_bag, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(clean_bag, cut)
    f = _mcap(cut)
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * 0.7)])
    full = _read_all(clean_bag)
    logged: list[str] = []
    with BagReader(cut, log=logged.append) as bag:
        got = [(m.topic, m.t_ns, m.data) for m in bag.messages()]
    assert any("truncated" in p for p in logged)
    assert 0 < len(got) < len(full)
    assert got == full[: len(got)]                  # what survived is exact and in order


def _chunk_offsets(data: bytes) -> list[int]:
    pos, out = 8, []
    while pos < len(data):
        op = data[pos]
        (length,) = struct.unpack_from("<Q", data, pos + 1)
        if op == 0x06:
            out.append(pos)
        if op in (0x02, 0x0F):
            break
        pos += 9 + length
    return out


def test_damaged_chunk_is_skipped_and_reading_goes_on(tmp_path, default_config):
    # Big enough frames for several 1 MiB chunks.
    src = tmp_path / "big"
    make_bag(src, default_config, MakeBagOptions(duration_s=1.0, camera_width=320, camera_height=240),
             progress=False, log=_quiet)
    full = _read_all(src)
    f = _mcap(src)
    data = bytearray(f.read_bytes())
    chunks = _chunk_offsets(bytes(data))
    assert len(chunks) >= 3
    inner = chunks[1] + 9 + 40                         # first record inside the second chunk
    for _ in range(3):
        inner += 9 + struct.unpack_from("<Q", data, inner + 1)[0]
    data[inner + 1: inner + 9] = b"\xff" * 8            # a record length pointing past the chunk
    f.write_bytes(bytes(data))
    logged: list[str] = []
    with BagReader(src, log=logged.append) as bag:
        got = [(m.topic, m.t_ns, m.data) for m in bag.messages()]
    assert any("damaged" in p for p in logged)
    assert 0.5 * len(full) < len(got) < len(full)
    assert set(got) <= set(full)                        # nothing invented, nothing garbled
    assert [t for _, t, _ in got] == sorted(t for _, t, _ in got)


def test_folder_without_metadata_and_unknown_types(clean_bag, tmp_path):
    interrupted = tmp_path / "interrupted"
    shutil.copytree(clean_bag, interrupted)
    (interrupted / "metadata.yaml").unlink()
    logged: list[str] = []
    with BagReader(interrupted, log=logged.append) as bag:
        assert len(list(bag.messages())) == len(_read_all(clean_bag))
    assert any("no metadata.yaml" in p for p in logged)

    ts = make_typestore()
    from rosbags.typesys import get_types_from_msg
    odd = typestore_with(DEFAULT_DISTRO, "ros_drivers",
                         get_types_from_msg("float64 smell\n", "weird_msgs/msg/Nose"))
    mixed = tmp_path / "mixed.db3dir"
    with BagWriter(mixed, odd, storage="sqlite3") as bag:
        bag.add_topic("/nose", "weird_msgs/msg/Nose")
        bag.add_topic("/imu/data", "sensor_msgs/msg/Imu")
        bag.write("/nose", 1, odd.types["weird_msgs/msg/Nose"](smell=1.0))
        bag.write("/imu/data", 2, M.imu(ts, 0.0, "imu", [0, 0, 9.8], [0, 0, 0]))
    # A sqlite3 bag written by rosbags carries its definitions, so the odd type is known from the bag...
    with BagReader(mixed, log=_quiet) as bag:
        assert bag.unknown_types == {}
    # ...and a bag that does not (the definitions stripped) names the topic and skips it.
    import sqlite3
    db = next(mixed.glob("*.db3"))
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM message_definitions")
    logged.clear()
    with BagReader(mixed, log=logged.append) as bag:
        assert bag.unknown_types == {"/nose": "weird_msgs/msg/Nose"}
        assert [m.topic for m in bag.messages()] == ["/imu/data"]
    assert any("/nose" in p and "weird_msgs/msg/Nose" in p for p in logged)
