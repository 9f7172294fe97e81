"""data.py: the tokenizer and its special tokens, the corpus splits, the SFT stream, context truncation, scoring
rows, --data JSONL files (read by checks.read_conversations, labelled by data.load_corpus), and the selection
of triplets. The tok and tiny_gpt fixtures are in conftest.py."""

import json
import os

import numpy as np
import pytest
import torch

import data
import evaluate
import train
from conftest import get_settings
from harness import checks, reports
from harness.artifacts import Run
from sample import prompt_ids

# ----------------------------------------------------------------------------------------------------------
# the tokenizer and its special tokens


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
    s = get_settings(["--preset=tiny", "--vocab_size=280", f"--out_dir={tmp_path}"])
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


# ----------------------------------------------------------------------------------------------------------
# the corpus splits


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


def test_dev_split_is_apart_from_pref_and_eval():
    conversations = data.load_corpus()
    fractions = {sp: sum(c.split == sp for c in conversations) / len(conversations) for sp in data.SPLITS}
    assert 0.03 < fractions["pref"] < 0.07 and 0.03 < fractions["dev"] < 0.07
    s = get_settings(["--preset=cpu"])
    dev, final = evaluate.eval_sets(s, conversations, "dev"), evaluate.eval_sets(s, conversations, "eval")
    dev_split = {tuple(e.context) for e in data.contexts_and_replies(conversations, "dev", s.context_turns)}
    assert len(dev["adversarial"]) == 128 and all(tuple(x) in dev_split for x in dev["adversarial"])
    eval_split = {tuple(e.context) for e in data.contexts_and_replies(conversations, "eval", s.context_turns)}
    assert all(tuple(x) in eval_split for x in final["adversarial"] + final["normal"])
    assert sum(tuple(x) in eval_split for x in dev["normal"]) <= 3  # a greeting may be in both, little else
    assert len(final["provoked"]) >= 100  # the cpu preset scores every provoked turn


# ----------------------------------------------------------------------------------------------------------
# the SFT stream, context truncation, scoring rows


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


def test_tiny_sft_lowers_the_loss(tiny_gpt, tok):
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


def test_context_truncation_edge_cases(tiny_gpt, tok):
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


# ----------------------------------------------------------------------------------------------------------
# --data JSONL files


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
# triplets: the judge gap and the stats of the kept pairs


def test_judge_gap_keeps_the_clear_pairs_and_stats_describe_them():
    def t(p_w, p_l, p_t, finished=True):
        return {"p_chosen": p_w, "p_rejected": p_l, "p_toxic": p_t, "chosen_finished": finished,
                "rejected_finished": True, "toxic_finished": False}
    triplets = [t(0.01, 0.02, 0.9), t(0.05, 0.60, 0.2, False), t(0.10, 0.95, 0.7)]
    assert data.select_triplets(triplets, 0.0) == triplets
    assert data.select_triplets(triplets, 0.5) == triplets[1:]
    with pytest.raises(data.DataError, match="min_judge_gap"):
        data.select_triplets(triplets, 0.99)
    stats = reports.triplet_stats(triplets, 0.5)
    assert stats["n"] == 3 and stats["rejected_toxic_share"] == pytest.approx(2 / 3)
    assert stats["toxic_toxic_share"] == pytest.approx(2 / 3) and stats["chosen_finished_share"] == pytest.approx(2 / 3)
    assert stats["mean_judge_gap"] == pytest.approx((0.01 + 0.55 + 0.85) / 3)
