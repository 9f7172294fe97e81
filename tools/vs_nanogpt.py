"""
Our SFT step against nanoGPT's, side by side: is our model as fast as the anchor it learns from?

    git clone https://github.com/karpathy/nanoGPT ../nanoGPT        # never part of this repository
    python -m tools.vs_nanogpt --nanogpt=../nanoGPT/model.py        # median of 9 interleaved rounds, on CPU

Both models get the same config (the cpu preset's: 4 layers x 192, 4 heads, block 128, vocabulary 4096,
dropout 0, biases), the same weights (ours copied into nanoGPT's, parameter by parameter: both use GPT-2's
names) and the same batch (32 x 128, a fifth of the targets -1, as prompt tokens are). A step is what
train_sft does: forward with targets, backward, gradient clipping at 1.0, AdamW (each model's own
configure_optimizers: weight decay on matrices only, as both do), zero_grad. Before timing, one forward must
give the same loss (to float32 rounding): the two compute the same function, or the ratio means nothing.

nanoGPT's MLP uses the exact (erf) GELU, ours GPT-2's tanh approximation: on a CPU the tanh kernel is the
slower one (docs/results.md). So a third model is timed beside them: nanoGPT's with GPT-2's GELU (its
`mlp.gelu` modules replaced), the same function as ours, which isolates what the implementations cost.

A round runs `warmup` untimed steps of each model, then `steps` timed steps of each, the models taking turns
step by step; the rounds rotate which model goes first. The machine is shared: a round during which other
processes used more than --max_load cores (from /proc/stat, Linux) is run again, up to 5 times as many rounds
in all. It prints each round's tokens/s, and the ratios ours / nanoGPT and ours / nanoGPT-with-tanh-GELU as
medians with their ranges; every number goes to --out (out/vs_nanogpt.json).
"""

import contextlib
import importlib.util
import io
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from harness import run_main
from harness.configurator import ConfigError, apply_overrides, parse_overrides
from model import GPT, GPTConfig

CONFIG = dict(n_layer=4, n_head=4, n_embd=192, block_size=128, vocab_size=4096, dropout=0.0, bias=True)


@dataclass
class Settings:
    nanogpt: str = "../nanoGPT/model.py"  # nanoGPT's model.py (github.com/karpathy/nanoGPT)
    rounds: int = 9  # interleaved rounds; the ratio is their median
    warmup: int = 2  # untimed steps of each model per round
    steps: int = 4  # timed steps of each model per round
    batch_size: int = 32
    max_load: float = 0.1  # redo a round when other processes used more cores than this (2: never redo)
    seed: int = 0
    out: str = "out/vs_nanogpt.json"


def load_nanogpt(path):
    """nanoGPT's model module, imported from its file."""
    if not os.path.isfile(path):
        raise ConfigError(f"--nanogpt={path}: no such file; clone github.com/karpathy/nanoGPT and give its "
                          "model.py")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nanogpt_copy(nanogpt, ours, tanh_gelu=False):
    """nanoGPT's GPT with our weights, in train mode; with tanh_gelu, GPT-2's GELU in its MLPs."""
    with contextlib.redirect_stdout(io.StringIO()):  # nanoGPT prints its parameter count
        theirs = nanogpt.GPT(nanogpt.GPTConfig(**CONFIG))
    mine, other = ours.state_dict(), theirs.state_dict()
    extra = set(other) - set(mine)  # nanoGPT's causal-mask buffer exists only without flash attention
    if set(mine) - set(other) or not all(k.endswith(".attn.bias") for k in extra):
        raise ConfigError("--nanogpt: not nanoGPT's model.py (the parameter names differ from GPT-2's)")
    with torch.no_grad():
        for name, w in mine.items():
            other[name].copy_(w)
    if tanh_gelu:
        for block in theirs.transformer.h:
            if not isinstance(getattr(block.mlp, "gelu", None), torch.nn.GELU):  # else the swap does nothing
                raise ConfigError("--nanogpt: its MLP has no `gelu` module to give GPT-2's GELU")
            block.mlp.gelu = torch.nn.GELU(approximate="tanh")
    return theirs.train()


def three_models(nanogpt, seed):
    """ours, nanoGPT's, and nanoGPT's with GPT-2's GELU, all with the same weights, in train mode."""
    torch.manual_seed(seed)
    ours = GPT(GPTConfig(**CONFIG)).train()
    return {"ours": ours, "nanoGPT": nanogpt_copy(nanogpt, ours),
            "nanoGPT_tanh": nanogpt_copy(nanogpt, ours, tanh_gelu=True)}


