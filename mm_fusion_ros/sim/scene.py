"""The cell's MJCF: the Panda on a table, buttons, the overhead camera, the LiDAR, the intruder, a fence.

Layout, in the robot base frame (x forward, z up, the table top at z = 0):

- buttons in ``scene.area_x`` x ``scene.area_y`` (moved each episode), seen by the overhead camera,
  whose view at the table covers about |y| < 0.33 m and at the intruder's top less;
- the intruder reaches in from either side to |y| in ``intruder.reach_y`` (0.45-0.55 m): outside the
  camera's view, inside the LiDAR's protective field;
- the LiDAR scans a horizontal plane ``lidar.height_m`` above the table from the front edge (x = 1 m);
- a fence 1.3 m either side and behind gives the scan a background, as a real cell's guarding does.

Collisions: arm geoms (contype 1, conaffinity 2) touch fixtures (contype 2, conaffinity 1) but not each
other; fixtures never touch fixtures. The base is visual only (it would touch link 1).
"""

from __future__ import annotations

from .config import CellConfig
from .panda import arm_mjcf

COLOURS = ("0.85 0.15 0.15 1", "0.15 0.7 0.2 1", "0.15 0.3 0.9 1", "0.9 0.8 0.1 1", "0.8 0.2 0.8 1",
           "0.1 0.8 0.8 1")
COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan")
HOUSING_HEIGHT = 0.02
CAP_HEIGHT = 0.016
LIDAR_X = 1.0
INTRUDER_PARK_Y = 1.1
WITNESS_SIZE = (480, 360)   # the "witness" camera's frames in episode videos (width, height)


def cell_mjcf(cfg: CellConfig) -> str:
    arm, actuators = arm_mjcf()
    s, cam = cfg.scene, cfg.camera
    max_travel = s.click_depth[1] + s.free_travel
    buttons = []
    for k in range(s.targets):
        # Parked in a row; Cell.reset moves them to the episode's layout.
        buttons.append(f"""
    <body name="button{k}" pos="{0.45 + 0.08 * k:.3f} 0 0">
      <geom name="button{k}_housing" type="cylinder" size="{s.cap_radius + 0.012:.4f} {HOUSING_HEIGHT / 2}"
            pos="0 0 {HOUSING_HEIGHT / 2}" class="fixture" rgba="0.35 0.35 0.38 1"/>
      <body name="button{k}_cap" pos="0 0 {HOUSING_HEIGHT}">
        <joint name="button{k}" type="slide" axis="0 0 1" range="{-max_travel:.4f} 0" damping="3" armature="0.02"
               solreflimit="0.004 1"/>
        <geom name="button{k}_cap" type="cylinder" size="{s.cap_radius:.4f} {CAP_HEIGHT / 2}" pos="0 0 {CAP_HEIGHT / 2}"
              mass="0.02" class="fixture" rgba="{COLOURS[k]}"/>
      </body>
    </body>""")
    cx = 0.5 * (s.area_x[0] + s.area_x[1])
    cy = 0.5 * (s.area_y[0] + s.area_y[1])
    return f"""<mujoco model="mm_fusion_cell">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{cfg.physics.timestep}" integrator="implicitfast" cone="elliptic"/>
  <visual>
    <quality shadowsize="0" offsamples="0"/>
    <global offwidth="{max(cam.width, WITNESS_SIZE[0])}" offheight="{max(cam.height, WITNESS_SIZE[1])}"/>
    <headlight ambient="0.45 0.45 0.45" diffuse="0.4 0.4 0.4" specular="0 0 0"/>
  </visual>
  <default>
    <default class="arm">
      <geom contype="1" conaffinity="2" rgba="0.92 0.92 0.94 1" friction="0.8 0.01 0.001"/>
    </default>
    <default class="fixture">
      <geom contype="2" conaffinity="1" friction="0.8 0.01 0.001"/>
    </default>
  </default>
  <worldbody>
    <light name="top" pos="{cx} {cy} 2.5" dir="0 0 -1" directional="true" castshadow="false" diffuse="0.6 0.6 0.6"/>
    <geom name="table" type="box" size="0.5 0.7 0.02" pos="0.5 0 -0.02" class="fixture" rgba="0.55 0.45 0.35 1"/>
    <geom name="floor" type="plane" size="3 3 0.1" pos="0 0 -0.75" contype="0" conaffinity="0" rgba="0.3 0.3 0.3 1"/>
    <geom name="fence_left" type="box" size="1.0 0.01 0.6" pos="0.5 1.3 0.2" class="fixture" rgba="0.9 0.7 0.1 1"/>
    <geom name="fence_right" type="box" size="1.0 0.01 0.6" pos="0.5 -1.3 0.2" class="fixture" rgba="0.9 0.7 0.1 1"/>
    <geom name="fence_back" type="box" size="0.01 1.3 0.6" pos="-0.5 0 0.2" class="fixture" rgba="0.9 0.7 0.1 1"/>
    <geom name="base" type="cylinder" size="0.07 0.14" pos="0 0 0.14" contype="0" conaffinity="0" rgba="0.9 0.9 0.92 1"/>
    <camera name="overhead" pos="{cx} {cy} {cam.height_m}" xyaxes="0 -1 0 1 0 0" fovy="{cam.fovy_deg}"/>
    <!-- For people, not the policy: the whole cell, intruder included (videos of episodes). -->
    <body name="cell_centre" pos="0.45 0 0.15"/>
    <camera name="witness" pos="1.75 -1.05 0.95" mode="targetbody" target="cell_centre" fovy="45"/>
    <body name="lidar" pos="{LIDAR_X} 0 0">
      <geom name="lidar_post" type="cylinder" size="0.03 {cfg.lidar.height_m / 2}" pos="0 0 {cfg.lidar.height_m / 2}"
            contype="0" conaffinity="0" rgba="0.1 0.1 0.1 1"/>
      <site name="lidar" pos="0 0 {cfg.lidar.height_m}" size="0.02"/>
    </body>
    <body name="intruder" mocap="true" pos="0.5 {INTRUDER_PARK_Y} 0">
      <geom name="intruder" type="capsule" fromto="0 0 0.06 0 0 0.6" size="{cfg.intruder.radius}" class="fixture"
            rgba="0.95 0.75 0.6 1"/>
    </body>
    {arm}
    {''.join(buttons)}
  </worldbody>
  <actuator>
    {actuators}
  </actuator>
  <sensor>
    <accelerometer name="imu_accel" site="imu"/>
    <gyro name="imu_gyro" site="imu"/>
  </sensor>
</mujoco>
"""
