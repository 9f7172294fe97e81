"""evaluate.py: val_ppl, evasion and distinct-2, training stability, bootstrap intervals over contexts, pooling
seeds, differences between methods, the second (wordlist) judge, relevance, and the gradient by reply. The tok,
tiny_gpt, tiny_triplets and token_loop_logp fixtures are in conftest.py."""

import math

import numpy as np
import pytest
import torch

import adpo
import data
import evaluate
import train
from harness import reports

# ----------------------------------------------------------------------------------------------------------
# the metrics


def test_val_ppl_scores_whole_human_replies(tiny_gpt, token_loop_logp, tok):
    """A held-out reply longer than max_new_tokens (the old evaluation cut it there), and one longer than the
    block, are scored whole, with their end-of-turn."""
    model = tiny_gpt(vocab_size=tok.get_vocab_size(), block_size=128)
    context = ["what do you do for fun?"]
    reply = "i like to read books and play games, and hello there, how are you doing today? " * 2
    reply_ids = data.encode(tok, reply) + [data.EOT_ID]
    prompt = data.context_ids(tok, context)
    assert 48 < len(reply_ids) < 128 - len(prompt)  # longer than the presets' max_new_tokens, fits in the block
    expected = math.exp(-token_loop_logp(model, prompt, reply_ids) / len(reply_ids))
    assert evaluate.val_ppl(model, tok, [(context, reply)], 8) == pytest.approx(expected, rel=1e-4)
    # longer than the block: windows of at most 128 tokens, every token scored once
    long_reply = reply * 3
    long_ids = data.encode(tok, long_reply) + [data.EOT_ID]
    assert len(long_ids) > 128
    seq, total = prompt + long_ids, 0.0
    for a in range(len(prompt), len(seq), 64):  # each window: 64 new tokens after the 64 before them
        b = min(a + 64, len(seq))
        total += token_loop_logp(model, seq[max(0, b - 128):a], seq[a:b])
    expected = math.exp(-total / len(long_ids))
    assert evaluate.val_ppl(model, tok, [(context, long_reply)], 8) == pytest.approx(expected, rel=1e-4)


def test_evasion_and_distinct2_on_known_strings():
    assert evaluate.is_evasive("")
    assert evaluate.is_evasive("I don't know.")
    assert evaluate.is_evasive("hmm, let's talk about something else")
    assert not evaluate.is_evasive("i know a great pizza place")
    assert not evaluate.is_evasive("the kids don't know how to swim")
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
# intervals, pooled seeds, differences


def test_bootstrap_interval_is_over_contexts_not_replies():
    """100 contexts of 4 replies each, every context all toxic or all clean (p = 0.5): the replies of a
    context are not independent, so the interval is that of 100 draws (half width ~ 1.96 * 0.05), not 400."""
    num = np.array([4.0, 0.0] * 50)
    den = np.full(100, 4.0)
    low, high = reports.percentile_ci(reports.bootstrap_draws(num, den))
    assert low < 0.5 < high
    assert 0.16 < high - low < 0.24
    no_spread = reports.bootstrap_draws(np.full(10, 2.0), np.full(10, 4.0))
    assert reports.percentile_ci(no_spread) == [0.5, 0.5]  # no spread, no width


def test_summarize_pools_seeds_and_reports_intervals():
    seed1 = ({"toxicity_adversarial": 0.25, "distinct2": 0.5},
             {"toxicity_adversarial": (np.array([1.0, 0.0, 0.0, 0.0]), np.full(4, 1.0))})
    seed2 = ({"toxicity_adversarial": 0.75, "distinct2": 0.7},
             {"toxicity_adversarial": (np.array([1.0, 1.0, 1.0, 0.0]), np.full(4, 1.0))})
    section = reports.summarize([seed1, seed2])
    assert section["toxicity_adversarial"] == pytest.approx(0.5)  # 4 toxic of 8 replies
    assert section["toxicity_adversarial_std"] == pytest.approx(0.25)
    assert section["distinct2"] == pytest.approx(0.6) and "distinct2_ci95" not in section
    low, high = section["toxicity_adversarial_ci95"]
    assert 0 <= low < 0.5 < high <= 1
    # val_ppl is pooled as a mean negative log-likelihood per token, then exponentiated
    units = {"val_ppl": (np.array([2.0, 4.0]), np.array([1.0, 1.0]))}
    assert reports.summarize([({"val_ppl": 0.0}, units)])["val_ppl"] == pytest.approx(math.exp(3.0))


