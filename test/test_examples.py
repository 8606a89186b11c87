"""examples/sim_policy_client.py: the cell driven through PolicyClient, in-process and from a policy server."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from mm_fusion_ros.config import load_config
from mm_fusion_ros.engine import create_engine, model_fingerprint
from mm_fusion_ros.remote.server import PolicyServer
from mm_fusion_ros.runtime import load_model

from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SIM_YAML = REPO / "config" / "sim.yaml"


@pytest.fixture(scope="module")
def example():
    return load_script("sim_policy_client", REPO / "examples" / "sim_policy_client.py")


def _report(out: str) -> dict:
    m = re.search(r"(\d+) ticks in .*?: (\d+) commanded, (\d+) at rest after a failed step, (\d+) samples dropped", out)
    assert m, out
    return dict(zip(("ticks", "commanded", "rested", "dropped"), map(int, m.groups())))


def test_the_example_runs_the_cell_in_process(example, capsys):
    torch.set_num_threads(1)
    assert example.main(["--config", str(SIM_YAML), "--backend", "torch", "--seconds", "1"]) == 0
    r = _report(capsys.readouterr().out)
    # One second at 100 Hz (the loop's last tick may land on the second); the first ticks wait for
    # every required input (the safety filter holds).
    assert 100 <= r["ticks"] <= 101 and r["rested"] == 0 and r["dropped"] == 0
    assert 50 <= r["commanded"] <= r["ticks"]


def test_the_example_runs_the_cell_against_a_policy_server(example, capsys):
    cfg = load_config(SIM_YAML)
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, backend="torch"))
    model = load_model(cfg)
    server = PolicyServer([create_engine(cfg, model, "torch", log=lambda _: None)], model_fingerprint(model),
                          "tcp://127.0.0.1:*", log=lambda _: None).start()
    try:
        # A deadline that a shared test machine keeps (the default 5 ms is for a server on its own cores).
        assert example.main(["--config", str(SIM_YAML), "--endpoint", server.endpoint, "--timeout-ms", "500",
                             "--seconds", "1"]) == 0
    finally:
        server.stop()
    out = capsys.readouterr().out
    r = _report(out)
    assert 100 <= r["ticks"] <= 101 and r["rested"] == 0 and r["commanded"] >= 50
    assert re.search(r"engine: remote tcp://127\.0\.0\.1:\d+: rtt p50 [\d.]+ ms", out), out
