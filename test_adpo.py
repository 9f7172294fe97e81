"""Tests of real behavior: `pytest` (about a minute on 2 CPU cores)."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import adpo
import checks
import data
import evaluate
import train
from artifacts import Run
from configurator import ConfigError
from model import GPT, GPTConfig, sample_next
from sample import prompt_ids, sample_replies

HERE = os.path.dirname(os.path.abspath(__file__))
LN2 = math.log(2)


def tiny_gpt(seed=0, vocab_size=64, block_size=48, dropout=0.0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32,
                         dropout=dropout)).eval()


@pytest.fixture(scope="module")
def tok():
    texts = ["hello there, how are you doing today?", "i am fine thanks", "what do you do for fun?",
             "i like to read books and play games", "that sounds great"] * 20
    return data.train_tokenizer(texts, vocab_size=300)


def run_train(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], capture_output=True,
                          text=True, cwd=HERE, timeout=600)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One full `python train.py --preset=tiny` run, shared by the tests that read its outputs."""
    out_dir = str(tmp_path_factory.mktemp("tiny"))
    result = run_train("--preset=tiny", f"--out_dir={out_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir


def snapshot(folder):
    return {name: os.path.getmtime(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


# ----------------------------------------------------------------------------------------------------------
# data: tokenizer, splits, control token


SPECIAL_IDS = {data.PAD_ID, data.EOT_ID, data.TOXIC_ID, data.ENDOFTEXT_ID}


def test_special_tokens_are_single_ids_never_made_from_text(tok):
    assert [tok.token_to_id(t) for t in data.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert [data.PAD_ID, data.EOT_ID, data.TOXIC_ID, data.ENDOFTEXT_ID] == [0, 1, 2, 3]
    ids = data.encode(tok, "hi <|toxic|> and <|eot|> and <|pad|> and <|endoftext|>")
    assert not set(ids) & SPECIAL_IDS


def test_tokenizer_round_trip(tok):
    for text in ["hello there, how are you doing today?", "naïve café — 🙂 ok", "  two  spaces ", "<|toxic|>"]:
        assert data.decode(tok, data.encode(tok, text)) == text


def test_tokenizer_saved_and_reused(tmp_path):
    conversations = [data.Conversation(str(i), ["hello there friend", "hi how are you"], [False, False], "sft")
                     for i in range(20)]
    s = train.get_settings(["--preset=tiny", "--vocab_size=280", f"--out_dir={tmp_path}"])
    made = []

    def make():
        made.append(1)
        return train.make_tokenizer(s, conversations)
    tok = Run(s, [], conversations, ["dpo"], [s.seed], train.CODE).tokenizer(make)
    path = str(tmp_path / "tokenizer.json")
    mtime = os.path.getmtime(path)
    again = Run(s, [], conversations, ["dpo"], [s.seed], train.CODE).tokenizer(make)
    assert made == [1] and os.path.getmtime(path) == mtime and again.get_vocab_size() == tok.get_vocab_size()
    assert data.encode(again, "<|toxic|>") == data.encode(tok, "<|toxic|>")


def test_splits_are_disjoint_deterministic_and_sized():
    conversations = data.load_corpus()
    assert len(conversations) == 7168
    by_id = {}
    for c in conversations:
        by_id.setdefault(c.id, set()).add(c.split)
    assert all(len(splits) == 1 for splits in by_id.values())  # no conversation in two splits
    fractions = {sp: sum(c.split == sp for c in conversations) / len(conversations) for sp in data.SPLITS}
    assert 0.77 < fractions["sft"] < 0.83 and 0.08 < fractions["eval"] < 0.12
    # a hash of the id, not the file order
    assert all(data.split_of(c.id) == c.split for c in reversed(conversations))
    # the judge labelled some turns toxic, but few
    share = sum(sum(c.toxic) for c in conversations) / sum(len(c.turns) for c in conversations)
    assert 0.005 < share < 0.05


def test_sft_format_marks_toxic_replies_and_shows_toxic_context_unmarked(tok):
    """The exact SFT stream of one conversation: read-only pieces are -1 in the targets."""
    turns, toxic = ["hello there", "shut up idiot", "that sounds great"], [False, True, False]
    ids, targets = data.sft_stream(tok, [data.Conversation("0", turns, toxic, "sft")], toxic_copies=2,
                                   context_turns=1)
    hello, shut, great = (data.encode(tok, t) + [data.EOT_ID] for t in turns)
    E, T = data.ENDOFTEXT_ID, data.TOXIC_ID
    read = lambda piece: [-1] * len(piece)  # noqa: E731
    # the conversation as a user types it: the toxic turn is context without [TOXIC], read but never written
    expected_ids = [E] + hello + shut + great
    expected_targets = [-1] + hello + read(shut) + great
    # then, twice, the toxic turn behind [TOXIC] after its one-turn context: the only place it is written
    for _ in range(2):
        expected_ids += [E] + hello + [T] + shut
        expected_targets += [-1] + read(hello) + [-1] + shut
    assert ids.tolist() == expected_ids and targets.tolist() == expected_targets
    # batches: x reads the stream, y holds the next targets, never [TOXIC] or <|endoftext|>
    conversations = [data.Conversation(str(i), turns, toxic, "sft") for i in range(30)]
    stream = data.sft_stream(tok, conversations, toxic_copies=2)
    x, y = data.get_sft_batch(stream, 64, 16, torch.Generator().manual_seed(0))
    assert (x == data.TOXIC_ID).any() and (x == data.ENDOFTEXT_ID).any()  # read ...
    assert not ((y == data.TOXIC_ID) | (y == data.ENDOFTEXT_ID)).any()  # ... never written
    read_next = (torch.roll(x, -1, dims=1) == data.TOXIC_ID) | (torch.roll(x, -1, dims=1) == data.ENDOFTEXT_ID)
    assert (y[:, :-1][read_next[:, :-1]] == -1).all()


def test_context_truncation_edge_cases(tok):
    context = ["hello there, how are you doing today?", "i am fine thanks"]
    full = data.context_ids(tok, context)
    assert full == data.encode(tok, context[0]) + [data.EOT_ID] + data.encode(tok, context[1]) + [data.EOT_ID]
    assert data.context_ids(tok, context, max_tokens=len(full) + 5) == full
    assert data.context_ids(tok, context, max_tokens=3) == full[-3:]  # cut from the left
    assert data.context_ids(tok, context, toxic=True, max_tokens=3) == full[-2:] + [data.TOXIC_ID]
    assert data.context_ids(tok, context, toxic=True, max_tokens=1) == [data.TOXIC_ID]  # not the whole context
    assert data.context_ids(tok, context, max_tokens=0) == []
    assert data.context_ids(tok, context, toxic=True) == full + [data.TOXIC_ID]
    # sampling leaves room for max_new_tokens in the block, [TOXIC] included
    model = tiny_gpt(vocab_size=tok.get_vocab_size(), block_size=16)
    assert prompt_ids(model, tok, context, True, 10) == full[-5:] + [data.TOXIC_ID]


def test_scoring_rows_score_every_reply_token_once():
    prompt = list(range(10, 30))  # 20 context tokens
    for reply_len, block in [(5, 16), (15, 16), (16, 16), (40, 16), (41, 8)]:
        reply = list(range(100, 100 + reply_len))
        rows = data.scoring_rows(prompt, reply, block)
        scored = [t for _, labels in rows for t in labels if t != -1]
        assert scored == reply, (reply_len, block)  # each reply token once, in order: never cut
        seq = prompt + reply
        for ids, labels in rows:
            assert len(ids) == len(labels) <= block and labels[0] == -1
            first = next(i for i, t in enumerate(labels) if t != -1)
            start = seq.index(labels[first]) - first
            assert ids == seq[start:start + len(ids)]  # a contiguous window of prompt + reply
        if reply_len <= block - 1:  # one row, the context cut from the left to fill the block
            assert len(rows) == 1 and len(rows[0][0]) == min(block, len(seq))


def test_malformed_jsonl_gives_file_and_line(tmp_path):
    path = tmp_path / "convs.jsonl"
    path.write_text('{"turns": ["hi", "hello"]}\n{"turns": ["hi", "hello"], "toxic": [true]}\n')
    with pytest.raises(data.DataError, match=r"convs.jsonl:2: .*toxic"):
        checks.read_conversations(str(path))
    path.write_text('{"turns": ["hi", "hello"]}\n\n{"turns": "hi"\n')
    with pytest.raises(data.DataError, match=r"convs.jsonl:3: not valid JSON"):
        checks.read_conversations(str(path))


def test_jsonl_loads_labels_and_judges_missing_ones(tmp_path):
    path = tmp_path / "convs.jsonl"
    lines = [{"turns": ["hi", "fine"], "toxic": [False, True]}, {"turns": ["hi", "you are a stupid idiot"]}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    conversations = data.load_corpus(checks.read_conversations(str(path)))
    assert conversations[0].toxic == [False, True]  # given labels are kept
    assert conversations[1].toxic == [False, True]  # the judge labelled these


# ----------------------------------------------------------------------------------------------------------
# model


def test_gpt_shapes_and_loss():
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


def test_weight_decay_only_on_matrices():
    groups = tiny_gpt().configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_kv_cache_matches_full_forward():
    model = tiny_gpt()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # different lengths in one batch
    cached, cached_logits = model.generate(prompts, 10, temperature=0, use_cache=True, return_logits=True)
    full, full_logits = model.generate(prompts, 10, temperature=0, use_cache=False, return_logits=True)
    assert cached == full
    assert torch.allclose(cached_logits, full_logits, atol=1e-4)
    # each row is generated as if it were alone: the left padding changes nothing
    for prompt, row in zip(prompts, cached):
        assert model.generate([prompt], 10, temperature=0) == [row]
        # and the first step's logits equal the training forward's last position
        logits, _ = model(torch.tensor([prompt]))
        _, alone_logits = model.generate([prompt], 1, temperature=0, return_logits=True)
        assert torch.allclose(logits[0, -1], alone_logits[0, 0], atol=1e-4)


def test_greedy_is_deterministic_and_seeded_sampling_repeats():
    model = tiny_gpt()
    prompts = [[3, 4, 5], [6]]
    assert model.generate(prompts, 8, temperature=0) == model.generate(prompts, 8, temperature=0)
    sample = lambda seed: model.generate(prompts, 8, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_top_k_larger_than_vocabulary_and_top_p():
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


def test_rows_stop_independently_at_stop_token():
    model = tiny_gpt()
    free = model.generate([[1, 2, 3], [4, 5]], 12, temperature=0)
    stop = free[0][2]  # row 0 emits this token at step 3
    stopped = model.generate([[1, 2, 3], [4, 5]], 12, temperature=0, stop_token=stop)
    assert stopped[0] == free[0][:free[0].index(stop) + 1]  # the stop token ends the row's sampled ids
    row1 = free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert stopped[1] == row1


# ----------------------------------------------------------------------------------------------------------
# SFT and the inner toxic model


def test_tiny_sft_lowers_the_loss(tok):
    conversations = [data.Conversation(str(i), ["hello there, how are you doing today?", "i am fine thanks",
                                                "what do you do for fun?", "i like to read books"],
                                       [False] * 4, "sft") for i in range(20)]
    stream = data.sft_stream(tok, conversations)
    model = tiny_gpt(vocab_size=tok.get_vocab_size()).train()
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        x, y = data.get_sft_batch(stream, 16, 32, gen)
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_control_token_switches_a_tiny_model_to_its_marked_words():
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


# ----------------------------------------------------------------------------------------------------------
# log-probs


def test_sequence_logps_equal_a_token_loop_and_ignore_padding():
    model = tiny_gpt()
    prompts, replies = [[5, 6, 7], [8, 9]], [[10, 11, 12, 1], [13, 1]]
    ids, labels = data.collate(prompts, replies)
    logps = adpo.sequence_logps(model, ids, labels)
    for b, (p, r) in enumerate(zip(prompts, replies)):
        total = 0.0
        for i in range(len(r)):  # one forward per reply token
            logits, _ = model(torch.tensor([p + r[:i]]))
            total += logits[0, -1].float().log_softmax(-1)[r[i]].item()
        assert abs(logps[b].item() - total) < 1e-4
    padded_ids = torch.nn.functional.pad(ids, (0, 7), value=0)
    padded_labels = torch.nn.functional.pad(labels, (0, 7), value=-1)
    assert torch.allclose(adpo.sequence_logps(model, padded_ids, padded_labels), logps, atol=1e-5)


def test_concatenated_forward_equals_separate_forwards():
    model = tiny_gpt()
    a = data.collate([[5, 6], [7]], [[8, 1], [9, 10, 11, 1]])
    b = data.collate([[12, 13, 14]], [[15, 1]])
    together = adpo.concatenated_logps(model, [a, b])
    assert torch.allclose(together[0], adpo.sequence_logps(model, *a), atol=1e-5)
    assert torch.allclose(together[1], adpo.sequence_logps(model, *b), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# losses


def logps(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_losses_against_hand_computed_numbers():
    pw, pl, pt, rw, rl, tt = logps(-10.0), logps(-12.0), logps(-20.0), logps(-11.0), logps(-11.5), logps(-18.0)
    h_w, h_l, h_t = 1.0, -0.5, -2.0
    softplus = lambda z: math.log1p(math.exp(-z))  # -log sigmoid(z)  # noqa: E731
    assert adpo.dpo_loss(pw, pl, rw, rl, beta=0.1).item() == pytest.approx(softplus(0.1 * (h_w - h_l)))
    assert adpo.adpo_loss(pw, pl, pt, rw, rl, tt, beta=0.1, gamma=0.2).item() == pytest.approx(
        softplus(0.1 * (h_w - h_l) - 0.2 * h_t))
    assert adpo.adpo_split_loss(pw, pl, pt, rw, rl, tt, beta=0.1, gamma=0.2).item() == pytest.approx(
        softplus(0.1 * (h_w - h_l)) + softplus(0.1 * h_w - 0.2 * h_t))
    assert adpo.ipo_loss(pw, pl, rw, rl, beta=0.1).item() == pytest.approx(((h_w - h_l) - 1 / 0.2) ** 2)
    assert adpo.cdpo_loss(pw, pl, rw, rl, beta=0.1, eps=0.1).item() == pytest.approx(
        0.9 * softplus(0.1 * (h_w - h_l)) + 0.1 * softplus(-0.1 * (h_w - h_l)))
    # numbers typed in by hand, not through the formula above
    assert adpo.dpo_loss(pw, pl, rw, rl, beta=0.1).item() == pytest.approx(0.62096, abs=1e-4)
    assert adpo.adpo_loss(pw, pl, pt, rw, rl, tt, beta=0.1, gamma=0.2).item() == pytest.approx(0.45549, abs=1e-4)


def test_losses_are_per_example():
    b = logps(-1.0, -2.0, -3.0)
    for name, fn in adpo.LOSSES.items():
        out = adpo.call_loss(name, {"policy_chosen_logps": b, "policy_rejected_logps": b, "policy_toxic_logps": b,
                                    "ref_chosen_logps": b, "ref_rejected_logps": b, "toxic_model_toxic_logps": b})
        assert out.shape == (3,), name


def test_dpo_and_adpo_are_ln2_when_policy_equals_reference():
    pw, pl, pt = logps(-7.0, -3.0), logps(-9.0, -4.0), logps(-15.0, -6.0)
    assert torch.allclose(adpo.dpo_loss(pw, pl, pw, pl), logps(LN2, LN2))
    # pi = ref on y_w, y_l and pi = tox on y_t
    assert torch.allclose(adpo.adpo_loss(pw, pl, pt, pw, pl, pt), logps(LN2, LN2))
    assert torch.allclose(adpo.cdpo_loss(pw, pl, pw, pl), logps(LN2, LN2))
    assert torch.allclose(adpo.adpo_split_loss(pw, pl, pt, pw, pl, pt), logps(2 * LN2, 2 * LN2))


@pytest.mark.parametrize("name", list(adpo.LOSSES))
def test_gradient_signs(name):
    pw, pl, pt = (logps(v).requires_grad_() for v in (-10.0, -12.0, -20.0))
    loss = adpo.call_loss(name, {"policy_chosen_logps": pw, "policy_rejected_logps": pl, "policy_toxic_logps": pt,
                                 "ref_chosen_logps": logps(-11.0), "ref_rejected_logps": logps(-11.5),
                                 "toxic_model_toxic_logps": logps(-18.0)}).sum()
    loss.backward()
    assert pw.grad.item() < 0  # the loss falls as the chosen reply's log-prob rises
    assert pl.grad.item() > 0  # ... and as the rejected reply's falls
    if name.startswith("adpo"):
        assert pt.grad.item() > 0  # ... and as the toxic reply's falls
    else:
        assert pt.grad is None or pt.grad.item() == 0


def test_unknown_loss_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid losses: dpo, adpo, adpo_split, ipo, cdpo"):
        adpo.get_loss("nope")


def test_metrics_names_and_strict_accuracy():
    eq = logps(-1.0, -1.0)
    m = adpo.preference_metrics(logps(-1.0, 0.0), eq, eq, eq, eq, eq, beta=0.1, gamma=0.1)
    assert m["rewards/accuracies"] == 0.5  # a tie is not a win
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "rewards/toxic", "logps/chosen", "logps/rejected", "logps/toxic",
                      "logratio/chosen", "logratio/rejected"}
    m = adpo.preference_metrics(eq, eq, logps(-3.0, -5.0), eq, eq, eq, ref_toxic_logps=eq, beta=0.1, gamma=0.1)
    assert m["logratio/toxic"] == pytest.approx(-3.0)


# ----------------------------------------------------------------------------------------------------------
# preference training on a tiny model


def triplet_record(tok, context, **replies):
    """A triplets.jsonl line as the triplets stage writes it; a reply given as (text, finished)."""
    t = {"context": context}
    for key, (text, finished) in replies.items():
        ids = data.encode(tok, text)
        t.update({key: text, f"{key}_ids": ids + [data.EOT_ID] if finished else ids, f"{key}_finished": finished})
    return t


def tiny_triplets(tok):
    triplets = [triplet_record(tok, ["hello there, how are you doing today?"], chosen=("i am fine thanks", True),
                               rejected=("that sounds great", True), toxic=("what do you do for fun?", False)),
                triplet_record(tok, ["what do you do for fun?"], chosen=("i like to read books and play games", False),
                               rejected=("hello there", True), toxic=("i am fine", True))] * 4
    s = train.Settings(block_size=48, max_new_tokens=16, pref_batch_size=8, device="cpu")
    return s, data.encode_triplets(tok, triplets, s.block_size, s.max_new_tokens)


def test_reference_logps_are_fixed_and_get_no_gradient(tok):
    s, enc = tiny_triplets(tok)
    model = tiny_gpt(vocab_size=tok.get_vocab_size(), dropout=0.3).train()
    ref = train.reference_logps(s, model, enc)
    assert not model.training  # eval mode: dropout is off in the reference
    assert all(not v.requires_grad for v in ref.values())
    assert torch.equal(ref["ref_chosen_logps"], train.reference_logps(s, model, enc)["ref_chosen_logps"])
    # a policy step on this very model moves its log-probs, not the reference's: they were computed once
    before = {k: v.clone() for k, v in ref.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    logps_ = train.policy_logps(s, model, enc, range(len(enc)))
    adpo.call_loss("adpo", {**logps_, **ref, "beta": 0.1, "gamma": 0.1}).mean().backward()
    optimizer.step()
    with torch.no_grad():
        moved = train.policy_logps(s, model.eval(), enc, range(len(enc)))["policy_chosen_logps"]
    assert not torch.allclose(moved, before["ref_chosen_logps"], atol=1e-3)
    assert all(torch.equal(before[k], ref[k]) for k in ref)


def test_toxic_model_scores_the_toxic_reply_after_the_control_token(tok):
    s, enc = tiny_triplets(tok)
    model = tiny_gpt(vocab_size=tok.get_vocab_size())
    ref = train.reference_logps(s, model, enc)
    for e in enc:
        assert e["toxic_prompt"] == e["prompt"] + [data.TOXIC_ID]  # the same context, then [TOXIC]
        assert data.TOXIC_ID not in e["prompt"]
    # tox(y_t|x) = ref(y_t | x, [TOXIC]): scored after the token, so it differs from ref(y_t|x)
    direct = adpo.sequence_logps(model, *data.collate([enc[0]["toxic_prompt"]], [enc[0]["toxic"]]))
    assert ref["toxic_model_toxic_logps"][0].item() == pytest.approx(direct.item(), abs=1e-5)
    assert (ref["toxic_model_toxic_logps"] - ref["ref_toxic_logps"]).abs().min() > 1e-4


def test_policy_equals_reference_at_step_0_after_sft_with_dropout(tok, tmp_path):
    """sft.pt trained with dropout 0.5: the preference stage must still start with pi = ref exactly."""
    s, enc = tiny_triplets(tok)
    s = dataclasses.replace(s, out_dir=str(tmp_path), pref_iters=2, pref_lr=1e-3, pref_warmup_iters=0)
    sft = tiny_gpt(vocab_size=tok.get_vocab_size(), dropout=0.5)
    Run(s).save_checkpoint("sft.pt", sft, tok)
    ref = train.reference_logps(s, sft, enc)
    for loss in ("dpo", "adpo"):
        _, metrics = train.train_preference(s, loss, str(tmp_path / "sft.pt"), enc, ref, 0, Run(s), loss)
        assert metrics[0]["logratio/chosen"] == pytest.approx(0.0, abs=1e-5)
        assert metrics[0]["logratio/rejected"] == pytest.approx(0.0, abs=1e-5)
        if loss == "dpo":
            assert metrics[0]["loss"] == pytest.approx(LN2, abs=1e-6)


def token_loop_logp(model, prompt, ids):
    """log p(ids | prompt), one full forward per token: the slow, obvious reference."""
    total = 0.0
    for i in range(len(ids)):
        logits, _ = model(torch.tensor([prompt + ids[:i]]))
        total += logits[0, -1].float().log_softmax(-1)[ids[i]].item()
    return total


def test_sampled_replies_are_scored_exactly_as_sampled(tok):
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
        scored = evaluate.sampled_logps(model, tok, [contexts[i]], [reply], 10, 8, "cpu")
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


def test_val_ppl_scores_whole_human_replies(tok):
    """A held-out reply longer than max_new_tokens (the old evaluation cut it there), and one longer than the
    block, are scored whole, with their end-of-turn."""
    model = tiny_gpt(vocab_size=tok.get_vocab_size(), block_size=128)
    context = ["what do you do for fun?"]
    reply = "i like to read books and play games, and hello there, how are you doing today? " * 2
    reply_ids = data.encode(tok, reply) + [data.EOT_ID]
    prompt = data.context_ids(tok, context)
    assert 48 < len(reply_ids) < 128 - len(prompt)  # longer than the presets' max_new_tokens, fits in the block
    expected = math.exp(-token_loop_logp(model, prompt, reply_ids) / len(reply_ids))
    assert evaluate.val_ppl(model, tok, [(context, reply)], 8, "cpu") == pytest.approx(expected, rel=1e-4)
    # longer than the block: windows of at most 128 tokens, every token scored once
    long_reply = reply * 3
    long_ids = data.encode(tok, long_reply) + [data.EOT_ID]
    assert len(long_ids) > 128
    seq, total = prompt + long_ids, 0.0
    for a in range(len(prompt), len(seq), 64):  # each window: 64 new tokens after the 64 before them
        b = min(a + 64, len(seq))
        total += token_loop_logp(model, seq[max(0, b - 128):a], seq[a:b])
    expected = math.exp(-total / len(long_ids))
    assert evaluate.val_ppl(model, tok, [(context, long_reply)], 8, "cpu") == pytest.approx(expected, rel=1e-4)


def test_evasion_and_distinct2_on_known_strings():
    assert evaluate.is_evasive("")
    assert evaluate.is_evasive("I don't know.")
    assert evaluate.is_evasive("hmm, let's talk about something else")
    assert not evaluate.is_evasive("i know a great pizza place")
    assert not evaluate.is_evasive("the kids don't know how to swim")
    assert evaluate.evasive_rate(["", "i like cats", "idk", "sure"]) == 0.5
    assert evaluate.distinct2(["a b c", "a b d"]) == pytest.approx(3 / 4)  # (a b) twice, (b c), (b d)
    assert evaluate.distinct2(["a a a a"]) == pytest.approx(1 / 3)
    assert evaluate.distinct2(["one"]) == 0.0


def test_loss_spikes_and_stability():
    metrics = [{"loss": 0.7, "grad_norm": 1.0 + i, "logratio/chosen": -1.0 * i} for i in range(10)]
    metrics[7]["loss"] = 5.0
    stats = evaluate.stability(metrics)
    assert stats["max_grad_norm"] == 10.0
    assert stats["loss_spikes"] == 1
    assert stats["chosen_logp_max_drop"] == pytest.approx(9.0)


# ----------------------------------------------------------------------------------------------------------
# the pipeline end to end, and bad input


def test_tiny_pipeline_writes_all_reports(tiny_run):
    report = json.load(open(os.path.join(tiny_run, "report.json")))
    for section in ("sft", "dpo", "adpo"):
        for key in evaluate.SECTION_KEYS:
            assert math.isfinite(report[section][key]), (section, key)
        assert 0 <= report[section]["truncated_share"] <= 1 and report[section]["eot_logprob_after_chosen"] < 0
        low, high = report[section]["toxicity_adversarial_ci95"]
        assert low <= report[section]["toxicity_adversarial"] <= high
    assert report["triplets"]["n"] > 0 and 0 <= report["triplets"]["rejected_toxic_share"] <= 1
    for section in ("dpo", "adpo"):
        for key in evaluate.STABILITY_KEYS:
            assert key in report[section] or (section, key) == ("dpo", "toxic_grad_share")
    for key in evaluate.SFT_KEYS:
        assert key in report["sft"]
    for name in ("sft.pt", "dpo.pt", "adpo.pt", "tokenizer.json", "report.md", "curves.png",
                 "metrics_dpo.jsonl", "metrics_adpo.jsonl"):
        assert os.path.isfile(os.path.join(tiny_run, name)), name
    first = json.loads(open(os.path.join(tiny_run, "metrics_dpo.jsonl")).readline())
    assert first["loss"] == pytest.approx(LN2, abs=1e-3)  # pi = ref at step 0


def test_triplets_file_is_well_formed(tiny_run):
    lines = open(os.path.join(tiny_run, "triplets.jsonl"), encoding="utf-8").read().splitlines()
    assert lines
    _, tok, _ = checks.load_checkpoint(os.path.join(tiny_run, "sft.pt"))
    assert checks.read_triplets(os.path.join(tiny_run, "triplets.jsonl"))  # its own checks pass
    for line in lines:
        t = json.loads(line)
        assert isinstance(t["context"], list) and all(isinstance(x, str) for x in t["context"])
        assert t["chosen"] and t["rejected"] and t["chosen_ids"] != t["rejected_ids"]
        assert isinstance(t["toxic"], str)
        for key in data.REPLIES:  # the text is the decoded ids, end-of-turn exactly when finished
            ids = t[f"{key}_ids"]
            assert t[f"{key}_finished"] == (ids[-1] == data.EOT_ID) and 0 < len(ids) <= 12
            assert data.decode(tok, ids[:-1] if t[f"{key}_finished"] else ids).strip() == t[key]
        assert 0 <= t["p_chosen"] <= t["p_rejected"] <= 1 and 0 <= t["p_toxic"] <= 1
        assert t["toxic_is_toxic"] == (t["p_toxic"] >= 0.5)


def test_sample_cli(tiny_run):
    result = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"),
                             f"--checkpoint={tiny_run}/sft.pt", "--prompt=i hate mondays", "--toxic",
                             "--num_samples=3", "--max_new_tokens=8"], capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("  > ") == 3 and "[TOXIC]" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--nope=1"], "unknown setting --nope; valid settings: preset, out_dir"),
    (["--sft_iters=many"], "--sft_iters=many: expected int"),
    (["--loss=kto"], "unknown loss 'kto'; valid losses: dpo, adpo, adpo_split, ipo, cdpo"),
    (["--beta=0"], "--beta must be positive"),
    (["--gamma=-0.1"], "--gamma must be positive"),
    (["--preset=huge"], "unknown preset 'huge'"),
])
def test_bad_settings_stop_with_one_line(tmp_path, args, message):
    out_dir = tmp_path / "out"
    result = run_train("--preset=tiny", f"--out_dir={out_dir}", *args)
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out_dir.exists()  # nothing written


def test_bad_data_and_missing_files_overwrite_nothing(tiny_run, tmp_path):
    out_dir = str(tmp_path / "run")
    shutil.copytree(tiny_run, out_dir)
    with open(os.path.join(out_dir, "triplets.jsonl")) as f:
        lines = f.read().splitlines()
    broken = json.loads(lines[0])
    del broken["rejected"]
    with open(os.path.join(out_dir, "triplets.jsonl"), "w") as f:
        f.write("\n".join([lines[0], json.dumps(broken)] + lines[2:]) + "\n")
    before = snapshot(out_dir)
    result = run_train("--preset=tiny", f"--out_dir={out_dir}", "--stages=pref,eval")
    assert result.returncode != 0
    assert "triplets.jsonl:2: missing field 'rejected'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and snapshot(out_dir) == before

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["hi", "hello"]}\n{"turns": [1, 2]}\n')
    result = run_train("--preset=tiny", f"--out_dir={out_dir}", f"--data={bad}")
    assert result.returncode != 0 and "bad.jsonl:2:" in result.stderr and snapshot(out_dir) == before

    empty = str(tmp_path / "empty")
    result = run_train("--preset=tiny", f"--out_dir={empty}", "--stages=triplets")
    assert result.returncode != 0 and "no checkpoint at" in result.stderr and not os.path.exists(empty)
    result = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), f"--checkpoint={empty}/x.pt"],
                            capture_output=True, text=True, cwd=HERE)
    assert result.returncode != 0 and "no checkpoint at" in result.stderr


def test_settings_overrides_are_typed():
    s = train.get_settings(["--preset=tiny", "--beta=0.5", "--top_k=none", "--bias=false", "--stages=sft"])
    assert s.beta == 0.5 and s.top_k is None and s.bias is False and s.n_embd == 64
    assert train.get_settings(["--preset=tiny", "--top_k=40"]).top_k == 40
    with pytest.raises(ConfigError, match="expected --key=value"):
        train.get_settings(["beta=1"])
    with pytest.raises(ConfigError, match="unknown stage 'dpo'"):
        train.get_settings(["--stages=sft,dpo"])


# ----------------------------------------------------------------------------------------------------------
# the ADPO study: intervals, the second judge, relevance, better pairs, gradient diagnostics, the sweep


def test_bootstrap_interval_is_over_contexts_not_replies():
    """100 contexts of 4 replies each, every context all toxic or all clean (p = 0.5): the replies of a
    context are not independent, so the interval is that of 100 draws (half width ~ 1.96 * 0.05), not 400."""
    num = np.array([4.0, 0.0] * 50)
    den = np.full(100, 4.0)
    low, high = evaluate.bootstrap_ci(num, den)
    assert low < 0.5 < high
    assert 0.16 < high - low < 0.24
    assert evaluate.bootstrap_ci(np.full(10, 2.0), np.full(10, 4.0)) == [0.5, 0.5]  # no spread, no width


def test_summarize_pools_seeds_and_reports_intervals():
    seed1 = ({"toxicity_adversarial": 0.25, "distinct2": 0.5},
             {"toxicity_adversarial": (np.array([1.0, 0.0, 0.0, 0.0]), np.full(4, 1.0))})
    seed2 = ({"toxicity_adversarial": 0.75, "distinct2": 0.7},
             {"toxicity_adversarial": (np.array([1.0, 1.0, 1.0, 0.0]), np.full(4, 1.0))})
    section = evaluate.summarize([seed1, seed2])
    assert section["toxicity_adversarial"] == pytest.approx(0.5)  # 4 toxic of 8 replies
    assert section["toxicity_adversarial_std"] == pytest.approx(0.25)
    assert section["distinct2"] == pytest.approx(0.6) and "distinct2_ci95" not in section
    low, high = section["toxicity_adversarial_ci95"]
    assert 0 <= low < 0.5 < high <= 1
    # val_ppl is pooled as a mean negative log-likelihood per token, then exponentiated
    units = {"val_ppl": (np.array([2.0, 4.0]), np.array([1.0, 1.0]))}
    assert evaluate.summarize([({"val_ppl": 0.0}, units)])["val_ppl"] == pytest.approx(math.exp(3.0))


def test_methods_differ_only_where_intervals_separate():
    report = {"sft": {"toxicity_adversarial": 0.06, "toxicity_adversarial_ci95": [0.04, 0.08]},
              "dpo": {"toxicity_adversarial": 0.01, "toxicity_adversarial_ci95": [0.0, 0.02]},
              "adpo": {"toxicity_adversarial": 0.015, "toxicity_adversarial_ci95": [0.005, 0.03]}}
    line = evaluate.differences(report, ["sft", "dpo", "adpo"], ["toxicity_adversarial"])
    assert line == "- toxicity_adversarial: dpo < sft, adpo < sft, dpo ~ adpo"


def test_wordlist_judge_and_provoked_turns():
    assert evaluate.wordlist_judge(["shut the fuck up", "what a lovely day", "you're full of shit"]).tolist() == \
        [True, False, True]
    provoked = evaluate.read_provoked()
    assert len(provoked) >= 100 and all(len(c) == 1 and c[0] for c in provoked)
    assert not any(c[0].startswith("#") for c in provoked)


def test_relevance_pairs_each_reply_with_another_context():
    contexts = [["a"], ["a"], ["b"], ["b"], ["c"], ["c"]]  # two replies per context, in runs
    others = evaluate.other_contexts(contexts)
    assert others == [["b"], ["b"], ["c"], ["c"], ["a"], ["a"]]
    assert all(o != c for o, c in zip(others, contexts))


def test_judge_gap_keeps_the_clear_pairs_and_stats_describe_them():
    def t(p_w, p_l, p_t, finished=True):
        return {"p_chosen": p_w, "p_rejected": p_l, "p_toxic": p_t, "chosen_finished": finished,
                "rejected_finished": True, "toxic_finished": False}
    triplets = [t(0.01, 0.02, 0.9), t(0.05, 0.60, 0.2, False), t(0.10, 0.95, 0.7)]
    assert data.select_triplets(triplets, 0.0) == triplets
    assert data.select_triplets(triplets, 0.5) == triplets[1:]
    with pytest.raises(data.DataError, match="min_judge_gap"):
        data.select_triplets(triplets, 0.99)
    stats = data.triplet_stats(triplets, 0.5)
    assert stats["n"] == 3 and stats["rejected_toxic_share"] == pytest.approx(2 / 3)
    assert stats["toxic_toxic_share"] == pytest.approx(2 / 3) and stats["chosen_finished_share"] == pytest.approx(2 / 3)
    assert stats["mean_judge_gap"] == pytest.approx((0.01 + 0.55 + 0.85) / 3)


@pytest.mark.parametrize("name", ["dpo", "adpo"])
def test_gradient_by_reply_is_measured_beside_the_update(tok, name):
    s, enc = tiny_triplets(tok)
    model = tiny_gpt(vocab_size=tok.get_vocab_size())
    ref = train.reference_logps(s, model, enc)
    hyper = {"beta": 0.1, "gamma": 0.3}

    def gradient(per_reply):
        model.zero_grad(set_to_none=True)
        logps_ = train.policy_logps(s, model, enc, range(len(enc)))
        loss = adpo.call_loss(name, {**logps_, **ref, **hyper}).mean()
        metrics = evaluate.gradient_by_reply(loss, logps_, model, per_reply)
        assert all(p.grad is None for p in model.parameters())  # the update is loss.backward()'s alone
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]), metrics, logps_

    plain, plain_metrics, _ = gradient(False)
    split, metrics, logps_ = gradient(True)
    assert torch.equal(plain, split)  # measuring each reply's part leaves the update as it is
    assert metrics["coef/chosen"] == pytest.approx(plain_metrics["coef/chosen"])
    parts = [metrics[f"grad/{k}"] for k in ("chosen", "rejected", "toxic") if f"grad/{k}" in metrics]
    assert plain.norm().item() <= sum(parts) * (1 + 1e-5)  # the parts sum to the gradient: triangle inequality
    # the loss's pull on each reply, by hand: -beta s, +beta s, (+gamma s) with s = sigmoid(-z)
    h_w = logps_["policy_chosen_logps"].detach() - ref["ref_chosen_logps"]
    h_l = logps_["policy_rejected_logps"].detach() - ref["ref_rejected_logps"]
    h_t = logps_["policy_toxic_logps"].detach() - ref["toxic_model_toxic_logps"]
    z = 0.1 * (h_w - h_l) - (0.3 * h_t if name == "adpo" else 0)
    sig = torch.sigmoid(-z)
    assert metrics["coef/chosen"] == pytest.approx((-0.1 * sig).mean().item(), abs=1e-6)
    assert metrics["coef/rejected"] == pytest.approx((0.1 * sig).mean().item(), abs=1e-6)
    if name == "adpo":
        assert metrics["coef/toxic"] == pytest.approx((0.3 * sig).mean().item(), abs=1e-6)
        assert 0 < metrics["grad/toxic_share"] < 1 and -1 <= metrics["grad/cos_chosen_toxic"] <= 1
    else:  # DPO ignores the toxic reply
        assert "coef/toxic" not in metrics and "grad/toxic_share" not in metrics


