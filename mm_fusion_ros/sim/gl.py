"""Pick MuJoCo's offscreen rendering backend before ``mujoco`` is imported anywhere.

Without a display MuJoCo's default (GLFW) fails looking for X; OSMesa (Debian
package ``libosmesa6``) renders in software anywhere, EGL on a GPU. A user's
own MUJOCO_GL is kept.
"""

import ctypes.util
import os

os.environ.setdefault("MUJOCO_GL", "osmesa")
if os.environ["MUJOCO_GL"] == "osmesa":
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    # Mesa's llvmpipe rasterises on a thread per core by default; for a 96x96 frame handing the tiles to
    # them costs more than drawing them (render p50 1.93 -> 1.31 ms in the calling thread, same pixels), and
    # eval's workers already take a core each.
    os.environ.setdefault("LP_NUM_THREADS", "0")


class RenderBackendError(RuntimeError):
    pass


def check_backend() -> None:
    """Refuse early, and say what to install, when the chosen backend's library is missing."""
    backend = os.environ["MUJOCO_GL"]
    needs = {"osmesa": ("OSMesa", "libosmesa6"), "egl": ("EGL", "libegl1")}.get(backend)
    if needs and ctypes.util.find_library(needs[0]) is None:
        raise RenderBackendError(
            f"MUJOCO_GL={backend} needs lib{needs[0]}, which is not installed: apt-get install {needs[1]} "
            f"(or set MUJOCO_GL=egl on a machine with a GPU, MUJOCO_GL=osmesa for software rendering)")
