"""Message conversion (mm_fusion_ros.ros.convert) and the array helpers behind it (mm_fusion_ros.sensors).

rclpy messages come from the Kilted wheels; rosbags messages from its Kilted
type store, plus audio_common_msgs definitions registered here (no wheel ships
them), so every reader is exercised on both kinds of message object.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from scipy.signal import resample_poly

from mm_fusion_ros.config import LidarConfig
from mm_fusion_ros.ros import convert
from mm_fusion_ros.ros.convert import AudioFormat
from mm_fusion_ros.samples import BadSample, CameraSample
from mm_fusion_ros import sensors

pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install '.[ros]')")
from sensor_msgs.msg import CompressedImage, Image, Imu, JointState, LaserScan, PointCloud2, PointField  # noqa: E402

rosbags_typesys = pytest.importorskip("rosbags.typesys")

STAMP = (1700000000, 250_000_000)
STAMP_S = 1700000000.25
LIDAR = LidarConfig(beams=8, range_min=0.1, range_max=20.0)


# ---------------------------------------------------------------- rosbags message objects

AUDIO_COMMON_DEFS = {
    # ros-drivers/audio_common
    "audio_common_msgs/msg/AudioData": "uint8[] data",
    "audio_common_msgs/msg/AudioDataStamped": "std_msgs/Header header\naudio_common_msgs/AudioData audio",
    "audio_common_msgs/msg/AudioInfo":
        "uint8 channels\nuint32 sample_rate\nstring sample_format\nuint32 bitrate\nstring coding_format",
}
# mgonzs13/audio_common (same package name, so in a type store of its own)
MGONZS13_DEFS = {
    "audio_common_msgs/msg/AudioData":
        "float32[] float32_data\nint32[] int32_data\nint16[] int16_data\nint8[] int8_data\nuint8[] uint8_data",
    "audio_common_msgs/msg/AudioInfo": "int32 format\nint32 channels\nint32 rate\nint32 chunk",
    "audio_common_msgs/msg/Audio": "audio_common_msgs/AudioData audio_data\naudio_common_msgs/AudioInfo info",
    "audio_common_msgs/msg/AudioStamped": "std_msgs/Header header\naudio_common_msgs/Audio audio",
}


def _store(defs: dict[str, str] | None = None):
    store = rosbags_typesys.get_typestore(rosbags_typesys.Stores.ROS2_KILTED)
    for name, text in (defs or {}).items():
        store.register(rosbags_typesys.get_types_from_msg(text, name))
    return store


@pytest.fixture(scope="module")
def rb():
    """The rosbags Kilted type store with ros-drivers' audio_common_msgs."""
    return _store(AUDIO_COMMON_DEFS)


@pytest.fixture(scope="module")
def rb_mgonzs13():
    return _store(MGONZS13_DEFS)


def rb_header(store, stamp=STAMP):
    t = store.types["builtin_interfaces/msg/Time"](sec=stamp[0], nanosec=stamp[1])
    return store.types["std_msgs/msg/Header"](stamp=t, frame_id="sensor")


def rclpy_image(pixels: np.ndarray, encoding: str, pad: int = 0, stamp=STAMP) -> Image:
    h, w = pixels.shape[:2]
    rows = pixels.reshape(h, -1)
    rows = np.concatenate([rows, np.full((h, pad), 7, np.uint8)], axis=1)
    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    msg.height, msg.width, msg.encoding, msg.step = h, w, encoding, rows.shape[1]
    msg.data = rows.tobytes()
    return msg


