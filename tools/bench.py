"""
How fast is it? One command measures, on whatever device is present, and prints the ratios side by side:

    python -m tools.bench            # on CUDA: the gpu preset's model, 8 layers x 512, block 256, vocab 8192
    python -m tools.bench --device=cpu  # small shapes, well under a minute
    python -m tools.bench --steps=50 --out=out/bench_h100.json

  sft       training tokens/s and MFU of an SFT step (forward, backward, AdamW), eager and compiled
  sampling  new tokens/s of generate() with and without the KV cache (batch 64, prompt 64, 64 new tokens)
  pref      the time of one DPO step and one ADPO step on the same triplets (ADPO scores one more reply)

It prints a table and writes every number to --out (out/bench.json by default). Batches are random token
ids already on the device: the model is measured, not the data pipeline. Everything computes in --dtype, as
train.py does (bfloat16 autocast on CUDA by default, float32 elsewhere; --dtype=bfloat16 on CPU too).
"""

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

import adpo
import data
from harness import run_main
from harness.checks import check_device, with_dtype
from harness.configurator import ConfigError, apply_overrides, parse_overrides
from model import GPT, GPTConfig, autocast, compile_model, peak_flops


@dataclass
class BenchSettings:
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # or mps, cuda:1, ...
    dtype: str = ""  # float32 | bfloat16 (model.autocast); empty: bfloat16 on CUDA, else float32
    out: str = "out/bench.json"  # where the numbers are written
    compile: bool = torch.cuda.is_available()  # also measure the compiled SFT step (slow to compile on CPU)
    # the model: the gpu preset's (train.py)
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    block_size: int = 256
    vocab_size: int = 8192
    # sft
    batch_size: int = 128  # windows per step
    steps: int = 20  # steps in a row per timing (SFT and preference), median of 3 such timings
    warmup: int = 5  # untimed steps first (compilation, the allocator, the kernels' first launches)
    # sampling
    sample_batch: int = 64
    prompt_len: int = 64
    new_tokens: int = 64
    sample_runs: int = 3  # timed generate() calls of each kind
    # preference step
    pref_batch_size: int = 64  # triplets per step
    reply_len: int = 48  # tokens of each reply
    seed: int = 1337


CPU_SHAPES = dict(n_layer=2, n_head=2, n_embd=128, block_size=64, vocab_size=512, batch_size=8, steps=10,
                  warmup=2, sample_batch=8, prompt_len=16, new_tokens=16, sample_runs=3, pref_batch_size=8,
                  reply_len=12)


def get_settings(argv):
    """Defaults (the GPU's shapes), then on CPU the small shapes, then the command line's --key=value."""
    overrides = parse_overrides(argv)
    b = apply_overrides(BenchSettings(), {k: v for k, v in overrides.items() if k == "device"})
    if not b.device.startswith("cuda"):
        b = apply_overrides(b, {k: str(v) for k, v in CPU_SHAPES.items()})
    b = with_dtype(apply_overrides(b, overrides))
    check_device(b.device, b.dtype)
    if b.prompt_len + b.new_tokens > b.block_size or b.prompt_len + b.reply_len > b.block_size:
        raise ConfigError(f"--prompt_len plus --new_tokens (or --reply_len) must fit in "
                          f"--block_size={b.block_size}")
    if (b.n_embd % b.n_head
            or min(b.steps, b.sample_runs, b.batch_size, b.sample_batch, b.pref_batch_size) < 1):
        raise ConfigError("--n_embd must be a multiple of --n_head, and steps, runs and batches at least 1")
    return b


def synchronize(device):
    """Wait for the GPU's queued work (CUDA and MPS run asynchronously; a CPU has nothing queued)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device.startswith("mps"):
        torch.mps.synchronize()


def seconds(fn, device, repeat=1):
    """Wall time of one call of fn(), from `repeat` calls in a row. A GPU runs asynchronously: the clock is
    read after synchronize(), so the time is the GPU's work; in between, the CPU queues the next call while
    the GPU works, as in training, so the launches' overhead is hidden as it is there."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / repeat


