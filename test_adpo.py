"""adpo.py: sequence log-probs, the losses against hand-computed numbers, their gradients and metrics, and the
reference and toxic-model log-probs the preference stage feeds them (train.reference_logps). The tok, tiny_gpt
and tiny_triplets fixtures are in conftest.py."""

import dataclasses
import math

import pytest
import torch

import adpo
import data
import train

LN2 = math.log(2)


# ----------------------------------------------------------------------------------------------------------
# log-probs


def test_sequence_logps_equal_a_token_loop_and_ignore_padding(tiny_gpt):
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


def test_concatenated_forward_equals_separate_forwards(tiny_gpt):
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
# the reference and the inner toxic model, on a tiny model


def test_reference_logps_are_fixed_and_get_no_gradient(tiny_triplets, tiny_gpt, tok):
    s, enc = tiny_triplets
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


def test_toxic_model_scores_the_toxic_reply_after_the_control_token(tiny_triplets, tiny_gpt, tok):
    s, enc = tiny_triplets
    model = tiny_gpt(vocab_size=tok.get_vocab_size())
    ref = train.reference_logps(s, model, enc)
    for e in enc:
        assert e["toxic_prompt"] == e["prompt"] + [data.TOXIC_ID]  # the same context, then [TOXIC]
        assert data.TOXIC_ID not in e["prompt"]
    # tox(y_t|x) = ref(y_t | x, [TOXIC]): scored after the token, so it differs from ref(y_t|x)
    direct = adpo.sequence_logps(model, *data.collate([enc[0]["toxic_prompt"]], [enc[0]["toxic"]]))
    assert ref["toxic_model_toxic_logps"][0].item() == pytest.approx(direct.item(), abs=1e-5)
    assert (ref["toxic_model_toxic_logps"] - ref["ref_toxic_logps"]).abs().min() > 1e-4


def test_policy_equals_reference_at_step_0_after_sft_with_dropout(tiny_triplets, tiny_gpt, tok):
    """An SFT model with dropout 0.5: the preference stage must still start with pi = ref exactly."""
    s, enc = tiny_triplets
    s = dataclasses.replace(s, pref_iters=2, pref_lr=1e-3, pref_warmup_iters=0)
    sft = tiny_gpt(vocab_size=tok.get_vocab_size(), dropout=0.5)
    ref = train.reference_logps(s, sft, enc)
    for loss in ("dpo", "adpo"):
        _, metrics = train.train_preference(s, loss, sft, enc, ref, seed=0)
        assert metrics[0]["logratio/chosen"] == pytest.approx(0.0, abs=1e-5)
        assert metrics[0]["logratio/rejected"] == pytest.approx(0.0, abs=1e-5)
        if loss == "dpo":
            assert metrics[0]["loss"] == pytest.approx(LN2, abs=1e-6)
