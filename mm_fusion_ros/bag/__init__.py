"""rosbag2 bags without a ROS installation (rosbags): types, reading, writing, synthetic bags.

- ``typestore``: the pinned ROS distribution's message types plus audio_common_msgs;
- ``reader``: ``BagReader``, messages in receive-time order, damaged bags read as far as they go
  (``salvage`` walks a damaged MCAP file record by record);
- ``writer``: ``BagWriter``, bags that appear under their name only when complete;
- ``messages``: rosbags message objects with every field filled in;
- ``make_bag``: the synthetic bags of ``mm-fusion make-bag``.
"""

from .reader import BagError, BagMessage, BagReader, DecodeError, TopicInfo
from .typestore import DEFAULT_DISTRO, DISTROS, make_typestore
from .writer import BagWriteError, BagWriter

__all__ = ["BagError", "BagMessage", "BagReader", "BagWriteError", "BagWriter", "DEFAULT_DISTRO", "DISTROS",
           "DecodeError", "TopicInfo", "make_typestore"]
