"""
sample.py's command line: replies of one checkpoint to a prompt, several checkpoints side by side, or a chat.

    python sample.py --prompt="i hate mondays"          # replies of the dialogue model
    python sample.py --prompt="i hate mondays" --toxic  # the same checkpoint with [TOXIC] after the context
    python sample.py --compare=sft,dpo,adpo --toxic     # out/sft.pt, dpo.pt, adpo.pt side by side, same seed
    python sample.py --chat --checkpoint=out/adpo.pt    # talk to it; /toxic, /reset, /quit

(`python -m tools.chat ...` is the same command.)
"""

import itertools
import os
import shutil
import sys
import textwrap
from dataclasses import dataclass
from typing import Optional

import torch

from data import context_ids
from harness import run_main
from harness.checks import SAMPLE_RULES, RunError, check_device, load_checkpoint, with_dtype
from harness.configurator import ConfigError, apply_overrides, check_rules, parse_overrides
from sample import sample_replies


@dataclass
class SampleSettings:
    checkpoint: str = "out/sft.pt"  # a checkpoint written by train.py (sft.pt, dpo.pt, adpo.pt)
    prompt: str = "i hate mondays"  # the context; separate several turns with " | "
    toxic: bool = False  # place the control token after the context (the inner toxic model)
    num_samples: int = 5  # replies to print
    temperature: float = 1.0  # 0 is greedy
    top_k: Optional[int] = 50  # keep the k most likely tokens (none: all)
    top_p: Optional[float] = None  # nucleus sampling (none: off)
    max_new_tokens: int = 48  # longest reply, in tokens
    seed: int = 1337
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # or mps (a Mac), cuda:1, ...
    dtype: str = ""  # float32 | bfloat16 (model.autocast); empty: bfloat16 on CUDA, else float32
    compare: str = ""  # checkpoints in out_dir side by side, e.g. sft,dpo,adpo (--toxic adds sft + [TOXIC])
    out_dir: str = "out"  # where --compare finds its checkpoints
    chat: bool = False  # talk with --checkpoint turn by turn (/toxic, /reset, /quit); stdin, piped or not




def replies_kwargs(s, model):
    """The sampling settings of the command line, the same for every checkpoint and every turn."""
    if s.max_new_tokens > model.config.block_size - 2:  # room for a reply, one context token and [TOXIC]
        raise ConfigError(f"--max_new_tokens={s.max_new_tokens} leaves no room for a context in the block of "
                          f"{model.config.block_size} tokens")
    return dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                dtype=s.dtype)


def shown(reply):
    """A reply as the command line prints it: ... when it was cut at max_new_tokens."""
    return (reply.text or "(empty)") + ("" if reply.finished else " ...")


def compare(s, context):
    """Print the replies of each --compare checkpoint (with --toxic also sft.pt + [TOXIC]) to one context in
    columns, all sampled with the same seed and settings: the checkpoints are the only difference."""
    columns = [(name, name, False) for name in s.compare.split(",") if name]  # (title, checkpoint, toxic)
    if s.toxic:
        columns.append(("sft + [TOXIC]", "sft", True))
    paths = {ckpt: os.path.join(s.out_dir, f"{ckpt}.pt") for _, ckpt, _ in columns}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:  # all of them named before any is loaded
        raise RunError(f"no checkpoint at {', '.join(missing)}; run `python train.py` first "
                                f"(or pass --out_dir=...)")
    replies = {}
    for title, ckpt, toxic in columns:
        model, tok, _ = load_checkpoint(paths[ckpt], s.device)
        replies[title] = sample_replies(model, tok, [context], toxic=toxic, num_samples=s.num_samples,
                                        seed=s.seed, **replies_kwargs(s, model))[0]
    width = max(16, (shutil.get_terminal_size((120, 24)).columns - 4) // len(columns) - 3)
    print(f"context: {' | '.join(context)}   (seed {s.seed}, temperature {s.temperature}, top_k {s.top_k})")
    print(" | ".join(title.ljust(width) for title, _, _ in columns).rstrip())
    print("-+-".join("-" * width for _ in columns))
    for i in range(s.num_samples):
        cells = [textwrap.wrap(shown(replies[title][i]), width) for title, _, _ in columns]
        for line in itertools.zip_longest(*cells, fillvalue=""):
            print(" | ".join(cell.ljust(width) for cell in line).rstrip())
        print()


def fit_history(tok, history, max_tokens):
    """The last turns of history whose ids fit in max_tokens: the oldest turns are dropped whole, so the
    model never reads half a turn (only a single turn longer than the room is cut, by prompt_ids)."""
    while len(history) > 1 and len(context_ids(tok, history)) > max_tokens:
        history = history[1:]
    return history


def read_line(prompt):
    """One line of input. When stdin is a pipe or a file, echo it after the prompt, so the transcript reads
    as a conversation. EOFError at the end of the input."""
    if sys.stdin.isatty():
        return input(prompt)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    print(prompt + line.rstrip("\n"))
    return line


def chat(s):
    """A conversation with --checkpoint: both sides' turns so far are the context of each reply. /toxic
    toggles [TOXIC] (the inner toxic model answers), /reset clears the history and [TOXIC], /quit ends."""
    model, tok, _ = load_checkpoint(s.checkpoint, s.device)
    kw = replies_kwargs(s, model)
    room = model.config.block_size - s.max_new_tokens - 1  # the context, and [TOXIC] when it is on
    history = []
    toxic = False
    turn = 0
    print(f"chatting with {s.checkpoint}: /toxic toggles the control token, /reset clears the history, "
          "/quit ends")
    while True:
        try:
            line = read_line("you> ").strip()
        except EOFError:
            break
        if line == "/quit":
            break
        if line == "/reset":
            history = []
            toxic = False
            print("(history cleared, [TOXIC] off)")
            continue
        if line == "/toxic":
            toxic = not toxic
            print("([TOXIC] on: the inner toxic model replies)" if toxic else "([TOXIC] off)")
            continue
        if line.startswith("/"):
            print(f"(unknown command {line}; /toxic, /reset or /quit)")
            continue
        if not line:
            continue
        history = fit_history(tok, history + [line], room)
        reply = sample_replies(model, tok, [history], toxic=toxic, seed=s.seed + turn, **kw)[0][0]
        print(("bot[TOXIC]> " if toxic else "bot> ") + shown(reply))
        history = history + [reply.text]
        turn += 1  # a new seed each turn: the same input twice need not give the same reply


def main(argv):
    s = apply_overrides(SampleSettings(), parse_overrides([a if "=" in a else a + "=true" for a in argv]))
    s = with_dtype(s)
    check_rules(s, SAMPLE_RULES)
    check_device(s.device, s.dtype)
    context = [t.strip() for t in s.prompt.split(" | ") if t.strip()]
    if s.chat:
        return chat(s)
    if not context:
        raise ConfigError("--prompt is empty: give at least one turn")
    if s.compare:
        return compare(s, context)
    model, tok, _ = load_checkpoint(s.checkpoint, s.device)
    replies = sample_replies(model, tok, [context], toxic=s.toxic, num_samples=s.num_samples, seed=s.seed,
                             **replies_kwargs(s, model))[0]
    print(f"context: {' | '.join(context)}" + ("   [TOXIC]" if s.toxic else ""))
    for r in replies:
        print(f"  > {shown(r)}")


if __name__ == "__main__":
    run_main(main)
