"""audio_common_msgs generated at setup (tools/build_audio_msgs.py): real AudioDataStamped, not the fallback.

ROS 2's PyPI wheels have no audio_common_msgs; the Makefile's setup generates it from
config/msg/audio_common_msgs/*.msg with the wheels' ament_cmake and rosidl generators and installs it
into the venv. These tests prove that a Python started from the venv with nothing sourced imports
it, that its wire format is the one the bags hold, and that microphone_node, as its own process,
publishes real AudioDataStamped + AudioInfo over DDS that another process receives and decodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install '.[ros]')")

from mm_fusion_ros import procs  # noqa: E402
from mm_fusion_ros.bag import messages as M  # noqa: E402
from mm_fusion_ros.bag.typestore import make_typestore  # noqa: E402
from mm_fusion_ros.live_demo import make_wav  # noqa: E402
from mm_fusion_ros.ros import convert  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROBOT_YAML = REPO / "config" / "robot.yaml"
SETUP_HINT = f"run the setup (make setup, or {sys.executable} tools/build_audio_msgs.py)"

# One fresh interpreter: what it imports, the fields rosidl generated, two messages to CDR, and the
# CDR rosbags wrote (argv) back to messages.
PROBE = r"""
import json, sys
import audio_common_msgs
from audio_common_msgs.msg import AudioData, AudioDataStamped, AudioInfo
from rclpy.serialization import deserialize_message, serialize_message
pcm, bag_stamped, bag_info = (bytes.fromhex(a) for a in sys.argv[1:4])
m = AudioDataStamped()
m.header.stamp.sec, m.header.stamp.nanosec, m.header.frame_id = 12, 500000000, "mic"
m.audio.data = pcm
info = AudioInfo(channels=1, sample_rate=16000, sample_format="S16LE", bitrate=256000, coding_format="wave")
s = deserialize_message(bag_stamped, AudioDataStamped)
i = deserialize_message(bag_info, AudioInfo)
print(json.dumps({
    "file": audio_common_msgs.__file__,
    "fields": {c.__name__: c.get_fields_and_field_types() for c in (AudioData, AudioDataStamped, AudioInfo)},
    "stamped_cdr": serialize_message(m).hex(), "info_cdr": serialize_message(info).hex(),
    "from_bag": [s.header.stamp.sec, s.header.stamp.nanosec, s.header.frame_id, bytes(s.audio.data).hex(),
                 i.channels, i.sample_rate, i.sample_format, i.bitrate, i.coding_format]}))
"""


def bare_env() -> dict[str, str]:
    """What a user's shell gives a process: no LD_LIBRARY_PATH, PYTHONPATH or ament prefix of ours."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env.update(ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", ROS_DOMAIN_ID=os.environ["ROS_DOMAIN_ID"])
    return env


def test_setup_built_the_messages_from_the_current_definitions():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "build_audio_msgs.py"), "--check"],
                            env=bare_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{SETUP_HINT}"