def seconds_per_call(fns, rounds, warmup, device, repeat=1):
    """The median time per call of each of fns over `rounds` rounds of `repeat` calls, after `warmup`
    untimed calls (compilation, the allocator, the kernels' first launches). The fns take turns, round by
    round, so that a slow moment of a shared machine falls on each alike, and the median ignores it."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, times):
            t.append(seconds(fn, device, repeat))
    return [statistics.median(t) for t in times]


def new_model(b):
    torch.manual_seed(b.seed)
    config = GPTConfig(block_size=b.block_size, vocab_size=b.vocab_size, n_layer=b.n_layer, n_head=b.n_head,
                       n_embd=b.n_embd, dropout=0.0)
    return GPT(config).to(b.device)


def bench_sft(b, compiled):
    """Tokens/s and MFU of one SFT step, or None when compiling fails (compile_model warns)."""
    model = new_model(b)
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), b.device)
    x = torch.randint(data.ENDOFTEXT_ID + 1, b.vocab_size, (b.batch_size, b.block_size), device=b.device)
    y = torch.roll(x, -1, dims=1)
    net = compile_model(model, (b.batch_size, b.block_size), b.device, b.dtype) if compiled else model
    if compiled and net is model:
        return None

    def step():
        with autocast(b.device, b.dtype):
            _, loss = net(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    dt, = seconds_per_call([step], 3, b.warmup, b.device, repeat=b.steps)
    tokens = b.batch_size * b.block_size
    mfu = model.estimate_mfu(tokens, dt) if b.device.startswith("cuda") else None
    return {"tokens_per_s": tokens / dt, "mfu": mfu, "step_s": dt}


def bench_sampling(b):
    """New tokens/s of generate() without and with the KV cache: every row runs to new_tokens (no stop
    token), sampled at temperature 1."""
    model = new_model(b).eval()
    prompts = torch.randint(data.ENDOFTEXT_ID + 1, b.vocab_size, (b.sample_batch, b.prompt_len))
    generator = torch.Generator(device=b.device).manual_seed(b.seed)

    def run(use_cache):
        with autocast(b.device, b.dtype):
            model.generate(prompts, b.new_tokens, use_cache=use_cache, generator=generator)

    times = seconds_per_call([lambda: run(False), lambda: run(True)], b.sample_runs, 1, b.device)
    no_cache, kv_cache = ({"new_tokens_per_s": b.sample_batch * b.new_tokens / dt, "call_s": dt}
                          for dt in times)
    return {"no_cache": no_cache, "kv_cache": kv_cache,
            "kv_cache_speedup": kv_cache["new_tokens_per_s"] / no_cache["new_tokens_per_s"]}


def bench_pref(b):
    """Seconds of one DPO and one ADPO step on the same triplets: the policy's forward over the replies the
    loss needs (DPO: chosen and rejected; ADPO: also the toxic reply, one concatenated forward), the loss,
    backward and AdamW. Reference log-probs are computed once before training in train.py: not timed here."""
    model = new_model(b).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(b.seed)
    ids = lambda n: torch.randint(data.ENDOFTEXT_ID + 1, b.vocab_size, (n,),  # noqa: E731
                                  generator=g).tolist()
    prompts = [ids(b.prompt_len) for _ in range(b.pref_batch_size)]
    batches = {k: tuple(t.to(b.device) for t in data.collate(prompts, [ids(b.reply_len) for _ in prompts]))
               for k in ("chosen", "rejected", "toxic")}
    zeros = torch.zeros(b.pref_batch_size, device=b.device)
    refs = {"ref_chosen_logps": zeros, "ref_rejected_logps": zeros, "toxic_model_toxic_logps": zeros}

    def step(loss_name, replies):
        with autocast(b.device, b.dtype):
            logps = adpo.concatenated_logps(model, [batches[k] for k in replies])
        policy = {f"policy_{k}_logps": lp for k, lp in zip(replies, logps)}
        loss = adpo.call_loss(loss_name, {**policy, **refs, "beta": 0.1, "gamma": 0.1}).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    dpo, adpo_s = seconds_per_call([lambda: step("dpo", ("chosen", "rejected")),
                                    lambda: step("adpo", ("chosen", "rejected", "toxic"))],
                                   3, b.warmup, b.device, repeat=b.steps)
    return {"dpo_step_s": dpo, "adpo_step_s": adpo_s, "adpo_over_dpo": adpo_s / dpo}


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    if device.startswith("mps"):
        return "Apple MPS"
    return f"cpu ({torch.get_num_threads()} threads)"


def table(r):
    """The markdown table: each measurement (B) beside its baseline (A), and the ratio B / A."""
    sft, sampling, pref = r["sft"], r["sampling"], r["pref"]
    eager, compiled = sft["eager"], sft["compiled"]
    missing = "not measured (--compile=true)" if not r["settings"]["compile"] else "compile failed"
    rows = [("SFT tokens/s (A eager, B compiled)", f"{eager['tokens_per_s']:,.0f}",
             f"{compiled['tokens_per_s']:,.0f}" if compiled else missing,
             f"{compiled['tokens_per_s'] / eager['tokens_per_s']:.2f}" if compiled else "")]
    if eager["mfu"] is not None:
        rows.append(("SFT MFU (A eager, B compiled)", f"{100 * eager['mfu']:.1f}%",
                     f"{100 * compiled['mfu']:.1f}%" if compiled else missing, ""))
    rows += [("sampling new tokens/s (A no cache, B KV cache)",
              f"{sampling['no_cache']['new_tokens_per_s']:,.0f}",
              f"{sampling['kv_cache']['new_tokens_per_s']:,.0f}", f"{sampling['kv_cache_speedup']:.1f}"),
             ("preference step, ms (A DPO, B ADPO)", f"{1e3 * pref['dpo_step_s']:.1f}",
              f"{1e3 * pref['adpo_step_s']:.1f}", f"{pref['adpo_over_dpo']:.2f}")]
    return "\n".join(["| measurement | A | B | B / A |", "|---|---:|---:|---:|"] +
                     [f"| {' | '.join(row)} |" for row in rows])


def main(argv):
    b = get_settings(argv)
    if b.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32, as train.py (distributed.setup)
    print(f"bench on {device_name(b.device)}, torch {torch.__version__}, {b.dtype}: "
          f"{b.n_layer} layers x {b.n_embd}, "
          f"block {b.block_size}, vocab {b.vocab_size}; SFT batch {b.batch_size}; "
          f"sampling batch {b.sample_batch}, prompt {b.prompt_len}, {b.new_tokens} new tokens; "
          f"preference batch {b.pref_batch_size}")
    r = {"device": device_name(b.device), "torch": torch.__version__, "dtype": b.dtype,
         "peak_flops": peak_flops() if b.device.startswith("cuda") else None, "settings": asdict(b)}
    r["sft"] = {"eager": bench_sft(b, compiled=False),
                "compiled": bench_sft(b, compiled=True) if b.compile else None}
    r["sampling"] = bench_sampling(b)
    r["pref"] = bench_pref(b)
    print(table(r))
    os.makedirs(os.path.dirname(b.out) or ".", exist_ok=True)
    with open(b.out, "w") as f:
        f.write(json.dumps(r, indent=2) + "\n")
    print(f"written to {b.out}")
    return r


if __name__ == "__main__":
    run_main(main)
