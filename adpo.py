"""
Sequence log-probabilities and the DPO / ADPO loss family.

Symbols, as in the README. x: a context. y_w, y_l: chosen and rejected replies. y_t: a toxic reply the SFT
model wrote with the control token. pi: the policy. ref: the frozen SFT model. tox: the same frozen SFT model
with [TOXIC] after x, tox(y|x) = ref(y | x, [TOXIC]). log pi(y|x) sums the reply tokens' log-probabilities.

    h_w = log pi(y_w|x) - log ref(y_w|x)     h_l = log pi(y_l|x) - log ref(y_l|x)
    h_t = log pi(y_t|x) - log tox(y_t|x)

Each loss returns per-example losses of shape (B,). A loss names the inputs it needs as parameters; the
trainer passes exactly those (see call_loss). To add one: write the function, add a line to LOSSES, and run
`python adpo.py --check=NAME` (the same as `python -m tools.check_loss --check=NAME`): the properties every
loss must have.
"""

import inspect

import torch
import torch.nn.functional as F


def token_logps(model, input_ids, labels):
    """log pi of each labelled token of right-padded (B, T) rows: (B, T - 1), 0 where labels are -1 (context,
    padding). Right padding is harmless: causal attention never looks forward, and its labels are -1."""
    logits, _ = model(input_ids)  # (B, T, vocab)
    logits = logits[:, :-1, :].float()  # position i predicts token i + 1; float32: bf16 sums lose whole nats
    targets = labels[:, 1:]
    mask = targets != -1
    logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    return logps * mask


def sequence_logps(model, input_ids, labels):
    """log pi(y|x) for each row: the sum of log-probabilities of the tokens where labels != -1. (B,)"""
    return token_logps(model, input_ids, labels).sum(-1)


def concatenated_logps(model, batches):
    """One forward for several (input_ids, labels) batches (chosen, rejected, toxic): pad to one length,
    stack, run once, split. Returns one (B,) tensor per batch."""
    T = max(ids.size(1) for ids, _ in batches)
    ids = torch.cat([F.pad(i, (0, T - i.size(1)), value=0) for i, _ in batches])
    labels = torch.cat([F.pad(l, (0, T - l.size(1)), value=-1) for _, l in batches])
    logps = sequence_logps(model, ids, labels)
    return list(logps.split([i.size(0) for i, _ in batches]))


# ----------------------------------------------------------------------------------------------------------
# the losses. At step 0 pi = ref, so h_w = h_l = 0 and DPO equals ln 2 = 0.693: not a bug. ADPO's h_t compares
# pi with tox, not ref, so it starts near ln 2, not at it (README, "The method").


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """DPO:  L = -log sigmoid( beta (h_w - h_l) )"""
    h_w = policy_chosen_logps - ref_chosen_logps
    h_l = policy_rejected_logps - ref_rejected_logps
    return -F.logsigmoid(beta * (h_w - h_l))


def adpo_loss(policy_chosen_logps, policy_rejected_logps, policy_toxic_logps, ref_chosen_logps,
              ref_rejected_logps, toxic_model_toxic_logps, beta=0.1, gamma=0.1):
    """ADPO:  L = -log sigmoid( beta (h_w - h_l) - gamma h_t ),   h_t = log pi(y_t|x) - log tox(y_t|x)

    The extra term rewards the policy for giving its own toxic reply less probability than the toxic model
    (the SFT model with [TOXIC]) gives it; the baseline for y_t is tox, not ref."""
    h_w = policy_chosen_logps - ref_chosen_logps
    h_l = policy_rejected_logps - ref_rejected_logps
    h_t = policy_toxic_logps - toxic_model_toxic_logps
    return -F.logsigmoid(beta * (h_w - h_l) - gamma * h_t)


