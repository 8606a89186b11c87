# One-command setup and run. Everything the project needs is installed by these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Every process that starts ROS 2 stays on loopback and on its own domain (see README).
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_DOMAIN_ID ?= 42

.PHONY: setup demo test bench bench-live bench-sim clean

setup: $(STAMP)

$(STAMP): setup.py package.xml
	# PortAudio for sounddevice (microphone_node) and OSMesa for the simulated cell's offscreen
	# rendering (MUJOCO_GL=osmesa). Debian packages; needs root, as on CI.
	@missing=""; \
	ldconfig -p | grep -q libportaudio.so.2 || missing="$$missing libportaudio2"; \
	ldconfig -p | grep -q libOSMesa.so || missing="$$missing libosmesa6"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (sudo apt-get install$$missing)" >&2; exit 1; fi; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: this version is on the machine's disk; any other downloads GBs.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[ros,dev]'
	$(PY) tools/build_audio_msgs.py
	touch $(STAMP)

# The live pipeline: camera_node (a generated video), microphone_node (a generated WAV), sensor_sim_node
# (LiDAR + IMU) -> fusion_node, each its own process, for 20 s; cadence report, then a summary.
demo: $(STAMP)
	$(VENV)/bin/mm-fusion live --config config/robot.yaml --duration 20 --workdir artifacts/live

test: $(STAMP)
	$(PY) -m pytest -q test

bench: $(STAMP)
	$(VENV)/bin/mm-fusion bench-engine --config config/robot.yaml --backends torch,onnxruntime --plot artifacts/bench_engine.png

# The live loop for 5 minutes: ticks over budget, p99 tick time, camera transport, lost messages.
bench-live: $(STAMP)
	$(PY) bench/live_loop.py --config config/robot.yaml --duration 300 --out artifacts/bench_live.json --plot artifacts/bench_live.png

# The simulated cell: real-time factor, scripted-expert success over 200 episodes, recording throughput.
bench-sim: $(STAMP)
	$(PY) bench/sim_cell.py --episodes 200 --record 20 --workers 2

clean:
	rm -rf $(VENV) artifacts build install log *.egg-info
