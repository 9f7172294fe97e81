"""model.py: the GPT's forward and loss, its optimizer groups, the KV cache, and sampling (generate and
sample_next: greedy, seeded, top-k, top-p, stop tokens). The tiny_gpt fixture is in conftest.py."""

import math

import pytest
import torch

from conftest import generate_with_logits
from model import sample_next

# ----------------------------------------------------------------------------------------------------------
# the GPT


def test_gpt_shapes_and_loss(tiny_gpt):
    model = tiny_gpt()
    idx = torch.randint(0, 64, (3, 20))
    logits, loss = model(idx)
    assert logits.shape == (3, 20, 64) and loss is None
    targets = torch.randint(0, 64, (3, 20))
    logits, loss = model(idx, targets)
    assert abs(loss.item() - math.log(64)) < 0.3  # about uniform at init
    targets[:, :10] = -1  # ignored positions do not count
    _, masked = model(idx, targets)
    manual = torch.nn.functional.cross_entropy(logits[:, 10:].reshape(-1, 64), targets[:, 10:].reshape(-1))
    assert torch.allclose(masked, manual, atol=1e-5)
    names = dict(model.named_parameters())
    assert {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.ln_f.weight",
            "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"} <= set(names)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


def test_weight_decay_only_on_matrices(tiny_gpt):
    groups = tiny_gpt().configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


# ----------------------------------------------------------------------------------------------------------
# generate: the KV cache and sampling


def test_kv_cache_matches_full_forward(tiny_gpt):
    model = tiny_gpt()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # different lengths in one batch
    cached, cached_logits = generate_with_logits(model, prompts, 10, temperature=0, use_cache=True)
    full, full_logits = generate_with_logits(model, prompts, 10, temperature=0, use_cache=False)
    assert cached == full
    assert torch.allclose(cached_logits, full_logits, atol=1e-4)
    # each row is generated as if it were alone: the left padding changes nothing
    for prompt, row in zip(prompts, cached):
        assert model.generate([prompt], 10, temperature=0) == [row]
        # and the first step's logits equal the training forward's last position
        logits, _ = model(torch.tensor([prompt]))
        _, alone_logits = generate_with_logits(model, [prompt], 1, temperature=0)
        assert torch.allclose(logits[0, -1], alone_logits[0, 0], atol=1e-4)


def test_greedy_is_deterministic_and_seeded_sampling_repeats(tiny_gpt):
    model = tiny_gpt()
    prompts = [[3, 4, 5], [6]]
    assert model.generate(prompts, 8, temperature=0) == model.generate(prompts, 8, temperature=0)
    sample = lambda seed: model.generate(prompts, 8, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_top_k_larger_than_vocabulary_and_top_p(tiny_gpt):
    model = tiny_gpt()
    out = model.generate([[1, 2, 3]], 5, top_k=10_000, generator=torch.Generator().manual_seed(0))
    assert len(out[0]) == 5 and all(0 <= t < 64 for t in out[0])
    # top_k=1 and a tiny top_p are both greedy
    greedy = model.generate([[1, 2, 3]], 5, temperature=0)
    assert model.generate([[1, 2, 3]], 5, top_k=1) == greedy
    assert model.generate([[1, 2, 3]], 5, top_p=1e-6) == greedy


@pytest.mark.parametrize("top_p, nucleus", [(0.7, [0, 1]), (0.9, [0, 1, 2]), (0.4, [0])])
def test_top_p_keeps_the_hand_computed_nucleus(top_p, nucleus):
    """probs 0.5, 0.3, 0.15, 0.05: the nucleus is the smallest set of likeliest tokens whose mass reaches top_p,
    the token that crosses the threshold included (0.5 + 0.3 = 0.8 reaches 0.7)."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[[3, 1, 0, 2]].repeat(20_000, 1)  # shuffled: the nucleus is found by sorting
    tokens = sample_next(logits, top_p=top_p, generator=torch.Generator().manual_seed(0))
    token_of_prob = {0: 2, 1: 1, 2: 3, 3: 0}  # index of probs[i] in the shuffled logits
    counts = torch.bincount(tokens, minlength=4).float() / len(tokens)
    kept = [i for i in range(4) if counts[token_of_prob[i]] > 0]
    assert kept == nucleus
    renormalized = probs[nucleus] / probs[nucleus].sum()  # sampled in proportion inside the nucleus
    assert torch.allclose(counts[[token_of_prob[i] for i in nucleus]], renormalized, atol=0.015)


def test_rows_stop_independently_at_stop_token(tiny_gpt):
    model = tiny_gpt()
    free = model.generate([[1, 2, 3], [4, 5]], 12, temperature=0)
    stop = free[0][2]  # row 0 emits this token at step 3
    stopped = model.generate([[1, 2, 3], [4, 5]], 12, temperature=0, stop_token=stop)
    assert stopped[0] == free[0][:free[0].index(stop) + 1]  # the stop token ends the row's sampled ids
    row1 = free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert stopped[1] == row1
