"""The fusion network: pure torch, no ROS and no I/O beyond checkpoints."""

from .network import (INPUT_NAMES, OUTPUT_NAMES, FusionNet, TensorSpec, build_model, config_mismatch,
                      input_specs, load_checkpoint, output_specs, read_checkpoint, save_checkpoint)

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "FusionNet", "TensorSpec", "build_model", "config_mismatch",
           "input_specs", "load_checkpoint", "output_specs", "read_checkpoint", "save_checkpoint"]