def units_of(tox):
    """A seed's units for toxicity_adversarial from per-context toxic counts out of 4 replies."""
    tox = np.asarray(tox, float)
    return {"toxicity_adversarial": (tox, np.full(len(tox), 4.0))}


def test_clustered_interval_includes_the_seeds_noise():
    """Two seeds that disagree (one writes toxic replies to every context, the other to none): over contexts
    with the seeds pooled the interval is a point; resampling the seeds too, it spans what the seeds span."""
    runs = [({"toxicity_adversarial": 0.0}, units_of([0.0] * 50)),
            ({"toxicity_adversarial": 1.0}, units_of([4.0] * 50))]
    section = reports.summarize(runs)
    assert section["toxicity_adversarial_ci95"] == [0.5, 0.5]
    assert section["toxicity_adversarial_ci95_clustered"] == [0.0, 1.0]
    assert "toxicity_adversarial_ci95_clustered" not in reports.summarize(runs[:1])  # one seed: none


def test_paired_differences_cancel_the_shared_noise():
    """Two methods on the same 60 contexts, B one toxic reply fewer on every fourth context: their own
    intervals overlap (the contexts vary a lot), the paired interval of B - A excludes 0; A against itself
    is 0."""
    rng = np.random.default_rng(0)
    a = rng.integers(1, 5, size=60).astype(float)
    b = a - (np.arange(60) % 4 == 0)
    runs = {"sft": [({"toxicity_adversarial": 0.0}, units_of(a))],
            "dpo": [({"toxicity_adversarial": 0.0}, units_of(a))],
            "adpo": [({"toxicity_adversarial": 0.0}, units_of(b))]}
    report = {name: reports.summarize(r) for name, r in runs.items()}
    lo_a, hi_a = report["dpo"]["toxicity_adversarial_ci95"]
    lo_b, hi_b = report["adpo"]["toxicity_adversarial_ci95"]
    assert lo_a < hi_b  # the unpaired intervals overlap
    reports.paired_differences(report, runs)
    assert report["adpo"]["toxicity_adversarial_diff_vs_dpo"] == pytest.approx(-15 / 240)
    low, high = report["adpo"]["toxicity_adversarial_diff_vs_dpo_ci95"]
    assert low < -15 / 240 < high < 0
    assert report["dpo"]["toxicity_adversarial_diff_vs_sft_ci95"] == [0.0, 0.0]
    assert "toxicity_adversarial_diff_vs_dpo" not in report["dpo"] and "sft" in report  # no self, no sft vs
    assert reports.differences(report, ["sft", "dpo", "adpo"], ["toxicity_adversarial"]) == \
        "- toxicity_adversarial: dpo ~ sft, adpo < dpo, adpo < sft"


def test_paired_differences_over_two_seeds_vary_with_the_seeds():
    """With two seeds whose difference disagrees in sign, the paired interval holds 0: training noise."""
    a = np.full(40, 2.0)
    runs = {"sft": [({}, units_of(a)), ({}, units_of(a))],
            "dpo": [({}, units_of(a)), ({}, units_of(a))],
            "adpo": [({}, units_of(a - 1)), ({}, units_of(a + 1))]}
    report = {name: reports.summarize(r) for name, r in runs.items()}
    reports.paired_differences(report, runs)
    low, high = report["adpo"]["toxicity_adversarial_diff_vs_dpo_ci95"]
    # per-seed differences -0.25 and 0.25: mean 0, standard error 0.25, t(1 degree of freedom) = 12.706
    assert low == pytest.approx(-12.706 * 0.25, rel=1e-3) and high == pytest.approx(12.706 * 0.25, rel=1e-3)


def test_seeds_that_tie_on_a_few_toxic_replies_prove_no_difference():
    """The review's case: 128 contexts x 4 replies, DPO 3 and 5 toxic replies of 512, ADPO 2 and 4. The two
    per-seed differences are equal (one reply), but a count is known only to within one reply."""
    def seed(toxic):
        counts = np.zeros(128)
        counts[:toxic] = 1.0
        return ({}, units_of(counts))
    runs = {"dpo": [seed(3), seed(5)], "adpo": [seed(2), seed(4)]}
    report = {name: reports.summarize(r) for name, r in runs.items()}
    reports.paired_differences(report, runs)
    low, high = report["adpo"]["toxicity_adversarial_diff_vs_dpo_ci95"]
    assert report["adpo"]["toxicity_adversarial_diff_vs_dpo"] == pytest.approx(-1 / 512)
    assert low < 0 < high
    assert reports.differences(report, ["dpo", "adpo"], ["toxicity_adversarial"]) == \
        "- toxicity_adversarial: adpo ~ dpo"


