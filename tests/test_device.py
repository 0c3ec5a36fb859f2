"""Device settings, checked on a machine without CUDA: how each role's setting resolves, what a GPU would get, and
that every model lands where its role says."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from flwr.app import Context, RecordDict

from fedbridge.errors import ConfigError
from fedbridge.methods.base import Session
from fedbridge.models.device import inference_dtype, resolve_device
from fedbridge.models.loading import load_llm, load_slm
from fedbridge.silo import Silo
from fedbridge.simulations.runner import federation_config


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)


def test_auto_is_the_first_gpu_when_torch_sees_one_else_the_cpu(no_cuda, monkeypatch):
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_a_gpu_that_is_not_there_is_a_one_line_error(no_cuda, monkeypatch):
    with pytest.raises(ConfigError, match=r"device.server=cuda, but torch sees no CUDA device .* use device.server=auto"):
        resolve_device("cuda", "device.server")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"has 2 CUDA device\(s\); use cuda:0 .. cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(ConfigError, match="is not a device"):
        resolve_device("gpu")


def test_frozen_models_get_bfloat16_on_a_gpu_and_float32_on_the_cpu(two_gpus, monkeypatch):
    assert inference_dtype(torch.device("cuda")) == torch.bfloat16
    assert inference_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert inference_dtype(torch.device("cuda")) == torch.float32


def test_device_settings_are_checked_with_the_config(tmp_path):
    with pytest.raises(ConfigError, match="device.silo='gpu' is not a device"):
        tiny_config(tmp_path, **{"device.silo": "gpu"})
    with pytest.raises(ConfigError, match="device.gpus-per-silo must be >= 0"):
        tiny_config(tmp_path, **{"device.gpus-per-silo": -0.5})


def test_a_supernode_s_node_config_device_overrides_the_run_s_device_silo(tmp_path, no_cuda):
    cfg = tiny_config(tmp_path, **{"device.silo": "cuda"})

    def silo(node_config):
        context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                          run_config=cfg.to_run_config())
        return Silo.from_context(context)

    own = silo({"partition-id": 0, "device": "cpu"})
    assert own.device == torch.device("cpu") and own.new_slm().device == torch.device("cpu")
    with pytest.raises(ConfigError, match="this silo's device .* torch sees no CUDA"):
        silo({"partition-id": 1}).device  # the run's device.silo, on a silo without a GPU


def test_the_server_resolves_device_server_on_its_own_machine(tmp_path, no_cuda):
    server = Session(grid=None, cfg=tiny_config(tmp_path, **{"device.server": "cpu"}), record=None, task=None,
                     global_test=None, checkpoint=None)
    assert server.device == torch.device("cpu")
    model, _ = load_llm("tiny-llama", trainable=True, device=server.device)
    slm = load_slm("tiny-bert", 3, device=server.device)
    assert {p.device for p in [*model.parameters(), *slm.parameters()]} == {torch.device("cpu")}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # what trains stays float32


def test_the_simulation_engine_gives_each_silo_its_share_of_cores_and_gpus(tmp_path):
    cfg = tiny_config(tmp_path, **{"device.gpus-per-silo": 0.1, "device.cpus-per-silo": 2})
    assert federation_config(cfg) == "num-supernodes=2 client-resources-num-cpus=2 client-resources-num-gpus=0.1"
    assert federation_config(tiny_config(tmp_path)).endswith("client-resources-num-gpus=0")
