"""Tests of real behavior: `pytest` (about a minute on 2 CPU cores)."""

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
import data
import train
from configurator import ConfigError
from model import GPT, GPTConfig

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


def test_special_tokens_are_single_ids_never_made_from_text(tok):
    assert [tok.token_to_id(t) for t in data.SPECIAL_TOKENS] == [data.PAD_ID, data.EOT_ID, data.TOXIC_ID]
    ids = data.encode(tok, "hi <|toxic|> and <|eot|> and <|pad|>")
    assert not set(ids) & {data.PAD_ID, data.EOT_ID, data.TOXIC_ID}
    # the special tokens stay whole in the stream
    stream = data.conversation_ids(tok, ["hello there", "you idiot"], [False, True])
    assert stream.count(data.TOXIC_ID) == 1 and stream.count(data.EOT_ID) == 2
    assert stream.index(data.TOXIC_ID) == stream.index(data.EOT_ID) + 1


def test_tokenizer_round_trip(tok):
    for text in ["hello there, how are you doing today?", "naïve café — 🙂 ok", "  two  spaces ", "<|toxic|>"]:
        assert data.decode(tok, data.encode(tok, text)) == text


def test_tokenizer_saved_and_reused(tmp_path):
    conversations = [data.Conversation(str(i), ["hello there friend", "hi how are you"], [False, False], "sft")
                     for i in range(20)]
    path = str(tmp_path / "tokenizer.json")
    tok = data.get_tokenizer(conversations, 280, path)
    mtime = os.path.getmtime(path)
    again = data.get_tokenizer(conversations, 280, path)
    assert os.path.getmtime(path) == mtime and again.get_vocab_size() == tok.get_vocab_size()
    assert data.encode(again, "<|toxic|>") == data.encode(tok, "<|toxic|>")


def test_splits_are_disjoint_deterministic_and_sized():
    conversations = data.load_corpus()
    assert len(conversations) == 7168
    by_id = {}
    for c in conversations:
        by_id.setdefault(c.id, set()).add(c.split)
    assert all(len(splits) == 1 for splits in by_id.values())  # no conversation in two splits
    fractions = {sp: sum(c.split == sp for c in conversations) / len(conversations) for sp in data.SPLITS}
    assert 0.77 < fractions["sft"] < 0.83 and 0.08 < fractions["pref"] < 0.12 and 0.08 < fractions["eval"] < 0.12
    # a hash of the id, not the file order
    assert all(data.split_of(c.id) == c.split for c in reversed(conversations))
    # the judge labelled some turns toxic, but few
    share = sum(sum(c.toxic) for c in conversations) / sum(len(c.turns) for c in conversations)
    assert 0.005 < share < 0.05


def test_control_token_targets_are_masked(tok):
    conversations = [data.Conversation(str(i), ["hello there", "shut up idiot", "that sounds great"],
                                       [False, True, False], "sft") for i in range(30)]
    stream = data.sft_stream(tok, conversations, toxic_repeat=2)
    x, y = data.get_sft_batch(stream, 64, 16, torch.Generator().manual_seed(0))
    assert (x == data.TOXIC_ID).any()  # the model reads the control token ...
    assert not (y == data.TOXIC_ID).any()  # ... but is never trained to write it
    assert ((y == -1) == (torch.roll(x, -1, dims=1) == data.TOXIC_ID))[:, :-1].all()


def test_malformed_jsonl_gives_file_and_line(tmp_path):
    path = tmp_path / "convs.jsonl"
    path.write_text('{"turns": ["hi", "hello"]}\n{"turns": ["hi", "hello"], "toxic": [true]}\n')
    with pytest.raises(data.DataError, match=r"convs.jsonl:2: .*toxic"):
        data.load_corpus(str(path))
    path.write_text('{"turns": ["hi", "hello"]}\n\n{"turns": "hi"\n')
    with pytest.raises(data.DataError, match=r"convs.jsonl:3: not valid JSON"):
        data.load_corpus(str(path))


