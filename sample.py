"""
Toxic-token-conditioned sampling: the dialogue model and its "inner toxic model" are one network.

    python sample.py --prompt="i hate mondays"            # replies of the dialogue model
    python sample.py --prompt="i hate mondays" --toxic    # the same checkpoint with [TOXIC] after the context

As a library: sample_replies(model, tok, contexts, toxic=...) -> one list of Replies per context. A Reply keeps
the text for people and the sampled ids for the code: every later stage scores exactly those ids.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from tqdm import tqdm

from artifacts import load_checkpoint, run_main
from configurator import ConfigError, apply_overrides, check_rules, parse_overrides
from data import EOT_ID, PAD_ID, context_ids, decode


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
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


class Reply(NamedTuple):
    text: str  # for people: the decoded reply, without end-of-turn
    ids: list  # for the code: the sampled ids, end-of-turn included when the model sampled it
    finished: bool  # the model ended the reply itself (False: cut at max_new_tokens, no end-of-turn)


RULES = [  # (settings, rule, what the rule asks), checked before the checkpoint is read
    ("prompt", lambda v: any(t.strip() for t in v.split(" | ")), "some text (turns separated by \" | \")"),
    ("num_samples max_new_tokens", lambda v: v >= 1, "at least 1"),
    ("temperature", lambda v: v >= 0, "at least 0 (0: greedy)"),
    ("top_k", lambda v: v is None or v >= 1, "at least 1 (or none: all tokens)"),
    ("top_p", lambda v: v is None or 0 < v <= 1, "in (0, 1] (or none: off)"),
]


def prompt_ids(model, tok, context, toxic, max_new_tokens):
    """The prompt a reply is sampled from, and scored after: the context cut from the left to leave room for
    max_new_tokens new tokens in the block, then [TOXIC] for the inner toxic model."""
    return context_ids(tok, context, toxic=toxic, max_tokens=model.config.block_size - max_new_tokens)


@torch.no_grad()
def sample_replies(model, tok, contexts, toxic=False, num_samples=1, temperature=1.0, top_k=None, top_p=None,
                   max_new_tokens=48, seed=0, batch_size=64, progress=None):
    """Sample num_samples replies for each context (a list of turns). With toxic=True the control token comes
    after the context, so the reply is the inner toxic model's. A reply ends at end-of-turn (finished) or after
    max_new_tokens (not finished). Returns a list (one per context) of lists of num_samples Replies. The same
    seed gives the same replies; the contexts are batched together whatever their lengths."""
    device = model.lm_head.weight.device
    prompts = [prompt_ids(model, tok, ctx, toxic, max_new_tokens) for ctx in contexts]
    flat = [p for p in prompts for _ in range(num_samples)]
    generator = torch.Generator(device=device).manual_seed(seed)
    replies = []
    bar = tqdm(total=len(flat), desc=progress, unit="reply", leave=False, disable=progress is None)
    for i in range(0, len(flat), batch_size):
        out = model.generate(flat[i:i + batch_size], max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, stop_token=EOT_ID, pad_token=PAD_ID, generator=generator)
        for ids in out:
            finished = ids[-1] == EOT_ID
            replies.append(Reply(decode(tok, ids[:-1] if finished else ids).strip(), ids, finished))
        bar.update(len(out))
    bar.close()
    return [replies[i * num_samples:(i + 1) * num_samples] for i in range(len(contexts))]


def as_replies(rows):
    """Replies read back from JSON ([text, ids, finished] each) -> Replies, nested as they were."""
    if rows and isinstance(rows[0], str):
        return Reply(*rows)
    return [as_replies(r) for r in rows]


def sampling_settings(s, **extra):
    """The keyword arguments of sample_replies that come from train.py's settings (triplets and evaluation)."""
    return dict(temperature=s.temperature, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
                batch_size=s.sample_batch_size, **extra)


def main(argv):
    s = apply_overrides(SampleSettings(), parse_overrides([a if "=" in a else a + "=true" for a in argv]))
    check_rules(s, RULES)
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but CUDA is not available")
    model, tok, _ = load_checkpoint(s.checkpoint, s.device)
    if s.max_new_tokens >= model.config.block_size:
        raise ConfigError(f"--max_new_tokens={s.max_new_tokens} must be below the model's block size "
                          f"({model.config.block_size})")
    context = [t.strip() for t in s.prompt.split(" | ") if t.strip()]
    replies = sample_replies(model, tok, [context], toxic=s.toxic, num_samples=s.num_samples,
                             temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                             max_new_tokens=s.max_new_tokens, seed=s.seed)[0]
    print(f"context: {' | '.join(context)}" + ("   [TOXIC]" if s.toxic else ""))
    for r in replies:
        print(f"  > {r.text}" + ("" if r.finished else " ..."))


if __name__ == "__main__":
    run_main(main)
