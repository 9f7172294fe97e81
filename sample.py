"""
Toxic-token-conditioned sampling: the dialogue model and its "inner toxic model" are one network.

    python sample.py --prompt="i hate mondays"          # replies of the dialogue model
    python sample.py --prompt="i hate mondays" --toxic  # the same checkpoint with [TOXIC] after the context
    python sample.py --compare=sft,dpo,adpo --toxic     # out/sft.pt, dpo.pt, adpo.pt side by side, same seed
    python sample.py --chat --checkpoint=out/adpo.pt    # talk to it; /toxic, /reset, /quit

As a library: sample_replies(model, tok, contexts, toxic=...) -> one list of Replies per context. A Reply
keeps the text for people and the sampled ids for the code: every later stage scores exactly those ids.
"""

from typing import NamedTuple

import torch
from tqdm import tqdm

from data import EOT_ID, PAD_ID, context_ids, decode
from model import autocast


class Reply(NamedTuple):
    text: str  # for people: the decoded reply, without end-of-turn
    ids: list  # for the code: the sampled ids, end-of-turn included when the model sampled it
    finished: bool  # the model ended the reply itself (False: cut at max_new_tokens, no end-of-turn)


def prompt_ids(model, tok, context, toxic, max_new_tokens):
    """The prompt a reply is sampled from, and scored after: the context cut from the left to leave room for
    max_new_tokens new tokens in the block, then [TOXIC] for the inner toxic model."""
    return context_ids(tok, context, toxic=toxic, max_tokens=model.config.block_size - max_new_tokens)


@torch.no_grad()
def sample_replies(model, tok, contexts, toxic=False, num_samples=1, temperature=1.0, top_k=None, top_p=None,
                   max_new_tokens=48, seed=0, batch_size=64, progress=None, dtype="float32"):
    """num_samples Replies for each context (a list of turns; any lengths batch together), the inner toxic
    model's when toxic=True ([TOXIC] after the context). The same seed gives the same replies. The model
    computes in dtype (model.autocast)."""
    device = model.lm_head.weight.device
    prompts = [prompt_ids(model, tok, ctx, toxic, max_new_tokens) for ctx in contexts]
    flat = [p for p in prompts for _ in range(num_samples)]
    generator = torch.Generator(device=device).manual_seed(seed)
    replies = []
    bar = tqdm(total=len(flat), desc=progress, unit="reply", leave=False, disable=progress is None)
    for i in range(0, len(flat), batch_size):
        with autocast(device, dtype):
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
    """The keyword arguments of sample_replies from train.py's settings (triplets and evaluation)."""
    return dict(temperature=s.temperature, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
                batch_size=s.sample_batch_size, dtype=s.dtype, **extra)


if __name__ == "__main__":  # the command line (tools/chat.py), as `python sample.py ...`
    import runpy
    runpy.run_module("tools.chat", run_name="__main__")
