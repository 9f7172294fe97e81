"""
The loss checker: before training a loss for an hour, check the properties every loss of the family must
have, on numbers small enough to verify by hand. Exit 0 when every check passes, 1 when one fails, 2 for a
bad command line.

    python -m tools.check_loss --check=adpo   # or --check=all; `python adpo.py --check=NAME` forwards here
"""

import inspect
import math
import sys
from dataclasses import dataclass

import torch

import adpo
from harness import run_main
from harness.configurator import apply_overrides, parse_overrides

CHECK_HYPER = {"beta": 0.1, "gamma": 0.1, "eps": 0.1}  # the losses' own defaults (train.py uses gamma 0.03)

# L when the policy equals its baseline on every reply (pi = ref on y_w and y_l, pi = tox on y_t: every h
# is 0). A loss not named here is only checked to give one value for every example (it may depend on the
# log-ratios only, never on the log-probs themselves); add its expected value here once you have derived it.
EXPECTED_AT_REFERENCE = {
    "dpo": math.log(2),  # -log sigmoid(0)
    "adpo": math.log(2),
    "adpo_split": 2 * math.log(2),  # two margins, each -log sigmoid(0)
    "ipo": (1 / (2 * CHECK_HYPER["beta"])) ** 2,  # (0 - 1/(2 beta))^2 = 25 at beta = 0.1
    "cdpo": math.log(2),  # -(1 - eps) log 1/2 - eps log 1/2
}

# A loss whose definition at gamma = 0 is another loss of the family: it must equal that loss there.
# (ADPO-split is not one: at gamma = 0 it still has its second margin, -log sigmoid(beta h_w).)
EQUALS_AT_GAMMA_0 = {"adpo": "dpo"}


def loss_inputs(h_w, h_l, h_t, dtype=torch.float64):
    """The arguments the trainer offers a loss (see train.py: policy_logps, reference_logps, its hyper dict),
    for examples with the given log-ratios. The log-probs themselves differ from example to example, so a
    loss that uses them instead of the log-ratios shows it."""
    t = lambda values: torch.tensor(values, dtype=dtype)  # noqa: E731
    h_w, h_l, h_t = t(h_w), t(h_l), t(h_t)
    i = torch.arange(len(h_w), dtype=dtype)  # other baselines, and other gaps between them, in every example
    ref_chosen, ref_rejected, toxic_model_toxic = -10.0 - i, -12.0 - 3 * i, -15.0 - 2 * i
    return {"policy_chosen_logps": ref_chosen + h_w, "policy_rejected_logps": ref_rejected + h_l,
            "policy_toxic_logps": toxic_model_toxic + h_t, "ref_chosen_logps": ref_chosen,
            "ref_rejected_logps": ref_rejected, "toxic_model_toxic_logps": toxic_model_toxic,
            "ref_toxic_logps": toxic_model_toxic - 3.0 - i, **CHECK_HYPER}


