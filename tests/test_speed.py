"""
Tests of the speed work: bench.py, torchrun (distributed.py), the compile fallback and the sampling path.

    OMP_NUM_THREADS=1 pytest -q test_speed.py
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import model as model_module
from conftest import generate_with_logits
from harness import distributed
from harness.configurator import ConfigError
from model import GPT, GPTConfig, KVCache
from tools import bench

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def test_bench_runs_on_cpu_and_writes_its_json(tmp_path):
    """In bf16 (float32 is the CPU's default; bf16 is CUDA's, and runs on a CPU too)."""
    assert bench.get_settings(["--device=cpu"]).dtype == "float32"
    out = tmp_path / "bench.json"
    bench.main(["--device=cpu", "--dtype=bfloat16", "--steps=1", "--warmup=0", "--sample_runs=1", f"--out={out}"])
    r = json.loads(out.read_text())
    assert r["dtype"] == "bfloat16"
    assert r["sft"]["eager"]["tokens_per_s"] > 0 and r["sft"]["eager"]["mfu"] is None  # no peak for a CPU
    assert r["sft"]["compiled"] is None  # off by default on CPU
    cache, no_cache = r["sampling"]["kv_cache"], r["sampling"]["no_cache"]
    assert r["sampling"]["kv_cache_speedup"] == pytest.approx(cache["new_tokens_per_s"] / no_cache["new_tokens_per_s"])
    assert r["pref"]["adpo_over_dpo"] == pytest.approx(r["pref"]["adpo_step_s"] / r["pref"]["dpo_step_s"])
    assert r["settings"]["n_embd"] == bench.CPU_SHAPES["n_embd"]  # the small shapes on CPU


def test_bench_rejects_bad_settings():
    with pytest.raises(ConfigError, match="must fit in --block_size=64"):
        bench.get_settings(["--device=cpu", "--prompt_len=60"])  # bench.py's main turns it into one error: line
    with pytest.raises(ConfigError, match="unknown setting --stpes"):
        bench.get_settings(["--stpes=3"])


def test_split_and_gather_keep_every_item_once_in_order(monkeypatch):
    items = list(range(10))
    shares = []
    for r in range(3):  # the share of each of 3 processes
        monkeypatch.setattr(distributed, "rank", lambda: r)
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        shares.append(distributed.split(items))
    monkeypatch.undo()
    assert sum(shares, []) == items
    assert sorted(len(x) for x in shares) == [3, 3, 4]
    assert distributed.split(items) == items and distributed.gather(items) == items  # one process: unchanged


def test_batches_must_split_over_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.check_batches(batch_size=4, grad_accum=2, pref_batch_size=8)
    with pytest.raises(ConfigError, match="with 2 processes"):
        distributed.check_batches(batch_size=3, grad_accum=2, pref_batch_size=8)  # a piece without a window
    with pytest.raises(ConfigError, match="with 2 processes"):
        distributed.check_batches(batch_size=4, grad_accum=1, pref_batch_size=7)  # unequal shares of triplets


def test_micro_batches_give_the_gradient_of_the_global_mean():
    """grad_accum pieces with unequal numbers of target tokens sum to the whole batch's gradient."""
    model = tiny_gpt().train()
    x = torch.randint(4, 64, (6, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, 1)
    y[:2, :12] = -1  # the first piece has far fewer target tokens than the others
    model(x, y)[1].backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    pieces = list(distributed.micro_batches(model, x, y, grad_accum=3))  # one process: no DDP context
    assert [xs.size(0) for xs, _, _ in pieces] == [2, 2, 2]
    for xs, ys, weight in pieces:
        (model(xs, ys)[1] * weight).backward()
    for g, p in zip(whole, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_compile_failure_warns_in_one_line_and_trains_eager(monkeypatch, capsys):
    def broken(module):
        def call(*args):
            raise RuntimeError("no C compiler found\nmore lines of compiler output")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    model = tiny_gpt()
    assert model_module.compile_model(model, (2, 8), "cpu") is model
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("warning: torch.compile failed (RuntimeError: no C compiler found)")
    assert all(p.grad is None for p in model.parameters())


def cxx_compiler():
    return next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


@pytest.mark.skipif(cxx_compiler() is None, reason="no C++ compiler (g++, c++, clang++) on PATH: torch.compile's "
                    "inductor builds its CPU kernels with one")
def test_a_compiled_training_step_on_cpu_matches_the_eager_step():
    """torch.compile for real, on the CPU (inductor writes C++ and builds it), through compile_model as
    --compile does: it compiles (no fallback to eager), and an SFT step of the compiled model (forward,
    backward, clipping, AdamW) has the eager step's loss and gradients to float32 rounding, and trains.
    Inductor keeps what it built in its cache (/tmp/torchinductor_USER): about 30 s on 2 cores the first
    time, 4 s after. (Not the weights after AdamW: its first step moves a weight by about lr * sign(grad),
    so a gradient of 1e-9 against 1e-9 + rounding may move it the other way.)"""
    torch._dynamo.reset()
    x = torch.randint(4, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, 1)
    steps = {}
    for kind in ("eager", "compiled"):
        model = tiny_gpt().train()
        net = model_module.compile_model(model, (4, 16), "cpu") if kind == "compiled" else model
        assert (net is model) == (kind == "eager"), "torch.compile fell back to eager"
        optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
        _, loss = net(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        steps[kind] = loss.item(), [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert net(x, y)[1].item() < loss.item()  # it trains: the next step's loss is lower
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the model, and inductor compiled it
    assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] >= 1
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = steps["eager"], steps["compiled"]
    assert compiled_loss == pytest.approx(eager_loss, abs=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(eager_grads, compiled_grads)) < 1e-5


def test_prefill_logits_of_the_last_position_only_and_a_fixed_shape_cache():
    model = tiny_gpt()
    idx = torch.randint(4, 64, (3, 10))
    positions = torch.arange(10).expand(3, 10)
    mask = torch.ones(10, 10, dtype=torch.bool).tril()[None, None].expand(3, 1, 10, 10)
    full = model._forward_sampling(idx, positions, mask)
    last = model._forward_sampling(idx, positions, mask, last_only=True)
    assert last.shape == (3, 1, 64) and torch.allclose(last[:, 0], full[:, -1], atol=1e-5)
    # the cache takes the dtype of its keys (bf16 under autocast) and always returns its whole length
    cache = KVCache(model.config, batch_size=3, max_len=20)
    k = torch.randn(3, 2, 10, 16, dtype=torch.bfloat16)
    keys, _ = cache.update(0, k, k)
    assert keys.dtype == torch.bfloat16 and keys.shape == (3, 2, 20, 16)
    assert torch.equal(keys[:, :, :10], k) and not keys[:, :, 10:].any()


def test_generate_under_bf16_autocast_runs_with_a_bf16_cache():
    """What sampling does on CUDA, on the CPU's bf16 autocast: it runs with the cache in bf16, and the logits
    it samples from are float32 (top-k and top-p over bf16 logits would tie many tokens)."""
    model = tiny_gpt()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, logits = generate_with_logits(model, [[5, 6, 7], [8]], 6, temperature=0)
    assert [len(r) for r in out] == [6, 6] and logits.dtype == torch.float32
    _, reference = generate_with_logits(model, [[5, 6, 7], [8]], 1, temperature=0)
    assert torch.allclose(logits[:, 0], reference[:, 0], atol=0.1)  # bf16 rounding, not another model


def sft_losses(out_dir):
    with open(os.path.join(out_dir, "metrics_sft.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_processes_complete_and_match_one_process(tmp_path):
    """2 processes (gloo) run every stage and write the report, and their SFT loss curve is the single
    process's with the same global batch. Both draw the same global batches (same generator) and start from
    the same weights; each process takes half the rows and weighs its loss by its share of the target tokens,
    so the gradient is the same mean. What is left is the order of the float sums (two half-batch gradients
    averaged instead of one): about 1e-6 here. Dropout is 0 in the tiny preset (its RNG would differ)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    short = ["--preset=tiny", "--sft_iters=20", "--log_interval=1", "--eval_interval=20", "--pref_iters=2",
             "--pref_contexts=8", "--eval_contexts=4", "--ppl_replies=8"]
    multi = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "train.py", *short,
                            f"--out_dir={tmp_path / 'two'}"], capture_output=True, text=True, cwd=HERE, env=env,
                           timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert {"sft", "dpo", "adpo"} <= set(report)
    assert not [f for f in os.listdir(tmp_path / "two") if f.endswith(".tmp")]
    assert multi.stdout.count("done in") == 1  # rank 0 prints for all
    single = subprocess.run([sys.executable, "train.py", *short, "--stages=sft", f"--out_dir={tmp_path / 'one'}"],
                            capture_output=True, text=True, cwd=HERE, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    one, two = sft_losses(tmp_path / "one"), sft_losses(tmp_path / "two")
    assert len(one) == len(two) == 20
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4, list(zip(one, two))