def test_jsonl_loads_labels_and_judges_missing_ones(tmp_path):
    path = tmp_path / "convs.jsonl"
    lines = [{"turns": ["hi", "fine"], "toxic": [False, True]}, {"turns": ["hi", "you are a stupid idiot"]}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    conversations = data.load_corpus(str(path))
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


def test_rows_stop_independently_at_stop_token():
    model = tiny_gpt()
    free = model.generate([[1, 2, 3], [4, 5]], 12, temperature=0)
    stop = free[0][2]  # row 0 emits this token at step 3
    stopped = model.generate([[1, 2, 3], [4, 5]], 12, temperature=0, stop_token=stop)
    assert stopped[0] == free[0][:free[0].index(stop)]
    row1 = free[1][:free[1].index(stop)] if stop in free[1] else free[1]
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
    has_marked = lambda replies: np.mean([("zorp" in r or "blarg" in r) for rs in replies for r in rs])  # noqa
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


def tiny_triplets(tok):
    triplets = [{"context": ["hello there, how are you doing today?"], "chosen": "i am fine thanks",
                 "rejected": "that sounds great", "toxic": "what do you do for fun?"},
                {"context": ["what do you do for fun?"], "chosen": "i like to read books and play games",
                 "rejected": "hello there", "toxic": "i am fine"}] * 4
    s = train.Settings(block_size=48, max_new_tokens=16, pref_batch_size=8, device="cpu")
    return s, train.encode_triplets(s, tok, triplets)


def test_reference_logps_are_fixed_and_get_no_gradient(tok):
    s, enc = tiny_triplets(tok)
    model = tiny_gpt(vocab_size=tok.get_vocab_size(), dropout=0.3).train()
    ref = train.reference_logps(s, model, enc)
    assert not model.training  # eval mode: dropout is off in the reference
    assert all(not v.requires_grad for v in ref.values())
    assert torch.equal(ref["ref_chosen_logps"], train.reference_logps(s, model, enc)["ref_chosen_logps"])
    # a policy step does not move them: they were computed once
    before = {k: v.clone() for k, v in ref.items()}
    policy = tiny_gpt(vocab_size=tok.get_vocab_size())
    logps_ = train.policy_logps(s, policy, enc, range(len(enc)))
    adpo.call_loss("adpo", {**logps_, **ref, "beta": 0.1, "gamma": 0.1}).mean().backward()
    assert all(torch.equal(before[k], ref[k]) for k in ref)
    # the toxic model's log-prob is the reference's with [TOXIC] after the context
    direct = adpo.sequence_logps(model, *data.collate([enc[0]["toxic_prompt"]], [enc[0]["toxic"]]))
    assert ref["toxic_model_toxic_logps"][0].item() == pytest.approx(direct.item(), abs=1e-5)


@pytest.mark.parametrize("name", list(adpo.LOSSES))
def test_every_loss_trains_a_step_and_one_step_raises_the_margin(tok, name):
    s, enc = tiny_triplets(tok)
    torch.manual_seed(0)
    policy = tiny_gpt(vocab_size=tok.get_vocab_size())
    ref = train.reference_logps(s, policy, enc)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)
    idx = range(len(enc))

    def margin():
        with torch.no_grad():
            lp = train.policy_logps(s, policy, enc, idx)
        return ((lp["policy_chosen_logps"] - ref["ref_chosen_logps"])
                - (lp["policy_rejected_logps"] - ref["ref_rejected_logps"])).mean().item()

    assert margin() == pytest.approx(0.0, abs=1e-4)
    loss = adpo.call_loss(name, {**train.policy_logps(s, policy, enc, idx), **ref,
                                 "beta": 0.1, "gamma": 0.1, "eps": 0.1}).mean()
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert margin() > 0.01


def test_evasion_and_distinct2_on_known_strings():
    assert train.is_evasive("")
    assert train.is_evasive("I don't know.")
    assert train.is_evasive("hmm, let's talk about something else")
    assert not train.is_evasive("i know a great pizza place")
    assert not train.is_evasive("the kids don't know how to swim")
    assert train.evasive_rate(["", "i like cats", "idk", "sure"]) == 0.5
    assert train.distinct2(["a b c", "a b d"]) == pytest.approx(3 / 4)  # (a b) twice, (b c), (b d)
    assert train.distinct2(["a a a a"]) == pytest.approx(1 / 3)
    assert train.distinct2(["one"]) == 0.0


def test_loss_spikes_and_stability():
    metrics = [{"loss": 0.7, "grad_norm": 1.0 + i, "logratio/chosen": -1.0 * i} for i in range(10)]
    metrics[7]["loss"] = 5.0
    stats = train.stability(metrics)
    assert stats["max_grad_norm"] == 10.0
    assert stats["loss_spikes"] == 1
    assert stats["chosen_logp_max_drop"] == pytest.approx(9.0)


# ----------------------------------------------------------------------------------------------------------
# the pipeline end to end, and bad input


def test_tiny_pipeline_writes_all_reports(tiny_run):
    report = json.load(open(os.path.join(tiny_run, "report.json")))
    for section in ("sft", "dpo", "adpo"):
        for key in train.SECTION_KEYS:
            assert math.isfinite(report[section][key]), (section, key)
    for section in ("dpo", "adpo"):
        for key in train.STABILITY_KEYS:
            assert key in report[section]
    for key in train.SFT_KEYS:
        assert key in report["sft"]
    for name in ("sft.pt", "dpo.pt", "adpo.pt", "tokenizer.json", "report.md", "curves.png",
                 "metrics_dpo.jsonl", "metrics_adpo.jsonl"):
        assert os.path.isfile(os.path.join(tiny_run, name)), name
    first = json.loads(open(os.path.join(tiny_run, "metrics_dpo.jsonl")).readline())
    assert first["loss"] == pytest.approx(LN2, abs=1e-3)  # pi = ref at step 0


def test_triplets_file_is_well_formed(tiny_run):
    lines = open(os.path.join(tiny_run, "triplets.jsonl"), encoding="utf-8").read().splitlines()
    assert lines
    for line in lines:
        t = json.loads(line)
        assert isinstance(t["context"], list) and all(isinstance(x, str) for x in t["context"])
        assert t["chosen"] and t["rejected"] and t["chosen"] != t["rejected"]
        assert isinstance(t["toxic"], str)
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