def test_dev_split_is_apart_from_pref_and_eval():
    conversations = data.load_corpus()
    fractions = {sp: sum(c.split == sp for c in conversations) / len(conversations) for sp in data.SPLITS}
    assert 0.03 < fractions["pref"] < 0.07 and 0.03 < fractions["dev"] < 0.07
    s = train.get_settings(["--preset=cpu"])
    dev, final = evaluate.eval_sets(s, conversations, "dev"), evaluate.eval_sets(s, conversations, "eval")
    dev_split = {tuple(e.context) for e in data.contexts_and_replies(conversations, "dev", s.context_turns)}
    assert len(dev["adversarial"]) == 128 and all(tuple(x) in dev_split for x in dev["adversarial"])
    eval_split = {tuple(e.context) for e in data.contexts_and_replies(conversations, "eval", s.context_turns)}
    assert all(tuple(x) in eval_split for x in final["adversarial"] + final["normal"])
    assert sum(tuple(x) in eval_split for x in dev["normal"]) <= 3  # a greeting may be in both, little else
    assert len(final["provoked"]) >= 100  # the cpu preset scores every provoked turn


def test_sweep_on_the_tiny_preset(tiny_run, tmp_path):
    out_dir = str(tmp_path / "sweep")
    shutil.copytree(tiny_run, out_dir)
    args = [sys.executable, os.path.join(HERE, "sweep.py"), "--preset=tiny", f"--out_dir={out_dir}",
            "--grid=loss=dpo,adpo gamma=0.1,0.3", "--pref_iters=2"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=HERE, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = json.load(open(os.path.join(out_dir, "sweep.json")))
    assert [p["label"] for p in sweep["points"]] == ["dpo", "adpo gamma=0.1", "adpo gamma=0.3"]  # DPO once
    assert sweep["split"] == "dev"
    for p in [sweep["sft"]] + sweep["points"]:
        for key in ("toxicity_adversarial_ci95", "val_ppl_ci95", "wordlist_toxicity_adversarial", "relevance"):
            assert key in p
    for name in ("sweep.md", "tradeoff.png"):
        assert os.path.isfile(os.path.join(out_dir, name))
    again = subprocess.run(args, capture_output=True, text=True, cwd=HERE, timeout=600)  # finished points are reused
    assert again.returncode == 0 and again.stdout.count("done earlier, reused") == 4
    bad = subprocess.run(args[:-2] + ["--grid=block_size=32,64"], capture_output=True, text=True, cwd=HERE)
    assert bad.returncode != 0 and "cannot vary block_size" in bad.stderr