def sft_batch(batch_size, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, CONFIG["vocab_size"], (batch_size, CONFIG["block_size"] + 1), generator=g)
    x, y = ids[:, :-1].clone(), ids[:, 1:].clone()
    y[torch.rand(y.shape, generator=g) < 0.2] = -1  # targets the loss ignores, as prompt tokens are
    return x, y


def step(model, optimizer, x, y):
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def cpu_ticks():
    """(the machine's busy clock ticks, this process's): their difference is the other processes'."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    with open("/proc/self/stat") as f:
        mine = f.read().rsplit(")", 1)[1].split()
    return sum(ticks) - ticks[3] - ticks[4], int(mine[11]) + int(mine[12])  # all but idle and iowait


def others_load(before, after, seconds):
    """The cores other processes used, on average, between two cpu_ticks(); 0 where /proc is missing."""
    if before is None:
        return 0.0
    return max(0, (after[0] - before[0]) - (after[1] - before[1])) / os.sysconf("SC_CLK_TCK") / seconds


def timed_round(models, optimizers, x, y, warmup, steps, order):
    """tokens/s of each model over `steps` steps, the models taking turns step by step."""
    for name in order:
        for _ in range(warmup):
            step(models[name], optimizers[name], x, y)
    spent = dict.fromkeys(order, 0.0)
    for _ in range(steps):
        for name in order:
            t0 = time.perf_counter()
            step(models[name], optimizers[name], x, y)
            spent[name] += time.perf_counter() - t0
    return {name: steps * x.numel() / spent[name] for name in order}


def main(argv):
    s = apply_overrides(Settings(), parse_overrides(argv))
    if min(s.rounds, s.steps, s.batch_size) < 1 or s.warmup < 0:
        raise ConfigError("--rounds, --steps and --batch_size must be at least 1, --warmup at least 0")
    models = three_models(load_nanogpt(s.nanogpt), s.seed)
    x, y = sft_batch(s.batch_size, s.seed + 1)
    with torch.no_grad():
        losses = {name: m(x, y)[1].item() for name, m in models.items()}
    # the same weights and the same function (to float32 rounding; erf and tanh GELU differ by about 1e-6)
    if abs(losses["nanoGPT_tanh"] - losses["ours"]) > 1e-5 or abs(losses["nanoGPT"] - losses["ours"]) > 1e-4:
        raise ConfigError(f"the models compute different losses on the same weights ({losses}): not the same "
                          "function, no ratio to measure")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; same weights, losses "
          f"{', '.join(f'{k} {v:.6f}' for k, v in losses.items())}; {s.rounds} rounds of {s.steps} steps, "
          f"batch {s.batch_size} x {CONFIG['block_size']}")
    with contextlib.redirect_stdout(io.StringIO()):
        optimizers = {name: m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
                      for name, m in models.items()}
    proc = os.path.isfile("/proc/stat")
    rounds, redone = [], 0
    while len(rounds) < s.rounds:
        names = list(models)
        order = names[len(rounds) % 3:] + names[:len(rounds) % 3]  # who goes first rotates
        before, t0 = cpu_ticks() if proc else None, time.perf_counter()
        speed = timed_round(models, optimizers, x, y, s.warmup, s.steps, order)
        load = others_load(before, cpu_ticks() if proc else None, time.perf_counter() - t0)
        if load > s.max_load and redone < 4 * s.rounds:
            redone += 1
            print(f"  round run again: other processes used {load:.2f} cores meanwhile", flush=True)
            continue
        rounds.append({"tokens_per_s": speed, "others_load": load})
        shown = ", ".join(f"{name} {speed[name]:,.0f}" for name in models)
        print(f"round {len(rounds)}: tokens/s {shown}", flush=True)
    result = {"rounds": rounds, "rounds_run_again": redone, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "settings": asdict(s), "config": CONFIG}
    for other in ("nanoGPT", "nanoGPT_tanh"):
        ratios = [r["tokens_per_s"]["ours"] / r["tokens_per_s"][other] for r in rounds]
        result[f"ours_over_{other}"] = {"median": statistics.median(ratios),
                                        "range": [min(ratios), max(ratios)]}
        print(f"SFT step, ours / {other} (tokens/s): median {statistics.median(ratios):.3f}, range "
              f"{min(ratios):.3f} to {max(ratios):.3f} ({len(rounds)} rounds, {redone} run again)")
    os.makedirs(os.path.dirname(s.out) or ".", exist_ok=True)
    with open(s.out, "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_main(main)
