"""Message types for reading and writing bags without a ROS installation.

The rosbags type store is pinned to one ROS 2 distribution (message layouts
change between distributions; ``Stores.LATEST`` would silently follow rosbags
upgrades), and extended with ``audio_common_msgs`` from the ``.msg`` files
shipped in ``config/msg/audio_common_msgs``.

Two driver packages publish a package called ``audio_common_msgs`` whose
``AudioData`` and ``AudioInfo`` differ, so one store cannot hold both:

- ``ros_drivers`` (default): ros-drivers/audio_common, ``AudioDataStamped`` + ``AudioInfo``;
- ``mgonzs13``: mgonzs13/audio_common, ``AudioStamped`` (``Audio`` = ``AudioData`` + ``AudioInfo``).

``audio_flavour_for`` picks one from the types a bag holds. Definitions that a
bag carries itself (MCAP schemas) override both, because they describe the bytes
actually recorded (see ``mm_fusion_ros.bag.reader``).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Iterable

from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

DISTROS = {
    "humble": Stores.ROS2_HUMBLE,
    "iron": Stores.ROS2_IRON,
    "jazzy": Stores.ROS2_JAZZY,
    "kilted": Stores.ROS2_KILTED,
}
DEFAULT_DISTRO = "kilted"   # the distribution of the ROS 2 wheels this package is tested with

AUDIO_FLAVOURS = ("ros_drivers", "mgonzs13")
AUDIO_PACKAGE = "audio_common_msgs"
# Types only one flavour has: seeing them in a bag says which driver recorded it.
_MGONZS13_ONLY = {f"{AUDIO_PACKAGE}/msg/AudioStamped", f"{AUDIO_PACKAGE}/msg/Audio"}
_ROS_DRIVERS_ONLY = {f"{AUDIO_PACKAGE}/msg/AudioDataStamped"}

Typesdict = dict


class TypestoreError(ValueError):
    """An unknown distribution or audio flavour, or missing message definitions."""


def distro_of(cfg: object) -> str:
    """The ROS distribution a config pins (``ros_distro``); the default for objects without one."""
    return getattr(cfg, "ros_distro", DEFAULT_DISTRO)


def msg_dir() -> Path:
    """Where the shipped ``audio_common_msgs`` definitions are: the checkout, else the install."""
    candidates = [Path(__file__).resolve().parents[2] / "config" / "msg",
                  Path(sys.prefix) / "share" / "mm_fusion_ros" / "config" / "msg"]
    try:  # a colcon install on a robot
        from ament_index_python.packages import get_package_share_directory
        candidates.append(Path(get_package_share_directory("mm_fusion_ros")) / "config" / "msg")
    except Exception:  # noqa: BLE001 - no ament index here, or the package is not installed in it
        pass
    for path in candidates:
        if (path / AUDIO_PACKAGE / "AudioData.msg").is_file():
            return path
    raise TypestoreError("audio_common_msgs definitions not found; looked in "
                         + ", ".join(str(p) for p in candidates))


@functools.lru_cache(maxsize=None)
def audio_types(flavour: str = "ros_drivers") -> Typesdict:
    """Field definitions of one audio_common_msgs flavour, parsed from its .msg files."""
    if flavour not in AUDIO_FLAVOURS:
        raise TypestoreError(f"unknown audio_common_msgs flavour {flavour!r}; choose from {list(AUDIO_FLAVOURS)}")
    folder = msg_dir() / AUDIO_PACKAGE
    if flavour == "mgonzs13":
        folder = folder / "mgonzs13"
    types: Typesdict = {}
    for path in sorted(folder.glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(), f"{AUDIO_PACKAGE}/msg/{path.stem}"))
    return types


def audio_flavour_for(msgtypes: Iterable[str]) -> str:
    """The flavour whose types a bag uses; ros-drivers' unless only mgonzs13's types appear."""
    names = set(msgtypes)
    if names & _MGONZS13_ONLY and not names & _ROS_DRIVERS_ONLY:
        return "mgonzs13"
    return "ros_drivers"


def store_for(distro: str) -> Stores:
    if distro not in DISTROS:
        raise TypestoreError(f"unknown ROS distribution {distro!r}; choose from {sorted(DISTROS)}")
    return DISTROS[distro]


def make_typestore(distro: str = DEFAULT_DISTRO, audio: str = "ros_drivers") -> Typestore:
    """The pinned distribution's types plus one audio_common_msgs flavour. Cached: treat as read-only."""
    return _cached_typestore(distro, audio)


@functools.lru_cache(maxsize=8)
def _cached_typestore(distro: str, audio: str) -> Typestore:
    store = get_typestore(store_for(distro))
    store.register(audio_types(audio))
    return store


def typestore_with(distro: str, audio: str, overrides: Typesdict) -> Typestore:
    """A fresh store whose definitions in ``overrides`` (e.g. read from a bag) replace the defaults."""
    if not overrides:
        return make_typestore(distro, audio)
    fields = dict(get_typestore(store_for(distro)).fielddefs)
    fields.update(audio_types(audio))
    fields.update(overrides)
    store = get_typestore(Stores.EMPTY)
    store.register(fields)
    return store
