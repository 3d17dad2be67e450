"""``python -m alignlib gpu-check``: the FLOPs formula, the CPU smoke run of every code path, the no-GPU message,
an out-of-memory measurement recorded instead of raised, and (on a GPU only) the real check with small shapes."""
import json
import math

import pytest
import torch

from alignlib.bench import gpu_check
from alignlib.commands.cli import build_parser, main

pytestmark = pytest.mark.unit


def test_flops_per_token_of_the_tiny_config_by_hand():
    # TINY: hidden 64, 2 layers, 4 heads of 16, 2 kv heads, MLP 128, vocab 512, tied embeddings. Per layer:
    # q 64*64 + 64, k and v 64*32 + 32 each, o 64*64 (no bias), gate/up/down 3 * 64*128, two norms 2*64
    layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert layer == 37120
    blocks = 2 * layer + 64                      # + the final norm; the embedding is not a block parameter
    head = 512 * 64                              # the tied LM head's matmul
    n = blocks + head
    assert n == 107072
    model = gpu_check.build_model(gpu_check.TINY, torch.float32, torch.device("cpu"))
    assert gpu_check.count_params(model) == {"blocks": blocks, "head": head, "total": n}
    # 6 N + 12 L H T at T = 32
    assert gpu_check.flops_per_token(n, 2, 64, 32) == 6 * 107072 + 12 * 2 * 64 * 32 == 691584


def test_peak_from_the_device_name():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") is None
    assert gpu_check.peak_tflops("NVIDIA GeForce RTX 4090") is None


def test_cpu_smoke_writes_every_measurement(tmp_path, capsys):
    path = tmp_path / "gpu_check.json"
    assert main(["gpu-check", "--cpu-smoke", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["n_params"]["total"] == 107072 and record["dtype"] == "float32"
    assert list(record["measurements"]) == ["sft", "rrhf", "ppo", "rollout"]
    for name, row in record["measurements"].items():
        assert row["error"] is None, name
        assert len(row["step_s"]) == 1 and row["warmup"] == 1
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0, name
        assert row["mfu"] is None  # no peak for a CPU
    assert record["measurements"]["sft"]["tokens_per_step"] == 2 * 32
    assert record["measurements"]["rrhf"]["tokens_per_step"] == 2 * 2 * 32
    assert record["measurements"]["rollout"]["tokens_per_step"] == 2 * 4
    assert record["measurements"]["sft"]["flops_per_token"] == 691584
    assert record["measurements"]["rollout"]["flops_per_token"] == 2 * 107072
    assert "rollout" in capsys.readouterr().out


def test_out_of_memory_is_recorded_not_raised(tmp_path, monkeypatch):
    timed = gpu_check.timed

    def failing(fn, *args):
        if fn.__name__ == "rrhf":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        return timed(fn, *args)

    monkeypatch.setattr(gpu_check, "timed", failing)
    args = build_parser().parse_args(["gpu-check", "--cpu-smoke", "--only", "sft", "rrhf", "ppo", "--json",
                                      str(tmp_path / "g.json")])
    rows = gpu_check.main(args)["measurements"]
    assert rows["rrhf"]["error"].startswith("out of memory") and rows["rrhf"]["tokens_per_s"] is None
    assert rows["sft"]["error"] is None and rows["ppo"]["tokens_per_s"] > 0


def test_without_cuda_it_says_so_and_measures_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "gpu_check.json"
    assert main(["gpu-check", "--json", str(path)]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not path.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real check needs a CUDA GPU")
def test_real_check_with_small_shapes_on_the_gpu(tmp_path):
    path = tmp_path / "gpu_check.json"
    assert main(["gpu-check", "--sft-batch", "2", "--sft-len", "128", "--rrhf-prompts", "2", "--rrhf-k", "2",
                 "--rrhf-len", "64", "--ppo-batch", "2", "--ppo-len", "128", "--rollout-batch", "4",
                 "--prompt-len", "16", "--new-tokens", "8", "--warmup", "1", "--steps", "2",
                 "--rollout-steps", "1", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["n_params"]["total"] == 494032768 and record["dtype"] == "bfloat16"
    for name, row in record["measurements"].items():
        assert row["error"] is None, name
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0, name
        assert row["peak_memory_gib"] > 0.9  # the bf16 weights alone
        assert row["mfu"] is None or 0 < row["mfu"] < 1
