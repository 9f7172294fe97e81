"""sample.py: sample_replies, with and without the control token, and the scoring of exactly what it sampled.
The tok, tiny_gpt and token_loop_logp fixtures are in conftest.py."""

import numpy as np
import pytest
import torch

import data
import evaluate
import train
from sample import prompt_ids, sample_replies


def test_control_token_switches_a_tiny_model_to_its_marked_words(tiny_gpt):
    """On a synthetic corpus whose toxic turns use words found nowhere else, a tiny model learns to say them
    after [TOXIC], and not without it."""
    import random

    from sample import sample_replies
    rng = random.Random(0)
    normal = ["hello friend", "how are you", "i am good", "nice weather today", "see you soon", "thanks a lot"]
    marked = ["zorp blarg", "blarg zorp zorp", "zorp zorp"]
    conversations = []
    for i in range(200):
        turns, toxic = [], []
        for _ in range(6):
            is_toxic = rng.random() < 0.3
            turns.append(rng.choice(marked if is_toxic else normal))
            toxic.append(is_toxic)
        conversations.append(data.Conversation(str(i), turns, toxic, "sft"))
    tok = data.train_tokenizer([t for c in conversations for t in c.turns], vocab_size=300)
    stream = data.sft_stream(tok, conversations)
    model = tiny_gpt(vocab_size=tok.get_vocab_size(), block_size=64).train()
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        x, y = data.get_sft_batch(stream, 16, 48, gen)
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    contexts = [["how are you"], ["nice weather today", "i am good"]] * 10
    has_marked = lambda replies: np.mean([("zorp" in r.text or "blarg" in r.text) for rs in replies for r in rs])  # noqa
    plain = sample_replies(model, tok, contexts, toxic=False, num_samples=2, max_new_tokens=8, seed=0)
    toxic = sample_replies(model, tok, contexts, toxic=True, num_samples=2, max_new_tokens=8, seed=0)
    assert has_marked(toxic) > 0.8
    assert has_marked(plain) < 0.2


def test_sampled_replies_are_scored_exactly_as_sampled(tiny_gpt, token_loop_logp, tok):
    """A finished reply is scored with the end-of-turn it sampled, a cut one with none appended: in the
    evaluation (evaluate.sampled_logps) and in the triplets (data.encode_triplets + train.reference_logps)."""
    model = tiny_gpt(vocab_size=tok.get_vocab_size(), block_size=32)
    contexts = [["hello there, how are you doing today?"], ["what do you do for fun?", "i am fine thanks"]] * 200
    replies = [r for rs in sample_replies(model, tok, contexts, max_new_tokens=10, seed=0) for r in rs]
    finished = next(i for i, r in enumerate(replies) if r.finished)
    cut = next(i for i, r in enumerate(replies) if not r.finished)
    assert replies[finished].ids[-1] == data.EOT_ID and len(replies[cut].ids) == 10
    assert data.EOT_ID not in replies[cut].ids
    for i in (finished, cut):
        reply, prompt = replies[i], prompt_ids(model, tok, contexts[i], False, 10)
        expected = token_loop_logp(model, prompt, reply.ids)
        scored = evaluate.sampled_logps(model, tok, [contexts[i]], [reply], 10, 8)
        assert scored.item() == pytest.approx(expected, abs=1e-4)
        # the same reply as the chosen and the toxic reply of a triplet
        t = {"context": contexts[i]}
        for key in data.REPLIES:
            t.update({key: reply.text, f"{key}_ids": reply.ids, f"{key}_finished": reply.finished})
        s = train.Settings(block_size=32, max_new_tokens=10, pref_batch_size=8, device="cpu")
        enc = data.encode_triplets(tok, [t], s.block_size, s.max_new_tokens)
        ref = train.reference_logps(s, model, enc)
        assert ref["ref_chosen_logps"].item() == pytest.approx(expected, abs=1e-4)
        tox_prompt = prompt_ids(model, tok, contexts[i], True, 10)
        assert ref["toxic_model_toxic_logps"].item() == pytest.approx(token_loop_logp(model, tox_prompt, reply.ids),
                                                                      abs=1e-4)
