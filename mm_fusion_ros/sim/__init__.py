"""The simulated robot cell (MuJoCo), ROS-free: the arm, the task, the sensors and the scripted expert.

- ``config``: CellConfig, the ``sim_node`` block of ``config/sim.yaml``, validated at load;
- ``panda``: the Franka Panda's published kinematics and limits, and its MJCF of simple geoms;
- ``scene``: the cell's MJCF (table, buttons, camera, LiDAR, intruder, fence);
- ``cell``: physics, seeded episodes, sensor readings, outcomes;
- ``readings``: the sensors' output and its arrival order;
- ``expert``: the scripted expert (damped least-squares IK on privileged state);
- ``task_state``: what training asks the fused state to say (the cued button, the tool's offset from it);
- ``record``: demonstrations as rosbag2 bags (``mm-fusion record``).

``sim_node`` (``mm_fusion_ros.ros.sim_node``) is the thin ROS 2 shell over ``cell``.
"""

from . import gl  # noqa: F401  (MUJOCO_GL before anything imports mujoco)