def test_the_difference_and_its_interval_come_from_the_same_per_seed_values():
    """The review's case: denominators that differ between models and seeds (tokens per reply): the pooled
    difference is negative, every per-seed difference positive; the interval follows the per-seed ones."""
    def seed(num, den):
        return ({}, {"sft_logprob_per_token": (np.array([num / 2, num / 2]), np.array([den / 2, den / 2]))})
    runs = {"adpo": [seed(-10, 10), seed(-61, 20), seed(-10.5, 10)],
            "dpo": [seed(-30, 20), seed(-35, 10), seed(-31, 20)]}
    report = {name: reports.summarize(r) for name, r in runs.items()}
    reports.paired_differences(report, runs)
    diff = report["adpo"]["sft_logprob_per_token_diff_vs_dpo"]
    low, high = report["adpo"]["sft_logprob_per_token_diff_vs_dpo_ci95"]
    assert diff == pytest.approx((0.5 + 0.45 + 0.5) / 3) and low < diff < high and high > 0


def test_the_perplexity_interval_stays_above_1():
    """Two seeds at perplexity 40 and 60: the interval is taken on the log scale, then exponentiated."""
    runs = [({}, {"val_ppl": (np.full(10, math.log(p)), np.ones(10))}) for p in (40.0, 60.0)]
    low, high = reports.summarize(runs)["val_ppl_ci95_clustered"]
    assert 1 < low < 40 and high > 60


def test_t_quantiles():
    assert [reports.t975(df) for df in (1, 2, 5, 30)] == [12.706, 4.303, 2.571, 2.042]
    assert reports.t975(31) == pytest.approx(2.0395, abs=1e-3) and reports.t975(1000) == pytest.approx(1.9623,
                                                                                                       abs=1e-3)
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 3, 10, 30, 40, 120):
        assert reports.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)


def test_token_logratios_are_per_token_changes(tiny_triplets, tiny_gpt, tok, token_loop_logp):
    s, enc = tiny_triplets
    sft, policy = tiny_gpt(seed=0, vocab_size=tok.get_vocab_size()), tiny_gpt(seed=1, vocab_size=tok.get_vocab_size())
    triplets = [{"context": ["ctx"]}] * len(enc)
    out = evaluate.token_logratios({"same": sft, "other": policy}, sft, tok, enc, triplets, n=2)
    assert len(out) == 2
    e = enc[0]
    for row in ("chosen", "rejected", "toxic", "toxic_vs_tox"):
        reply = e[row.removesuffix("_vs_tox")]
        assert len(out[0][row]["tokens"]) == len(out[0][row]["other"]) == len(reply)
        assert out[0][row]["same"] == pytest.approx([0.0] * len(reply), abs=1e-5) or row == "toxic_vs_tox"
    assert out[0]["chosen"]["tokens"][-1] == "<eot>"  # the end-of-turn is a token of its own
    # the whole reply's change is the sum of the per-token ones: log pi(y|x) - log ref(y|x)
    want = token_loop_logp(policy, e["prompt"], e["chosen"]) - token_loop_logp(sft, e["prompt"], e["chosen"])
    assert sum(out[0]["chosen"]["other"]) == pytest.approx(want, abs=1e-4)
    want = token_loop_logp(policy, e["prompt"], e["toxic"]) - token_loop_logp(sft, e["toxic_prompt"], e["toxic"])
    assert sum(out[0]["toxic_vs_tox"]["other"]) == pytest.approx(want, abs=1e-4)
    assert out[0]["toxic_vs_tox"]["same"] == pytest.approx(out[0]["toxic_vs_tox"]["sft"])


# ----------------------------------------------------------------------------------------------------------
# the second judge, relevance, gradient diagnostics


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


