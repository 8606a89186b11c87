# One-command setup and run. Everything the project needs is installed by these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Every process that starts ROS 2 stays on loopback and on its own domain (see README).
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_DOMAIN_ID ?= 42

.PHONY: setup demo demo-sim demo-live train eval test bench bench-live bench-estop bench-sim bench-remote clean

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

# The whole loop over ROS 2: sim_node (the MuJoCo cell) + fusion_node with the shipped policy
# (policies/sim_policy.pt, from `make train`), each its own process, 5 episodes live at 100 Hz on sim time
# (seeds 5000 on, never trained on); per episode the outcome and the cadence, then a summary.
demo: $(STAMP)
	$(VENV)/bin/mm-fusion sim-demo --config config/sim.yaml --checkpoint $(POLICY) --episodes 5 --workdir artifacts/sim_demo

demo-sim: demo

# The sensor pipeline without the cell: camera_node (a generated video), microphone_node (a generated WAV),
# sensor_sim_node (LiDAR, IMU, joint states) -> fusion_node, each its own process, for 20 s; cadence, summary.
demo-live: $(STAMP)
	$(VENV)/bin/mm-fusion live --config config/robot.yaml --duration 20 --workdir artifacts/live

# The shipped policy, from nothing: expert demonstrations (seeds 0..TRAIN_EPISODES-1, DART noise), then
# behaviour cloning through the live aligner. Evaluation seeds start at 1000, never these.
POLICY ?= policies/sim_policy.pt
TRAIN_EPISODES ?= 200
TRAIN_EPOCHS ?= 8
# The share of DAgger episodes with a required sensor silent for 0.5-2.5 s (README item 29: without them a 2 s
# camera gap's watchdog halt was taken for the click).
DAGGER_GAPS ?= 0.5
# Camera pretraining steps in round 0 (0 for a policy without the camera: bench/tables.py's rows).
CAMERA_PRETRAIN ?= 3000
# README "Where learning stands", items 27-29: the camera pretrained on where the buttons are, then cloning with the
# cue read's targets (the buttons, which one the tone names) and the phase flags' (cue heard, intruder, click), the
# head refitted alone; then two DAgger rounds, in each the policy alone drives 150 episodes (seeds 2000-2149, then
# 2150-2299; half of them with a required sensor silent for a while) that the expert labels: after the first 3
# epochs more on both sets and the head refitted, after the second the head refitted on all three. 53.3 min end to
# end on this 2-core machine, recording included (README item 28: 8 epochs in round 0, where 12 made it ~65 min);
# 45.0 min with the gaps and the demonstrations already recorded (item 29: 195/200 eval episodes, 182/200 with a
# 2 s camera gap).
train: $(STAMP)
	$(VENV)/bin/mm-fusion record artifacts/demos --config config/sim.yaml --episodes $(TRAIN_EPISODES) --seed 0 \
	  --noise 0.1 --noise-tau 0.5 --workers 2 --resume
	$(VENV)/bin/mm-fusion train artifacts/demos --config config/sim.yaml --out artifacts/policy_round0.pt \
	  --epochs $(TRAIN_EPOCHS) --batch-episodes 8 --chunk-ticks 120 --workers 2 --cache artifacts/dataset_cache \
	  --plot artifacts/train_loss_round0.png --camera-pretrain-steps $(CAMERA_PRETRAIN) $(TRAIN_TARGETS) --head-steps 3000
	rm -rf artifacts/dagger   # the round's episodes are this round-0 policy's, never an earlier one's
	$(VENV)/bin/mm-fusion record artifacts/dagger --config config/sim.yaml --episodes 150 --seed 2000 \
	  --policy artifacts/policy_round0.pt --expert-share 0 --gap-share $(DAGGER_GAPS) --workers 2
	$(VENV)/bin/mm-fusion train artifacts/demos artifacts/dagger --include-failures --config config/sim.yaml \
	  --init artifacts/policy_round0.pt --out artifacts/policy_round1.pt --epochs 3 --batch-episodes 8 \
	  --chunk-ticks 120 --workers 2 --cache artifacts/dataset_cache --plot artifacts/train_loss.png \
	  --camera-pretrain-steps 0 $(TRAIN_TARGETS) --head-steps 3000
	rm -rf artifacts/dagger2
	$(VENV)/bin/mm-fusion record artifacts/dagger2 --config config/sim.yaml --episodes 150 --seed 2150 \
	  --policy artifacts/policy_round1.pt --expert-share 0 --gap-share $(DAGGER_GAPS) --workers 2
	$(VENV)/bin/mm-fusion train artifacts/demos artifacts/dagger artifacts/dagger2 --include-failures \
	  --config config/sim.yaml --init artifacts/policy_round1.pt --out $(POLICY) --epochs 0 --batch-episodes 8 \
	  --chunk-ticks 120 --workers 2 --cache artifacts/dataset_cache --camera-pretrain-steps 0 $(TRAIN_TARGETS) \
	  --head-steps 3000
TRAIN_TARGETS = --camera-target-weight 1 --cue-target-weight 1 --keypoint-target-weight 1 --phase-target-weight 1

# Closed-loop evaluation of the shipped policy: 200 episodes on seeds 1000..1199 (none trained on).
eval: $(STAMP)
	$(VENV)/bin/mm-fusion eval --config config/sim.yaml --checkpoint $(POLICY) --episodes 200 --seed 1000 \
	  --workers 2 --lockstep 8 --out artifacts/eval.json --video artifacts/eval_episode.mp4

test: $(STAMP)
	$(PY) -m pytest -q test

bench: $(STAMP)
	$(VENV)/bin/mm-fusion bench-engine --config config/robot.yaml --backends torch,onnxruntime --plot artifacts/bench_engine.png

# The live loop for 5 minutes: ticks over budget, p99 tick time, camera transport, lost messages.
bench-live: $(STAMP)
	$(PY) bench/live_loop.py --config config/robot.yaml --duration 300 --out artifacts/bench_live.json --plot artifacts/bench_live.png

# E-stop over DDS: press -> fusion_node latched -> first command at rest, 30 presses in the live pipeline.
bench-estop: $(STAMP)
	$(PY) bench/estop_latency.py --presses 30 --out artifacts/bench_estop.json

# The simulated cell: real-time factor, scripted-expert success over 200 episodes, recording throughput.
bench-sim: $(STAMP)
	$(PY) bench/sim_cell.py --episodes 200 --record 20 --workers 2

# Remote inference over loopback: round trip with and without CURVE against the in-process engine, the 100 Hz
# loop with a remote engine, throughput with 1, 4 and 16 clients.
bench-remote: $(STAMP)
	$(PY) bench/remote_inference.py
	$(PY) bench/zmq_floor.py

clean:
	rm -rf $(VENV) artifacts build install log *.egg-info