def quadrants(h: int = 8, w: int = 8) -> np.ndarray:
    """An RGB image with four flat quadrants: easy to check after any area resize."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2:] = (0, 255, 0)
    img[h // 2:, : w // 2] = (0, 0, 255)
    img[h // 2:, w // 2:] = (90, 90, 90)
    return img


# ---------------------------------------------------------------- time

def test_stamp_round_trip_and_nanosecond_carry():
    assert convert.s_to_stamp_fields(STAMP_S) == STAMP
    assert convert.s_to_stamp_fields(3.9999999999) == (4, 0)     # rounds up into the next second
    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = convert.s_to_stamp_fields(12.000000125)
    assert convert.stamp_to_s(msg.header.stamp) == pytest.approx(12.000000125, abs=1e-9)
    with pytest.raises(ValueError, match="non-negative"):
        convert.s_to_stamp_fields(-1.0)


# ---------------------------------------------------------------- camera

@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "mono8"])
def test_raw_encodings_with_row_padding_decode_to_rgb(encoding):
    rgb = quadrants()
    if encoding == "rgb8":
        pixels = rgb
    elif encoding == "bgr8":
        pixels = rgb[..., ::-1]
    else:
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    sample = convert.camera_from_image(rclpy_image(np.ascontiguousarray(pixels), encoding, pad=5))
    assert (sample.stamp, sample.encoding, sample.width, sample.height) == (STAMP_S, encoding, 8, 8)
    assert sample.step == 8 * (1 if encoding == "mono8" else 3) + 5
    out = sensors.decode_camera(sample, 8, 8)
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    expected = rgb if encoding != "mono8" else np.repeat(pixels[..., None], 3, axis=2)
    np.testing.assert_array_equal(out, expected)   # padding bytes (7) never leak into the picture


def test_resize_is_an_area_average():
    rgb = quadrants(48, 64)
    out = sensors.decode_camera(convert.camera_from_image(rclpy_image(rgb, "rgb8")), 4, 4)
    np.testing.assert_array_equal(out, quadrants(4, 4))
    # A fractional factor (64 -> 5 columns) mixes the middle column half and half.
    mixed = sensors.decode_camera(convert.camera_from_image(rclpy_image(rgb, "rgb8")), 4, 5)
    np.testing.assert_allclose(mixed[0, 2].astype(float), [127.5, 127.5, 0], atol=1.0)
    np.testing.assert_array_equal(mixed[0, 0], (255, 0, 0))


@pytest.mark.parametrize("fmt", ["jpeg", "png", "bgr8; jpeg compressed bgr8", "rgb8; png compressed bgr8"])
def test_compressed_frames_decode_to_rgb(fmt):
    rgb = quadrants(64, 64)
    ext = ".png" if "png" in fmt else ".jpg"
    ok, encoded = cv2.imencode(ext, rgb[..., ::-1].copy())
    assert ok
    msg = CompressedImage()
    msg.header.stamp.sec, msg.header.stamp.nanosec = STAMP
    msg.format, msg.data = fmt, encoded.tobytes()
    sample = convert.camera_from_compressed(msg)
    assert sample.encoding == ("png" if "png" in fmt else "jpeg")
    out = sensors.decode_camera(sample, 16, 16)
    if sample.encoding == "png":
        np.testing.assert_array_equal(out, quadrants(16, 16))
    else:
        assert np.abs(out.astype(int) - quadrants(16, 16)).mean() < 6


def test_large_jpeg_is_decoded_at_reduced_scale_with_the_same_picture():
    yy, xx = np.mgrid[0:480, 0:640]
    rgb = np.stack([xx * 255 // 640, yy * 255 // 480, (xx + yy) % 256 // 2], -1).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", rgb[..., ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert sensors.jpeg_size(encoded) == (480, 640)
    assert sensors._jpeg_reduction((480, 640), 96, 96) == cv2.IMREAD_REDUCED_COLOR_4
    sample = CameraSample(stamp=1.0, encoding="jpeg", width=0, height=0, step=0, data=encoded.ravel())
    out = sensors.decode_camera(sample, 96, 96)
    reference = cv2.resize(rgb, (96, 96), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - reference).mean() < 3


def test_corrupt_compressed_frame_is_a_decode_failure():
    ok, encoded = cv2.imencode(".jpg", quadrants(32, 32))
    broken = encoded.ravel().copy()
    broken[2:] = 0   # keeps the JPEG magic, destroys everything after it
    with pytest.raises(BadSample) as err:
        sensors.decode_camera(CameraSample(1.0, "jpeg", 0, 0, 0, broken), 8, 8)
    assert err.value.cause == "camera.decode_failed"


def test_rosbags_image_gives_the_same_sample(rb):
    rgb = quadrants()
    msg = rb.types["sensor_msgs/msg/Image"](header=rb_header(rb), height=8, width=8, encoding="bgr8",
                                            is_bigendian=0, step=24, data=rgb[..., ::-1].ravel().copy())
    sample = convert.camera_from_image(msg)
    assert sample.stamp == STAMP_S
    np.testing.assert_array_equal(sensors.decode_camera(sample, 8, 8), rgb)


@pytest.mark.parametrize("change, cause", [
    (dict(encoding="rgba8"), "camera.bad_encoding"),
    (dict(encoding="16UC1"), "camera.bad_encoding"),
    (dict(step=20), "camera.bad_size"),                     # < width * 3
    (dict(height=9), "camera.bad_size"),                    # data shorter than height * step
    (dict(data=bytes(8 * 24 + 1)), "camera.bad_size"),      # data longer than height * step
    (dict(width=0), "camera.bad_size"),
    (dict(stamp=(0, 0)), "camera.zero_stamp"),
])
def test_bad_images_are_refused_with_their_cause(change, cause):
    msg = rclpy_image(quadrants(), "rgb8")
    for key, value in change.items():
        if key == "stamp":
            msg.header.stamp.sec, msg.header.stamp.nanosec = value
        else:
            setattr(msg, key, value)
    with pytest.raises(BadSample) as err:
        convert.camera_from_image(msg)
    assert err.value.cause == cause


@pytest.mark.parametrize("fmt, data, cause", [
    ("tiff", b"II*\x00abc", "camera.bad_format"),
    ("16UC1; compressedDepth png", b"\x89PNGabc", "camera.bad_format"),
    ("jpeg", b"", "camera.empty"),
])
def test_bad_compressed_images_are_refused(fmt, data, cause):
    msg = CompressedImage()
    msg.header.stamp.sec = 5
    msg.format, msg.data = fmt, data
    with pytest.raises(BadSample) as err:
        convert.camera_from_compressed(msg)
    assert err.value.cause == cause


def test_compressed_format_left_empty_is_sniffed():
    ok, encoded = cv2.imencode(".png", quadrants())
    msg = CompressedImage()
    msg.header.stamp.sec = 5
    msg.data = encoded.tobytes()
    assert convert.camera_from_compressed(msg).encoding == "png"


# ---------------------------------------------------------------- audio

def test_audio_data_stamped_s16le_stereo_is_downmixed(rb):
    left = np.array([16384, -16384, 32767, 0], np.int16)
    right = np.array([16384, 16384, -32768, 8192], np.int16)
    interleaved = np.stack([left, right], axis=1).ravel().astype("<i2")
    msg = rb.types["audio_common_msgs/msg/AudioDataStamped"](
        header=rb_header(rb), audio=rb.types["audio_common_msgs/msg/AudioData"](
            data=np.frombuffer(interleaved.tobytes(), np.uint8).copy()))
    info = rb.types["audio_common_msgs/msg/AudioInfo"](channels=2, sample_rate=48000, sample_format="S16LE",
                                                       bitrate=0, coding_format="wave")
    fmt = convert.audio_format_from_info(info)
    assert fmt == AudioFormat(48000, 2, "S16LE")
    sample = convert.audio_from_audio_data_stamped(msg, fmt, AudioFormat(16000, 1, "F32LE"))
    assert sample.stamp == STAMP_S and sample.sample_rate == 48000 and sample.samples.dtype == np.float32
    expected = (left.astype(np.float64) + right) / 2 / 32768
    np.testing.assert_allclose(sample.samples, expected, atol=1e-7)


def test_audio_data_stamped_uses_the_fallback_until_info_arrives(rb):
    pcm = np.array([0.25, -0.5, 1.0], "<f4")
    msg = rb.types["audio_common_msgs/msg/AudioDataStamped"](
        header=rb_header(rb), audio=rb.types["audio_common_msgs/msg/AudioData"](
            data=np.frombuffer(pcm.tobytes(), np.uint8).copy()))
    sample = convert.audio_from_audio_data_stamped(msg, None, AudioFormat(22050, 1, "F32LE"))
    assert sample.sample_rate == 22050
    np.testing.assert_array_equal(sample.samples, pcm)


def test_packed_24_bit_pcm():
    values = np.array([1 << 22, -(1 << 22), (1 << 23) - 1])
    raw = np.stack([(values >> s) & 0xFF for s in (0, 8, 16)], axis=1).astype(np.uint8).ravel()
    pcm, scale = convert._pcm_from_bytes(raw, AudioFormat(16000, 1, "S24LE"))
    np.testing.assert_allclose(sensors.pcm_to_mono(pcm, 1, scale), [0.5, -0.5, 1.0], atol=1e-6)


@pytest.mark.parametrize("fmt, raw, cause", [
    (AudioFormat(16000, 1, "MP3"), bytes(4), "audio.unknown_format"),
    (AudioFormat(16000, 1, "S16LE"), bytes(3), "audio.bad_size"),
    (AudioFormat(16000, 2, "S16LE"), bytes(6), "audio.bad_size"),           # 3 samples, 2 channels
    (AudioFormat(16000, 1, "S16LE"), b"", "audio.empty"),
    (AudioFormat(16000, 1, "S16LE"), bytes(2 * 16001), "audio.oversize"),   # > 1 s window
    (AudioFormat(0, 1, "S16LE"), bytes(4), "audio.bad_info"),
    (AudioFormat(16000, 1, "F32LE"), np.array([0.0, np.nan], "<f4").tobytes(), "audio.non_finite"),
])
def test_bad_audio_chunks_are_refused(rb, fmt, raw, cause):
    msg = rb.types["audio_common_msgs/msg/AudioDataStamped"](
        header=rb_header(rb), audio=rb.types["audio_common_msgs/msg/AudioData"](data=np.frombuffer(raw, np.uint8)))
    with pytest.raises(BadSample) as err:
        convert.audio_from_audio_data_stamped(msg, fmt, fmt, max_s=1.0)
    assert err.value.cause == cause


def test_compressed_audio_info_is_refused(rb):
    info = rb.types["audio_common_msgs/msg/AudioInfo"](channels=1, sample_rate=16000, sample_format="S16LE",
                                                       bitrate=32000, coding_format="mp3")
    with pytest.raises(BadSample, match="audio.unknown_format"):
        convert.audio_format_from_info(info)


def _audio_stamped(store, code: int, channels: int, rate: int, **arrays):
    types = store.types
    empty = {"float32_data": np.zeros(0, np.float32), "int32_data": np.zeros(0, np.int32),
             "int16_data": np.zeros(0, np.int16), "int8_data": np.zeros(0, np.int8),
             "uint8_data": np.zeros(0, np.uint8)}
    empty.update(arrays)
    audio = types["audio_common_msgs/msg/Audio"](
        audio_data=types["audio_common_msgs/msg/AudioData"](**empty),
        info=types["audio_common_msgs/msg/AudioInfo"](format=code, channels=channels, rate=rate, chunk=4))
    return types["audio_common_msgs/msg/AudioStamped"](header=rb_header(store), audio=audio)


@pytest.mark.parametrize("code, field, values, expected", [
    (8, "int16_data", np.array([16384, -32768], np.int16), [0.5, -1.0]),         # paInt16
    (1, "float32_data", np.array([0.25, -0.75], np.float32), [0.25, -0.75]),     # paFloat32
    (2, "int32_data", np.array([1 << 30, -(1 << 31)], np.int32), [0.5, -1.0]),   # paInt32
    (16, "int8_data", np.array([64, -128], np.int8), [0.5, -1.0]),               # paInt8
    (32, "uint8_data", np.array([192, 0], np.uint8), [0.5, -1.0]),               # paUInt8, offset binary
])
def test_audio_stamped_reads_the_array_its_portaudio_format_names(rb_mgonzs13, code, field, values, expected):
    msg = _audio_stamped(rb_mgonzs13, code, 1, 44100, **{field: values})
    sample = convert.audio_from_audio_stamped(msg)
    assert sample.sample_rate == 44100 and sample.stamp == STAMP_S
    np.testing.assert_allclose(sample.samples, expected, atol=1e-7)


def test_audio_stamped_stereo_and_unknown_format(rb_mgonzs13):
    msg = _audio_stamped(rb_mgonzs13, 8, 2, 16000, int16_data=np.array([16384, 0, 0, -16384], np.int16))
    np.testing.assert_allclose(convert.audio_from_audio_stamped(msg).samples, [0.25, -0.25])
    with pytest.raises(BadSample, match="audio.unknown_format"):
        convert.audio_from_audio_stamped(_audio_stamped(rb_mgonzs13, 4, 1, 16000))   # paInt24: no array for it


@pytest.mark.parametrize("encoding, bigendian, dtype, scale", [
    ("16SC1", 0, "<i2", 32768.0), ("16SC1", 1, ">i2", 32768.0), ("32FC1", 0, "<f4", 1.0), ("32FC2", 0, "<f4", 1.0),
])
def test_image_pcm_fallback(encoding, bigendian, dtype, scale):
    channels = int(encoding[-1])
    values = np.array([0.5, -0.25, 0.125, -1.0, 0.0, 0.75])
    pcm = (values * scale if scale > 1 else values).astype(dtype)
    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = STAMP
    msg.height, msg.width, msg.encoding, msg.is_bigendian = 1, values.size // channels, encoding, bigendian
    msg.step, msg.data = pcm.nbytes, pcm.tobytes()
    sample = convert.audio_from_image_pcm(msg, 16000)
    expected = values.reshape(-1, channels).mean(axis=1)
    np.testing.assert_allclose(sample.samples, expected, atol=1e-6)
    assert sample.sample_rate == 16000 and sample.stamp == STAMP_S


@pytest.mark.parametrize("change, cause", [
    (dict(encoding="mono8"), "audio.unknown_format"),
    (dict(encoding="16UC1"), "audio.unknown_format"),
    (dict(height=2), "audio.bad_size"),
    (dict(step=6), "audio.bad_size"),
])
def test_image_pcm_refusals(change, cause):
    msg = Image()
    msg.header.stamp.sec = 3
    msg.height, msg.width, msg.encoding, msg.step = 1, 4, "16SC1", 8
    msg.data = bytes(8)
    for key, value in change.items():
        setattr(msg, key, value)
    with pytest.raises(BadSample) as err:
        convert.audio_from_image_pcm(msg, 16000)
    assert err.value.cause == cause


# ---------------------------------------------------------------- audio and IMU helpers

def test_resampling_48k_to_16k_keeps_a_440_hz_tone():
    t = np.arange(48000) / 48000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    out = sensors.resample_audio(tone, 48000, 16000)
    assert out.dtype == np.float32 and out.size == 16000
    spectrum = np.abs(np.fft.rfft(out * np.hanning(out.size)))
    assert np.argmax(spectrum) * 16000 / out.size == pytest.approx(440, abs=1.0)
    assert np.abs(out[100:-100]).max() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("src, dst, chunk", [(48000, 16000, 960), (44100, 16000, 1024), (8000, 16000, 160)])
def test_chunked_resampling_has_no_boundary_clicks(src, dst, chunk):
    rng = np.random.default_rng(0)
    n = chunk * 20
    signal = np.sin(2 * np.pi * 440 * np.arange(n) / src) * 0.5 + 0.05 * rng.standard_normal(n)
    whole = resample_poly(signal, *sensors._ratio(src, dst), window=sensors._lowpass(*sensors._ratio(src, dst)))
    stream = sensors.StreamResampler(src, dst)
    out = np.zeros(whole.size + 64)
    for k in range(20):
        values, first, start = stream.process(signal[k * chunk:(k + 1) * chunk], continues=k > 0)
        assert start == pytest.approx(k * chunk * dst / src) and first <= start
        out[first:first + values.size] = values
    # Every chunk but the last (whose end still lacks its right-hand neighbours) matches the whole
    # signal resampled in one go; resampling chunk by chunk would be off by ~0.1 at each boundary.
    interior = int(19 * chunk * dst / src) - 40
    assert np.abs(out[:interior] - whole[:interior]).max() < 1e-4


def test_interpolation_is_exact_on_a_linear_signal_and_holds_edges():
    rng = np.random.default_rng(1)
    stamps = np.sort(rng.uniform(0.0, 1.0, 50))
    rows = np.stack([2.0 * stamps + 1.0, -3.0 * stamps], axis=1)
    grid = np.linspace(stamps[0], stamps[-1], 33)
    out = sensors.interpolate_rows(stamps, rows, grid)
    np.testing.assert_allclose(out, np.stack([2.0 * grid + 1.0, -3.0 * grid], axis=1), atol=1e-5)
    outside = sensors.interpolate_rows(stamps, rows, np.array([stamps[0] - 5.0, stamps[-1] + 5.0]))
    np.testing.assert_allclose(outside, rows[[0, -1]], atol=1e-6)


# ---------------------------------------------------------------- IMU

def _rclpy_imu(accel=(0.1, -0.2, 9.81), gyro=(0.01, 0.02, -0.03), stamp=STAMP) -> Imu:
    msg = Imu()
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    msg.linear_acceleration.x, msg.linear_acceleration.y, msg.linear_acceleration.z = accel
    msg.angular_velocity.x, msg.angular_velocity.y, msg.angular_velocity.z = gyro
    return msg


def test_imu_from_rclpy_and_rosbags_agree(rb):
    ours = convert.imu_from_msg(_rclpy_imu())
    vec = rb.types["geometry_msgs/msg/Vector3"]
    theirs = convert.imu_from_msg(rb.types["sensor_msgs/msg/Imu"](
        header=rb_header(rb), orientation=rb.types["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0),
        orientation_covariance=np.full(9, -1.0), angular_velocity=vec(x=0.01, y=0.02, z=-0.03),
        angular_velocity_covariance=np.zeros(9), linear_acceleration=vec(x=0.1, y=-0.2, z=9.81),
        linear_acceleration_covariance=np.zeros(9)))
    assert ours.stamp == theirs.stamp == STAMP_S
    np.testing.assert_array_equal(ours.accel, [0.1, -0.2, 9.81])
    np.testing.assert_array_equal(ours.gyro, [0.01, 0.02, -0.03])
    np.testing.assert_array_equal(ours.accel, theirs.accel)
    np.testing.assert_array_equal(ours.gyro, theirs.gyro)


def test_bad_imu_messages():
    for msg, cause in [(_rclpy_imu(accel=(0.0, math.nan, 9.8)), "imu.non_finite"),
                       (_rclpy_imu(gyro=(math.inf, 0.0, 0.0)), "imu.non_finite"),
                       (_rclpy_imu(stamp=(0, 0)), "imu.zero_stamp")]:
        with pytest.raises(BadSample) as err:
            convert.imu_from_msg(msg)
        assert err.value.cause == cause
    msg = _rclpy_imu()
    msg.linear_acceleration_covariance[0] = -1.0
    with pytest.raises(BadSample, match="imu.missing_accel"):
        convert.imu_from_msg(msg)


# ---------------------------------------------------------------- joint states

ARM = tuple(f"joint_{i}" for i in range(1, 8))   # model.action.names in robot.yaml
# A driver's message: the arm's joints out of order, with the gripper's two fingers among them.
DRIVER_NAMES = ["finger_left", "joint_3", "joint_1", "joint_2", "finger_right", "joint_7", "joint_4", "joint_6",
                "joint_5"]


def _driver_values(names, scale: float) -> list[float]:
    """joint_k -> scale * k, a finger -> 100 + scale: every value says which joint it belongs to."""
    return [scale * int(n.split("_")[1]) if n.startswith("joint_") else 100.0 + scale for n in names]


def rclpy_joints(names=DRIVER_NAMES, position=None, velocity=None, stamp=STAMP) -> JointState:
    msg = JointState()
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    msg.name = list(names)
    msg.position = _driver_values(names, 0.1) if position is None else list(position)
    msg.velocity = _driver_values(names, -0.01) if velocity is None else list(velocity)
    msg.effort = [0.0] * len(names)
    return msg


def rb_joints(store, names=DRIVER_NAMES, position=None, velocity=None, stamp=STAMP):
    return store.types["sensor_msgs/msg/JointState"](
        header=rb_header(store, stamp), name=list(names),
        position=np.asarray(_driver_values(names, 0.1) if position is None else position, np.float64),
        velocity=np.asarray(_driver_values(names, -0.01) if velocity is None else velocity, np.float64),
        effort=np.zeros(len(names)))


def test_joint_states_are_matched_by_name_from_rclpy_and_rosbags(rb):
    """The configured order, whatever the driver's; extra joints (a gripper's fingers) ignored; effort unused."""
    for msg in (rclpy_joints(), rb_joints(rb)):
        sample = convert.joint_state_from_msg(msg, ARM)
        assert sample.stamp == STAMP_S
        assert sample.position.shape == sample.velocity.shape == (7,)
        np.testing.assert_allclose(sample.position, 0.1 * np.arange(1, 8), rtol=0, atol=1e-12)
        np.testing.assert_allclose(sample.velocity, -0.01 * np.arange(1, 8), rtol=0, atol=1e-12)
    # Already in order, nothing extra: the same.
    exact = convert.joint_state_from_msg(rclpy_joints(names=ARM), ARM)
    np.testing.assert_array_equal(exact.position, convert.joint_state_from_msg(rb_joints(rb), ARM).position)
    # The sample owns its arrays: the message's buffer may be reused by the middleware.
    msg = rclpy_joints(names=ARM)
    sample = convert.joint_state_from_msg(msg, ARM)
    msg.position[0] = 42.0
    assert sample.position[0] == pytest.approx(0.1)


@pytest.mark.parametrize("change, cause", [
    (dict(names=[n for n in DRIVER_NAMES if n != "joint_5"]), "joint_state.missing_joint"),
    (dict(names=["panda_joint1", "panda_joint2"]), "joint_state.missing_joint"),
    (dict(velocity=[]), "joint_state.no_velocity"),
    (dict(position=[]), "joint_state.bad_size"),
    (dict(position=[0.0] * (len(DRIVER_NAMES) - 1)), "joint_state.bad_size"),
    (dict(velocity=[0.0] * (len(DRIVER_NAMES) + 1)), "joint_state.bad_size"),
    (dict(position=[math.nan if n == "joint_4" else 0.0 for n in DRIVER_NAMES]), "joint_state.non_finite"),
    (dict(velocity=[math.inf if n == "joint_7" else 0.0 for n in DRIVER_NAMES]), "joint_state.non_finite"),
    (dict(stamp=(0, 0)), "joint_state.zero_stamp"),
], ids=["one_missing", "other_robot", "no_velocity", "no_position", "short_position", "long_velocity",
        "nan_position", "inf_velocity", "zero_stamp"])
def test_bad_joint_states_are_refused_with_their_cause(rb, change, cause):
    for msg in (rclpy_joints(**change), rb_joints(rb, **change)):
        with pytest.raises(BadSample) as err:
            convert.joint_state_from_msg(msg, ARM)
        assert err.value.cause == cause, type(msg)
    if cause == "joint_state.missing_joint":
        assert "joint_5" in str(err.value) or "joint_1" in str(err.value)   # names what it looked for


def test_a_non_finite_joint_the_policy_does_not_use_is_no_reason_to_refuse(rb):
    """A gripper finger without a reading (NaN) is not one of model.action.names."""
    nan_fingers = [math.nan if n.startswith("finger") else 0.5 for n in DRIVER_NAMES]
    for msg in (rclpy_joints(position=nan_fingers, velocity=nan_fingers), rb_joints(rb, position=nan_fingers,
                                                                                     velocity=nan_fingers)):
        sample = convert.joint_state_from_msg(msg, ARM)
        assert np.isfinite(sample.position).all() and np.isfinite(sample.velocity).all()


def test_joint_state_converter_uses_the_configured_names(default_config, rb):
    import dataclasses

    convert_fn = convert.sample_converter("joint_state", "sensor_msgs/msg/JointState", default_config)
    assert default_config.model.action.names == ARM
    np.testing.assert_allclose(convert_fn(rb_joints(rb)).position, 0.1 * np.arange(1, 8), atol=1e-12)
    panda = tuple(f"panda_joint{i}" for i in range(1, 8))
    other = dataclasses.replace(default_config, model=dataclasses.replace(
        default_config.model, action=dataclasses.replace(default_config.model.action, names=panda)))
    with pytest.raises(BadSample, match="joint_state.missing_joint"):
        convert.sample_converter("joint_state", "sensor_msgs/msg/JointState", other)(rclpy_joints())
    ours = convert.sample_converter("joint_state", "sensor_msgs/msg/JointState", other)(
        rclpy_joints(names=list(reversed(panda)), position=np.arange(7.0), velocity=np.zeros(7)))
    np.testing.assert_array_equal(ours.position, np.arange(7.0)[::-1])
    assert convert.sample_converter("joint_state", "sensor_msgs/msg/Imu", default_config) is None


# ---------------------------------------------------------------- LiDAR

def test_lidar_beams_nearest_valid_return_wins_and_empty_bins_are_inf():
    width = 2 * math.pi / 8
    angles = np.array([-math.pi, -math.pi + 0.1, -math.pi + 0.2, 0.0, 0.3, math.pi, 3 * width - math.pi])
    ranges = np.array([5.0, 2.0, 0.01, 4.0, 3.0, 1.5, np.nan])
    out = sensors.lidar_beams(angles, ranges, 8, 0.1, 20.0)
    assert out.dtype == np.float32
    # bin 0: 5, 2 and 1.5 (angle pi wraps to -pi); 0.01 is below range_min; bin 3's only return is NaN.
    assert out[0] == 1.5
    assert out[4] == 3.0          # 0.0 and 0.3 both fall in [0, pi/4): the nearer wins
    assert np.isinf(out[[1, 2, 3, 5, 6, 7]]).all()


def _scan(n=8, angle_min=-math.pi, increment=2 * math.pi / 8, ranges=None, stamp=STAMP) -> LaserScan:
    msg = LaserScan()
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    msg.angle_min, msg.angle_increment = angle_min, increment
    msg.angle_max = angle_min + (n - 1) * increment
    msg.range_min, msg.range_max = 0.05, 10.0
    msg.ranges = list(ranges if ranges is not None else np.arange(1.0, n + 1.0))
    return msg


def test_laser_scan_on_the_beam_grid_maps_ray_i_to_beam_i(rb):
    ours = convert.lidar_from_laser_scan(_scan(), LIDAR)
    np.testing.assert_array_equal(ours.ranges, np.arange(1.0, 9.0))
    msg = _scan()
    theirs = rb.types["sensor_msgs/msg/LaserScan"](
        header=rb_header(rb), angle_min=msg.angle_min, angle_max=msg.angle_max,
        angle_increment=msg.angle_increment, time_increment=0.0, scan_time=0.1, range_min=0.05, range_max=10.0,
        ranges=np.arange(1.0, 9.0, dtype=np.float32), intensities=np.zeros(0, np.float32))
    np.testing.assert_array_equal(convert.lidar_from_laser_scan(theirs, LIDAR).ranges, ours.ranges)


def test_dense_laser_scan_keeps_the_nearest_return_and_respects_both_range_limits():
    # 16 rays onto 8 beams, clockwise (negative increment), starting at +pi - half a ray.
    ranges = np.full(16, 9.0)
    ranges[3], ranges[4] = 2.0, 1.0       # the same beam pair: 1.0 must win
    ranges[7] = 12.0                      # beyond the scan's range_max (10): invalid
    ranges[8] = np.inf                    # no return
    ranges[9] = 15.0                      # beyond both limits
    out = convert.lidar_from_laser_scan(_scan(16, math.pi - 0.1, -2 * math.pi / 16, ranges), LIDAR).ranges
    assert np.isfinite(out).sum() == 7
    assert out.min() == 1.0 and (out[np.isfinite(out)] <= 10.0).all()


@pytest.mark.parametrize("change", [dict(angle_increment=0.0), dict(angle_increment=math.nan),
                                    dict(angle_max=math.pi * 3), dict(ranges=[1.0] * 12)])
def test_laser_scan_with_inconsistent_angles_is_refused(change):
    msg = _scan()
    for key, value in change.items():
        setattr(msg, key, value)
    with pytest.raises(BadSample) as err:
        convert.lidar_from_laser_scan(msg, LIDAR)
    assert err.value.cause == "lidar.bad_angles"


def test_laser_scan_off_by_one_angle_max_is_tolerated_and_empty_is_refused():
    msg = _scan()
    msg.angle_max += msg.angle_increment            # some drivers put angle_max one ray past the last
    assert np.isfinite(convert.lidar_from_laser_scan(msg, LIDAR).ranges).all()
    msg.ranges = []
    with pytest.raises(BadSample, match="lidar.empty"):
        convert.lidar_from_laser_scan(msg, LIDAR)


def _f32(value: float) -> float:
    """What a float32 message field holds once it has crossed the wire."""
    return float(np.float32(value))


# (angle_min, angle_max, angle_increment): pointcloud_to_laserscan's defaults, a half circle, a 270 degree
# scanner, and ira_laser_tools' merger defaults.
SCAN_GEOMETRIES = [(-math.pi, math.pi, math.pi / 180), (-math.pi / 2, math.pi / 2, math.pi / 360),
                   (-2.35619449, 2.35619449, 0.004363323), (-math.pi, math.pi, 0.0058)]


def _sized_scan(a_min: float, a_max: float, inc: float, n: int, ranges=None) -> LaserScan:
    msg = _scan(n, _f32(a_min), _f32(inc), ranges=ranges if ranges is not None else np.full(n, 5.0))
    msg.angle_max = _f32(a_max)
    return msg


@pytest.mark.parametrize("a_min, a_max, inc", SCAN_GEOMETRIES)
@pytest.mark.parametrize("convention", ["ceil", "floor_plus_one"])
def test_laser_scan_sized_either_way_is_binned_by_angle_min_plus_i_increments(a_min, a_max, inc, convention):
    f32 = np.float32
    if convention == "ceil":
        # exactly as pointcloud_to_laserscan and ira_laser_tools size their output: float arithmetic on the
        # message's own fields, ranges_size = std::ceil((angle_max - angle_min) / angle_increment)
        n = int(np.ceil((f32(a_max) - f32(a_min)) / f32(inc)))
    else:
        n = int(math.floor((a_max - a_min) / inc + 1e-6)) + 1     # angle_max is the last ray's angle
    cfg = LidarConfig(beams=360, range_min=0.1, range_max=20.0)
    ranges = np.full(n, 5.0)
    i = round((0.5 - _f32(a_min)) / _f32(inc))                    # the ray nearest to 0.5 rad
    ranges[i] = 1.0
    out = convert.lidar_from_laser_scan(_sized_scan(a_min, a_max, inc, n, ranges), cfg).ranges
    angle = _f32(a_min) + i * _f32(inc)                            # ray i's angle, by the message's definition
    beam = int(math.floor((angle + math.pi) / (2 * math.pi / 360) + 1e-6)) % 360
    assert out[beam] == 1.0 and (out[np.arange(360) != beam] != 1.0).all()


def test_issue_scan_of_360_rays_over_a_full_circle_is_accepted_and_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(convert, "_NOTED_SCAN_GEOMETRIES", set(), raising=False)
    cfg = LidarConfig(beams=360, range_min=0.1, range_max=20.0)
    msg = _sized_scan(-math.pi, math.pi, math.pi / 180, 360)      # "360 ranges, but ... + 1 = 361"
    with caplog.at_level("WARNING", logger="mm_fusion_ros.ros.convert"):
        for _ in range(3):
            assert np.isfinite(convert.lidar_from_laser_scan(msg, cfg).ranges).all()
    notes = [r for r in caplog.records if "LaserScan of 360 ranges" in r.getMessage()]
    assert len(notes) == 1 and "angle_min + i * angle_increment" in notes[0].getMessage()
    caplog.clear()
    floor_plus_one = _sized_scan(-math.pi, math.pi, math.pi / 180, 361)
    with caplog.at_level("WARNING", logger="mm_fusion_ros.ros.convert"):
        convert.lidar_from_laser_scan(floor_plus_one, cfg)
    assert not caplog.records            # angle_max is the last ray: nothing to say


@pytest.mark.parametrize("n", [359, 363, 180, 720])
def test_laser_scan_whose_count_disagrees_by_more_than_one_increment_is_refused(n):
    # Over 360 increments, 360 (ceil), 361 (floor + 1) and 362 rays (one past angle_max) are within one
    # increment; 359 rays end two short of angle_max, 363 two past it.
    msg = _sized_scan(-math.pi, math.pi, math.pi / 180, n)
    with pytest.raises(BadSample, match="increments from angle_max") as err:
        convert.lidar_from_laser_scan(msg, LidarConfig(beams=360, range_min=0.1, range_max=20.0))
    assert err.value.cause == "lidar.bad_angles"


def _cloud(points: np.ndarray, *, bigendian=False, dtype="f4", point_step=32, row_pad=8, height=1,
           fields=("x", "y", "z", "intensity")):
    """A PointCloud2 with x, y, z (and intensity) at offsets 0, 8, 16, 24: padding between fields, points, rows."""
    order = ">" if bigendian else "<"
    code = {"f4": PointField.FLOAT32, "f8": PointField.FLOAT64}[dtype]
    width = len(points) // height
    row_step = width * point_step + row_pad
    raw = np.zeros(height * row_step, np.uint8)
    for i, p in enumerate(points):
        r, c = divmod(i, width)
        base = r * row_step + c * point_step
        for k, value in enumerate(list(p) + [7.0]):
            raw[base + 8 * k: base + 8 * k + np.dtype(dtype).itemsize] = np.frombuffer(
                np.array(value, order + dtype).tobytes(), np.uint8)
    msg = PointCloud2()
    msg.header.stamp.sec, msg.header.stamp.nanosec = STAMP
    msg.height, msg.width, msg.is_bigendian = height, width, bigendian
    msg.point_step, msg.row_step, msg.data = point_step, row_step, raw.tobytes()
    msg.fields = [PointField(name=name, offset=8 * k, datatype=code, count=1) for k, name in enumerate(fields)]
    return msg


@pytest.mark.parametrize("bigendian, dtype, height", [(False, "f4", 1), (True, "f8", 1), (False, "f4", 2)])
def test_point_cloud_binning_reads_fields_by_offset(bigendian, dtype, height):
    points = np.array([[3.0, 0.1, 0.0],      # beam 4 (azimuth ~0)
                       [2.0, 0.0, 0.5],      # beam 4 again, nearer: wins
                       [0.0, -1.5, 0.0],     # azimuth -pi/2: beam 2
                       [np.nan, np.nan, np.nan],   # no return in an organised cloud: skipped
                       [-4.0, 0.0, 0.0],     # azimuth pi: wraps to beam 0
                       [0.01, 0.0, 0.0]])    # below range_min
    out = convert.lidar_from_point_cloud2(_cloud(points, bigendian=bigendian, dtype=dtype, height=height), LIDAR)
    expected = np.full(8, np.inf, np.float32)
    expected[[4, 2, 0]] = [2.0, 1.5, 4.0]
    np.testing.assert_array_equal(out.ranges, expected)


def test_point_cloud_height_band_and_refusals():
    points = np.array([[1.0, 0.0, -1.0], [3.0, 0.0, 0.2]])      # floor point nearer than the wall
    assert convert.lidar_from_point_cloud2(_cloud(points), LIDAR, z_min=-0.5, z_max=0.5).ranges[4] == 3.0
    assert convert.lidar_from_point_cloud2(_cloud(points), LIDAR).ranges[4] == 1.0
    with pytest.raises(BadSample, match="lidar.missing_xyz"):
        convert.lidar_from_point_cloud2(_cloud(points, fields=("x", "y", "intensity", "ring")), LIDAR)
    msg = _cloud(points)
    msg.fields[1].datatype = 42
    with pytest.raises(BadSample, match="lidar.bad_fields"):
        convert.lidar_from_point_cloud2(msg, LIDAR)
    msg = _cloud(points)
    msg.data = msg.data[:40]
    with pytest.raises(BadSample, match="lidar.bad_size"):
        convert.lidar_from_point_cloud2(msg, LIDAR)


def _floor_and_wall(height: float = 0.5) -> np.ndarray:
    """A 3-D LiDAR ``height`` m above a floor (z = -height in its frame), all around, and a wall at x = 3 m."""
    azimuth = np.radians(np.arange(0.5, 360.0, 1.0))
    floor = [(r * math.cos(a), r * math.sin(a), -height) for r in (0.8, 1.5, 2.5) for a in azimuth]
    wall = [(3.0, y, z) for y in np.arange(-1.0, 1.001, 0.05) for z in np.arange(-height, 1.001, 0.05)]
    return np.array(floor + wall)


def test_point_cloud_from_the_sample_converter_keeps_the_configured_z_slice(default_config):
    import dataclasses

    points = _floor_and_wall()
    to_sample = convert.sample_converter("lidar", "sensor_msgs/msg/PointCloud2", default_config)
    ranges = to_sample(_cloud(points)).ranges
    bins = np.floor((np.arctan2(points[:, 1], points[:, 0]) + math.pi) / (2 * math.pi / 360)).astype(int) % 360
    wall_bins = np.unique(bins[points[:, 0] == 3.0])
    # Inside the slice (|z| <= 0.1 m by default) the wall is each of its beams' nearest return ...
    assert (ranges[wall_bins] >= 3.0).all() and (ranges[wall_bins] <= math.hypot(3.0, 1.0) + 1e-6).all()
    # ... and the floor, 0.8 m away in every direction, is nobody's.
    assert np.isinf(np.delete(ranges, wall_bins)).all()
    # The slice is the configuration's: one reaching down to the floor lets the floor win again.
    low = dataclasses.replace(default_config, inputs=dataclasses.replace(
        default_config.inputs, lidar=dataclasses.replace(default_config.inputs.lidar, z_min=-0.6)))
    with_floor = convert.sample_converter("lidar", "sensor_msgs/msg/PointCloud2", low)(_cloud(points)).ranges
    np.testing.assert_allclose(with_floor, 0.8, rtol=1e-6)


def test_rosbags_point_cloud_gives_the_same_beams(rb):
    points = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    ours = _cloud(points)
    field = rb.types["sensor_msgs/msg/PointField"]
    theirs = rb.types["sensor_msgs/msg/PointCloud2"](
        header=rb_header(rb), height=ours.height, width=ours.width,
        fields=[field(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count) for f in ours.fields],
        is_bigendian=False, point_step=ours.point_step, row_step=ours.row_step,
        data=np.frombuffer(bytes(ours.data), np.uint8).copy(), is_dense=True)
    np.testing.assert_array_equal(convert.lidar_from_point_cloud2(theirs, LIDAR).ranges,
                                  convert.lidar_from_point_cloud2(ours, LIDAR).ranges)


# ---------------------------------------------------------------- outputs

def test_output_messages():
    action = convert.action_msg(np.array([0.1, -0.2, 0.3, 0.0, 0.5, -0.6, 0.7]))
    assert list(action.data) == pytest.approx([0.1, -0.2, 0.3, 0.0, 0.5, -0.6, 0.7])
    joints = convert.joint_state_msg(["a", "b"], [0.25, -0.5], STAMP_S)
    assert list(joints.name) == ["a", "b"] and list(joints.velocity) == [0.25, -0.5]
    assert list(joints.position) == [] and list(joints.effort) == []
    assert (joints.header.stamp.sec, joints.header.stamp.nanosec) == STAMP
    fused = convert.fused_state_msg(np.arange(4, dtype=np.float32))
    assert list(fused.data) == [0.0, 1.0, 2.0, 3.0]
    twist = convert.twist_msg([1, 2, 3, 4, 5, 6], STAMP_S, "base_link")
    assert twist.header.frame_id == "base_link"
    assert (twist.twist.linear.x, twist.twist.linear.z, twist.twist.angular.x, twist.twist.angular.z) == (1, 3, 4, 6)


def test_output_builders_refuse_what_must_not_reach_an_arm():
    with pytest.raises(ValueError, match="non-finite"):
        convert.action_msg([0.0, math.nan])
    with pytest.raises(ValueError, match="2 names for 3 values"):
        convert.joint_state_msg(["a", "b"], [0.0, 0.0, 0.0], 1.0)
    with pytest.raises(ValueError, match="6 values"):
        convert.twist_msg([0.0] * 7, 1.0, "base_link")


def test_sample_converter_is_configured_from_the_robot_config(default_config):
    """fusion_node and replay convert through sample_converter: the config's audio window and source rate apply."""
    import dataclasses

    cfg = default_config
    short = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, audio=dataclasses.replace(cfg.model.audio, window_s=0.5)))
    pcm = np.zeros(12000, "<i2")   # 0.75 s at 16 kHz: inside the default 1 s window, over a 0.5 s one
    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = STAMP
    msg.height, msg.width, msg.encoding, msg.step, msg.data = 1, pcm.size, "16SC1", pcm.nbytes, pcm.tobytes()
    sample = convert.sample_converter("audio", "sensor_msgs/msg/Image", cfg)(msg)
    assert sample.sample_rate == cfg.inputs.audio.source_rate and sample.samples.size == pcm.size
    with pytest.raises(BadSample, match="audio.oversize"):
        convert.sample_converter("audio", "sensor_msgs/msg/Image", short)(msg)
    assert convert.sample_converter("imu", "sensor_msgs/msg/Image", cfg) is None   # that type cannot carry IMU
    assert convert.sample_converter("camera", "sensor_msgs/msg/Image", cfg) is convert.camera_from_image