@pytest.mark.parametrize("name", ["dpo", "adpo"])
def test_gradient_by_reply_is_measured_beside_the_update(tiny_triplets, tiny_gpt, tok, name):
    s, enc = tiny_triplets
    model = tiny_gpt(vocab_size=tok.get_vocab_size())
    ref = train.reference_logps(s, model, enc)
    hyper = {"beta": 0.1, "gamma": 0.3}

    def gradient(per_reply):
        model.zero_grad(set_to_none=True)
        logps_ = train.policy_logps(s, model, enc, range(len(enc)))
        loss_of = lambda lp: adpo.call_loss(name, {**lp, **ref, **hyper}).mean()  # noqa: E731
        loss_of(logps_).backward(retain_graph=per_reply)
        update = torch.cat([p.grad.flatten() for p in model.parameters()])
        metrics = evaluate.gradient_by_reply(loss_of, logps_, model, per_reply)
        assert torch.equal(update, torch.cat([p.grad.flatten() for p in model.parameters()]))  # p.grad as it was
        return update, metrics, logps_

    plain, plain_metrics, _ = gradient(False)
    split, metrics, logps_ = gradient(True)
    assert torch.equal(plain, split)  # measuring each reply's part leaves the update as it is
    assert metrics["coef/chosen"] == pytest.approx(plain_metrics["coef/chosen"])
    # each part by its own backward (a new forward: the measurement freed the kept graph, as it should);
    # the part derived from p.grad (the last one) must match it too
    logps_ = train.policy_logps(s, model, enc, range(len(enc)))
    loss = adpo.call_loss(name, {**logps_, **ref, **hyper}).mean()
    replies = ["chosen", "rejected"] + (["toxic"] if name == "adpo" else [])
    tensors = [logps_[f"policy_{k}_logps"] for k in replies]
    coefs = torch.autograd.grad(loss, tensors, retain_graph=True)
    params = list(model.parameters())
    for k, t, c in zip(replies, tensors, coefs):
        part = torch.autograd.grad((c * t).sum(), params, retain_graph=True, allow_unused=True)
        norm = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(part, params)]).norm()
        assert metrics[f"grad/{k}"] == pytest.approx(norm.item(), rel=1e-4), k
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


def test_the_indexed_word_list_answers_as_the_library():
    """evaluate.wordlist() indexes better-profanity's word list for speed: the same answer for every text."""
    from better_profanity import Profanity
    conversations = data.load_corpus(None, 0.5, 2000)
    texts = [t for c in conversations for t, toxic in zip(c.turns, c.toxic) if toxic][:30]
    texts += ["sh!t happens", "you a$$hole", "f u c k off", "what the fuuuck", "b1tch please", "@ss", "$h1t",
              "assessment", "class act", "hello there", "", "a", "i hate mondays", "go to hell"]
    library = Profanity()
    expected = [library.contains_profanity(t) for t in texts]
    assert list(evaluate.wordlist_judge(texts)) == expected and 5 < sum(expected) < len(texts)


def test_second_review_interval_cases():
    """Perplexity between two very different seeds stays above 1; zero toxic replies in every seed is no
    certainty of zero; the perplexity difference has the sign of the table's; unequal seeds are refused."""
    runs = [({}, {"val_ppl": (np.full(10, math.log(p)), np.ones(10))}) for p in (1.2, 30.0)]
    assert reports.summarize(runs)["val_ppl_ci95_clustered"][0] >= 1.0
    zero = [({}, units_of(np.zeros(128))) for _ in range(2)]
    low, high = reports.summarize(zero)["toxicity_adversarial_ci95_clustered"]
    assert low == 0.0 < high
    nll = {"dpo": [4.40, 4.40, 4.40], "adpo": [4.0, 4.35, 4.77]}
    runs = {name: [({}, {"val_ppl": (np.full(10, v), np.ones(10))}) for v in values] for name, values in nll.items()}
    report = {name: reports.summarize(r) for name, r in runs.items()}
    reports.paired_differences(report, runs)
    diff = report["adpo"]["val_ppl_diff_vs_dpo"]
    assert diff == pytest.approx(report["adpo"]["val_ppl"] - report["dpo"]["val_ppl"]) and diff < 0
    low, high = report["adpo"]["val_ppl_diff_vs_dpo_ci95"]
    assert low < diff < high
    runs["adpo"] = runs["adpo"][:2]
    with pytest.raises(ValueError, match="same seeds"):
        reports.paired_differences(report, runs)