def adpo_split_loss(policy_chosen_logps, policy_rejected_logps, policy_toxic_logps, ref_chosen_logps,
                    ref_rejected_logps, toxic_model_toxic_logps, beta=0.1, gamma=0.1):
    """ADPO-split:  L = -log sigmoid( beta (h_w - h_l) ) - log sigmoid( beta h_w - gamma h_t )

    Two separate margins: chosen over rejected, and chosen over the toxic reply."""
    h_w = policy_chosen_logps - ref_chosen_logps
    h_l = policy_rejected_logps - ref_rejected_logps
    h_t = policy_toxic_logps - toxic_model_toxic_logps
    return -F.logsigmoid(beta * (h_w - h_l)) - F.logsigmoid(beta * h_w - gamma * h_t)


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """IPO:  L = ( (h_w - h_l) - 1/(2 beta) )^2

    h sums the reply's token log-probs, as everywhere here, so the target 1/(2 beta) is for the whole reply;
    TRL's "ipo" averages them per token, so there the same beta sets a target per token."""
    h_w = policy_chosen_logps - ref_chosen_logps
    h_l = policy_rejected_logps - ref_rejected_logps
    return ((h_w - h_l) - 1 / (2 * beta)) ** 2


def cdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
              eps=0.1):
    """cDPO (conservative DPO, labels flipped with probability eps):
    L = -(1 - eps) log sigmoid( beta (h_w - h_l) ) - eps log sigmoid( -beta (h_w - h_l) )"""
    margin = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    return -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)


LOSSES = {
    "dpo": dpo_loss,
    "adpo": adpo_loss,
    "adpo_split": adpo_split_loss,
    "ipo": ipo_loss,
    "cdpo": cdpo_loss,
}


def get_loss(name):
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    return LOSSES[name]


def call_loss(name, available):
    """Call loss `name` with the entries of `available` (log-probs and hyperparameters) that it names."""
    fn = get_loss(name)
    params = inspect.signature(fn).parameters
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in available]
    if missing:
        raise ValueError(f"loss {name!r} needs {', '.join(missing)}, which the trainer does not provide")
    return fn(**{p: available[p] for p in params if p in available})


def preference_metrics(policy_chosen_logps, policy_rejected_logps, policy_toxic_logps, ref_chosen_logps,
                       ref_rejected_logps, toxic_model_toxic_logps, ref_toxic_logps=None, beta=0.1,
                       gamma=0.1):
    """The numbers DPO practitioners read (TRL's names), plus the toxic reply's. All detached floats.
    logratio/*: log pi(y|x) - log ref(y|x) for each reply, the SFT model without the token as baseline."""
    with torch.no_grad():
        chosen_logratios = policy_chosen_logps - ref_chosen_logps  # h_w
        rejected_logratios = policy_rejected_logps - ref_rejected_logps  # h_l
        rewards_chosen, rewards_rejected = beta * chosen_logratios, beta * rejected_logratios
        metrics = {
            "rewards/chosen": rewards_chosen.mean().item(),
            "rewards/rejected": rewards_rejected.mean().item(),
            "rewards/margins": (rewards_chosen - rewards_rejected).mean().item(),
            "rewards/accuracies": (rewards_chosen > rewards_rejected).float().mean().item(),  # strict >
            "logps/chosen": policy_chosen_logps.mean().item(),
            "logps/rejected": policy_rejected_logps.mean().item(),
            "logratio/chosen": chosen_logratios.mean().item(),
            "logratio/rejected": rejected_logratios.mean().item(),
        }
        if policy_toxic_logps is not None:
            metrics["rewards/toxic"] = (gamma * (policy_toxic_logps - toxic_model_toxic_logps)).mean().item()
            metrics["logps/toxic"] = policy_toxic_logps.mean().item()
            if ref_toxic_logps is not None:
                metrics["logratio/toxic"] = (policy_toxic_logps - ref_toxic_logps).mean().item()
    return metrics


if __name__ == "__main__":  # `python adpo.py --check=NAME`: the loss checker, a script of its own
    import runpy
    runpy.run_module("tools.check_loss", run_name="__main__")