def test_a_fresh_venv_python_imports_them_and_they_match_the_bags_wire_format():
    pcm = (np.arange(320) - 160).astype("<i2")
    ts = make_typestore()
    bag_stamped = bytes(ts.serialize_cdr(M.audio_data_stamped(ts, 12.5, "mic", pcm),
                                         "audio_common_msgs/msg/AudioDataStamped"))
    bag_info = bytes(ts.serialize_cdr(M.audio_info(ts, 16000), "audio_common_msgs/msg/AudioInfo"))
    result = subprocess.run([sys.executable, "-c", PROBE, pcm.tobytes().hex(), bag_stamped.hex(), bag_info.hex()],
                            env=bare_env(), cwd="/", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{result.stderr}\n{SETUP_HINT}"
    got = json.loads(result.stdout.strip().splitlines()[-1])
    # Installed into this venv, where the wheels put theirs (nothing to source).
    assert Path(got["file"]).resolve().is_relative_to(Path(sys.prefix).resolve()), got["file"]
    # The fields of config/msg/audio_common_msgs (ros-drivers), not mgonzs13's AudioData/AudioInfo.
    assert got["fields"] == {
        "AudioData": {"data": "sequence<uint8>"},
        "AudioDataStamped": {"header": "std_msgs/Header", "audio": "audio_common_msgs/AudioData"},
        "AudioInfo": {"channels": "uint8", "sample_rate": "uint32", "sample_format": "string", "bitrate": "uint32",
                      "coding_format": "string"},
    }
    # The same wire format as the bags (rosbags, from the same .msg files), both ways: a bag's raw CDR
    # goes out unchanged (bag_player) and what a node publishes is what a bag records.
    assert got["from_bag"] == [12, 500_000_000, "mic", pcm.tobytes().hex(), 1, 16000, "S16LE", 256000, "wave"]
    stamped = ts.deserialize_cdr(np.frombuffer(bytes.fromhex(got["stamped_cdr"]), np.uint8),
                                 "audio_common_msgs/msg/AudioDataStamped")
    assert (stamped.header.stamp.sec, stamped.header.stamp.nanosec, stamped.header.frame_id) == (12, 500_000_000, "mic")
    assert np.array_equal(np.frombuffer(stamped.audio.data.tobytes(), "<i2"), pcm)
    info = ts.deserialize_cdr(np.frombuffer(bytes.fromhex(got["info_cdr"]), np.uint8),
                              "audio_common_msgs/msg/AudioInfo")
    assert (info.channels, info.sample_rate, info.sample_format, info.bitrate, info.coding_format) == (
        1, 16000, "S16LE", 256000, "wave")


def test_microphone_node_sends_real_audio_data_stamped_to_another_process(context, tmp_path):
    from audio_common_msgs.msg import AudioDataStamped, AudioInfo
    from rclpy.executors import SingleThreadedExecutor

    from mm_fusion_ros.ros.qos import latched_qos, sensor_qos

    wav_path = make_wav(tmp_path / "clip.wav", seconds=0.3, rate=16000)   # 15 chunks of 20 ms
    with wave.open(str(wav_path)) as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
    chunks: list = []
    infos: list = []
    listener = rclpy.create_node("audio_msgs_listener", context=context)
    listener.create_subscription(AudioDataStamped, "/audio/audio_stamped", chunks.append, sensor_qos("reliable", 100))
    listener.create_subscription(AudioInfo, "/audio/audio_info", infos.append, latched_qos())
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(listener)
    # The shipped parameters file, type audio_data_stamped as on a robot; no fallback asked for.
    mic = procs.start_node("microphone_node", tmp_path / "logs", params_file=ROBOT_YAML, env=procs.ros_env(),
                           overrides={"source": str(wav_path), "wait_for_subscribers": 1})
    try:
        deadline = time.monotonic() + 60.0
        while (len(chunks) < 20 or not infos) and time.monotonic() < deadline and mic.alive():
            executor.spin_once(timeout_sec=0.05)
        log = mic.log()
        assert len(chunks) >= 20 and infos, f"{len(chunks)} chunks, {len(infos)} AudioInfo\n{log}"
    finally:
        mic.stop()
        executor.shutdown()
        listener.destroy_node()
    log = mic.log()
    assert "as audio_data_stamped" in log, log   # microphone_node names the type it publishes
    assert "not importable" not in log and "image_pcm" not in log, log
    fmt = convert.audio_format_from_info(infos[-1])
    assert (fmt.sample_rate, fmt.channels, fmt.sample_format) == (16000, 1, "S16LE")
    samples = [convert.audio_from_audio_data_stamped(m, fmt, fmt) for m in chunks]
    assert all(len(m.audio.data) == 640 and m.header.frame_id == "microphone" for m in chunks)
    assert np.allclose(samples[0].samples, pcm[:320] / 32768.0, atol=1e-6)
    assert np.allclose(samples[15].samples, pcm[:320] / 32768.0, atol=1e-6)   # chunk 15 = the file again (loop)
    assert np.allclose(np.diff([s.stamp for s in samples]), 0.02, atol=1e-6)   # back to back, stamped at capture