class BigramLM(torch.nn.Module):
    """The smallest model with the GPT's contract, model(idx) -> (logits, loss): a table of next-token logits
    given the current token. Fixed by its seed: the optimizer-step check needs no data and no training."""

    def __init__(self, vocab_size=16, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.logits = torch.nn.Parameter(torch.randn(vocab_size, vocab_size, generator=generator))

    def forward(self, idx):
        return self.logits[idx], None  # (B, T, vocab)


def one_step_margin(name):
    """The mean margin h_w - h_l of three fixed triplets before and after one Adam step on loss `name`, on a
    BigramLM whose frozen copy is ref (and, with the control token after x, tox). Adam's first step moves each
    weight by about lr whatever the loss's scale, so IPO (squared) and DPO (scaled by beta) compare alike."""
    control = 15  # the bigram model's [TOXIC]
    prompts, chosen, rejected, toxic = [[8], [9], [10]], [[1, 2, 3]] * 3, [[4, 5, 6]] * 3, [[7, 11, 12]] * 3

    def rows(prompts, replies):  # labels -1 on the prompt: only the reply is scored, as in data.collate
        return (torch.tensor([p + r for p, r in zip(prompts, replies)]),
                torch.tensor([[-1] * len(p) + r for p, r in zip(prompts, replies)]))

    model = BigramLM()
    batches = {"chosen": rows(prompts, chosen), "rejected": rows(prompts, rejected),
               "toxic": rows(prompts, toxic)}
    with torch.no_grad():  # the frozen SFT model, before the step
        ref = {"ref_chosen_logps": adpo.sequence_logps(model, *batches["chosen"]),
               "ref_rejected_logps": adpo.sequence_logps(model, *batches["rejected"]),
               "ref_toxic_logps": adpo.sequence_logps(model, *batches["toxic"]),
               "toxic_model_toxic_logps": adpo.sequence_logps(
                   model, *rows([p + [control] for p in prompts], toxic))}

    def margin():
        with torch.no_grad():
            return (adpo.sequence_logps(model, *batches["chosen"]) - ref["ref_chosen_logps"]
                    - adpo.sequence_logps(model, *batches["rejected"])
                    + ref["ref_rejected_logps"]).mean().item()

    before = margin()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    policy = {f"policy_{k}_logps": adpo.sequence_logps(model, *b) for k, b in batches.items()}
    adpo.call_loss(name, {**policy, **ref, **CHECK_HYPER}).mean().backward()
    optimizer.step()
    return before, margin()


def _numbers(t):
    return "[" + ", ".join(f"{v:.4f}" for v in t.flatten().tolist()) + "]"


def check_loss(name):
    """The property checks of loss `name`: a list of (status, property, detail), status PASS, FAIL or SKIP.
    A check that raises fails with the exception as its detail: a student's loss may crash on any of them."""
    fn = adpo.get_loss(name)
    params = inspect.signature(fn).parameters
    results = []

    def check(prop, test):
        try:
            ok, detail = test()
            results.append(("PASS" if ok else "FAIL", prop, detail))
        except Exception as e:  # noqa: BLE001: report it as a failed property, go on with the others
            results.append(("FAIL", prop, f"raised {type(e).__name__}: {e}"))

    def loss_at(h_w, h_l, h_t, **changes):
        return adpo.call_loss(name, {**loss_inputs(h_w, h_l, h_t), **changes})

    # four examples near pi = ref, margins between -2 and 2 (IPO rightly turns back past 1/(2 beta) = 5)
    h_w, h_l, h_t = [0.0, 0.5, -1.0, 1.0], [0.0, -0.5, 1.0, -1.0], [0.0, -1.0, 1.0, 0.5]
    base = lambda: loss_at(h_w, h_l, h_t).detach()  # noqa: E731
    step = 0.1  # nats added to one reply's log-prob

    def shape():
        out = loss_at(h_w, h_l, h_t)
        return tuple(out.shape) == (4,), f"got shape {tuple(out.shape)} for B = 4 (return per-example losses)"
    check("per-example output of shape (B,)", shape)

    def extremes():
        # every combination of -1e4 and 0 over the log-probs the loss takes, in float32 as in training
        names = [p for p in params if p.endswith("_logps")]
        grid = torch.cartesian_prod(*[torch.tensor([-1e4, 0.0])] * len(names)).reshape(-1, len(names))
        inputs = {p: grid[:, i].clone().requires_grad_(p.startswith("policy_")) for i, p in enumerate(names)}
        out = adpo.call_loss(name, {**inputs, **CHECK_HYPER})
        out.sum().backward()
        grads = {p: x.grad for p, x in inputs.items() if x.grad is not None}
        bad_values = int((~torch.isfinite(out)).sum())
        bad_grads = {p: int((~torch.isfinite(g)).sum()) for p, g in grads.items()
                     if not torch.isfinite(g).all()}
        where = ", ".join(f"d/d {p}: {n}" for p, n in bad_grads.items())
        return not bad_values and not bad_grads, (
            f"{bad_values} of {out.numel()} values not finite"
            + (f"; gradients not finite ({where})" if bad_grads else ""))
    check("finite values and gradients at log-probs of -1e4 and 0", extremes)

    def falls(reply, sign):
        def test():
            key = f"policy_{reply}_logps"
            moved = loss_inputs(h_w, h_l, h_t)[key] + sign * step
            before, after = base(), loss_at(h_w, h_l, h_t, **{key: moved}).detach()
            return bool((after < before).all()), \
                f"loss {_numbers(before)} -> {_numbers(after)} " \
                f"when log pi(y_{reply[0]}|x) moves by {sign * step:+}"
        return test
    for reply, sign in (("chosen", +1), ("rejected", -1), ("toxic", -1)):
        prop = f"the loss falls when the policy {'raises' if sign > 0 else 'lowers'} the {reply} reply"
        if f"policy_{reply}_logps" in params:
            check(prop, falls(reply, sign))
        else:  # DPO has no toxic reply; a student's loss may leave out the rejected one
            results.append(("SKIP", prop, f"the loss does not take policy_{reply}_logps"))

    def at_reference():
        # a wrong shape fails above, not here
        out = loss_at([0.0] * 4, [0.0] * 4, [0.0] * 4).detach().reshape(-1)
        if name not in EXPECTED_AT_REFERENCE:
            return bool(torch.allclose(out, out[0].expand_as(out))), \
                f"values {_numbers(out)} differ between examples with the same log-ratios " \
                "(no expected value in check_loss.EXPECTED_AT_REFERENCE)"
        expected = EXPECTED_AT_REFERENCE[name]
        return bool(torch.allclose(out, torch.full_like(out, expected))), \
            f"expected {expected:.4f}, got {_numbers(out)}"
    expected = EXPECTED_AT_REFERENCE.get(name)
    check("value when the policy equals the reference (every h = 0)"
          + (f": {expected:.4f}" if expected is not None else ": one value for every example"), at_reference)

    if "gamma" in params and name in EQUALS_AT_GAMMA_0:
        other = EQUALS_AT_GAMMA_0[name]

        def gamma_zero():
            ours = loss_at(h_w, h_l, h_t, gamma=0.0).detach()
            theirs = adpo.call_loss(other, {**loss_inputs(h_w, h_l, h_t), "gamma": 0.0}).detach()
            return bool(torch.allclose(ours, theirs)), \
                f"{name} {_numbers(ours)} vs {other} {_numbers(theirs)}"
        check(f"equals {other} at gamma = 0", gamma_zero)
    elif "gamma" in params:
        results.append(("SKIP", "equals its DPO counterpart at gamma = 0",
                        "not its definition (add it to check_loss.EQUALS_AT_GAMMA_0 if it is)"))

    def optimizer_step():
        before, after = one_step_margin(name)
        return after > before, f"margin h_w - h_l {before:.4f} -> {after:.4f}"
    check("one optimizer step on a tiny model raises the margin h_w - h_l", optimizer_step)
    return results


@dataclass
class CheckSettings:
    check: str = "all"  # a loss in adpo.LOSSES, or all


def main(argv):
    """Prints the checklist; returns 0 when every check passes, 1 when one fails, 2 for a bad command line."""
    try:
        s = apply_overrides(CheckSettings(), parse_overrides(argv))
        names = list(adpo.LOSSES) if s.check == "all" else [s.check]
        for name in names:
            adpo.get_loss(name)
    except ValueError as e:  # ConfigError, or an unknown loss
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for name in names:
        results = check_loss(name)
        print(f"{name}: {adpo.LOSSES[name].__name__}{inspect.signature(adpo.LOSSES[name])}")
        for status, prop, detail in results:
            print(f"  {status}  {prop}" + (f"  ({detail})" if status != "PASS" else ""))
        count = {k: sum(status == k for status, _, _ in results) for k in ("PASS", "FAIL", "SKIP")}
        print(f"  {count['PASS']} passed, {count['FAIL']} failed, {count['SKIP']} skipped")
        failed += count["FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
