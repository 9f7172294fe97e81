"""
The whole ADPO pipeline: the paper's four steps, in order.

  1. sft       a small GPT on human chit-chat where each toxic reply follows [TOXIC]    -> sft.pt
  2. triplets  on contexts SFT never saw: K plain replies ranked by the judge into chosen
               y_w and rejected y_l, and one reply y_t sampled with [TOXIC]           -> triplets.jsonl
  3. pref      DPO and ADPO (or --loss=NAME) from sft.pt on the same triplets, data
               order, seed and steps: the loss is the only difference                -> dpo.pt, adpo.pt
  4. eval      toxicity, coherence, evasiveness and stability, side by side          -> report.json

    python train.py                       # the default preset: gpu with CUDA, else cpu
    python train.py --preset=tiny         # every stage in under a minute (tests and CI)
    python train.py --loss=ipo --beta=0.5 # any --key=value below
    torchrun --standalone --nproc_per_node=2 train.py   # 2 processes (GPUs; gloo on CPU)
"""

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

import adpo
import data
import evaluate
import harness
import sample
from model import GPT, GPTConfig, autocast


@dataclass
class Settings:
    # run
    preset: str = ""  # tiny | cpu | gpu | gpt2; empty: gpu when CUDA is present, else cpu
    out_dir: str = "out"  # everything a run writes goes here
    stages: str = "sft,triplets,pref,eval"  # the stages to run, in this order
    seed: int = 1337
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # or cpu, mps (a Mac), cuda:1, ...
    dtype: str = ""  # float32 | bfloat16 (mixed precision: model.autocast); empty: bfloat16 on CUDA
    compile: bool = torch.cuda.is_available()  # torch.compile the SFT model (falls back to eager if it fails)
    # data
    data: str = ""  # a JSONL file of conversations (schema in the README); empty: the chitchat corpus
    max_conversations: int = 0  # use only this many conversations (0: all)
    toxic_threshold: float = 0.5  # a text is toxic when the judge's probability is at least this
    vocab_size: int = 4096  # byte-level BPE vocabulary, special tokens included
    context_turns: int = 2  # turns of context before a reply
    toxic_copies: int = 7  # times each toxic turn is shown behind [TOXIC] (after its context) in SFT
    # model
    init_from: str = ""  # a GPT-2 folder to start SFT from (empty: from scratch); sets model and vocabulary
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    block_size: int = 128  # tokens per SFT window; also the longest context + reply
    dropout: float = 0.0  # SFT only: the preference stage runs without dropout (pi = ref at step 0)
    bias: bool = True
    # sft
    sft_iters: int = 900  # optimizer steps
    batch_size: int = 32  # windows per step, over all processes under torchrun
    grad_accum: int = 1  # a step in this many forward/backward passes (less memory, same step)
    learning_rate: float = 2e-3  # peak, after warmup; cosine down to min_lr
    min_lr: float = 2e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the gradient norm at this (0: off)
    eval_interval: int = 500  # validation loss on the eval split every this many steps
    eval_iters: int = 20  # batches per validation loss
    log_interval: int = 10  # read the loss (a wait for the GPU) every this many steps, not every step
    # sampling (triplets and evaluation)
    temperature: float = 1.0
    top_k: Optional[int] = 50  # sample among the k likeliest tokens (none: all; kl_from_sft is then unbiased)
    max_new_tokens: int = 32  # longest reply
    sample_batch_size: int = 128  # rows per generate() call
    # triplets
    pref_contexts: int = 512  # contexts from the pref split
    num_candidates: int = 4  # K plain replies per context, ranked by the judge
    toxic_retries: int = 3  # R tries at a reply with [TOXIC] that the judge calls toxic
    min_judge_gap: float = 0.0  # train only on triplets with p(rejected) - p(chosen) at least this
    # preference optimization
    # trained beside the DPO baseline (names in adpo.LOSSES): the paper's ADPO, and ADPO-split, the form that
    # cut toxicity as much as DPO and kept perplexity within 15% of SFT's in the dev-split sweep (docs/)
    loss: str = "adpo,adpo_split"
    beta: float = 0.1  # weight of the chosen/rejected margin
    gamma: float = 0.03  # weight of the toxic term; the paper's 0.1 costs coherence here (docs/results.md)
    eps: float = 0.1  # label-flip rate (cDPO)
    pref_iters: int = 64  # optimizer steps per loss (about 2 epochs of the cpu preset's triplets)
    pref_batch_size: int = 16  # triplets per step, over all processes under torchrun
    pref_lr: float = 5e-5
    pref_warmup_iters: int = 10
    diag_interval: int = 4  # every this many steps, log each reply's share of the gradient
    checkpoint_interval: int = 50  # SFT and preference steps between resume states (NAME.resume.pt)
    seeds: int = 1  # the preference stage and evaluation again per seed: its own data order and sampling
    # evaluation
    eval_contexts: int = 128  # adversarial contexts, and as many normal ones (and the provoked turns)
    eval_samples: int = 4  # replies per context
    ppl_replies: int = 1000  # held-out non-toxic human replies for perplexity


PRESETS = {
    # every stage on 2 CPU cores in about a minute, ADPO only beside DPO: tests and CI
    "tiny": dict(loss="adpo", max_conversations=400, vocab_size=512, n_layer=2, n_head=2, n_embd=64,
                 block_size=64, sft_iters=60, batch_size=16, learning_rate=3e-3, min_lr=3e-4, warmup_iters=10,
                 eval_interval=30, eval_iters=2, max_new_tokens=12, pref_contexts=24, num_candidates=3,
                 toxic_retries=1, pref_iters=6, pref_batch_size=8, pref_warmup_iters=2, eval_contexts=8,
                 eval_samples=2, ppl_replies=32, toxic_copies=2),
    # 2 CPU cores, about 20 minutes in all (measured: 18.9)
    "cpu": dict(),
    # one GPU: the whole corpus, a larger model, three seeds
    "gpu": dict(vocab_size=8192, n_layer=8, n_head=8, n_embd=512, block_size=256, dropout=0.1,
                sft_iters=2500, batch_size=64, learning_rate=6e-4, min_lr=6e-5, warmup_iters=200,
                toxic_copies=5, max_new_tokens=48, sample_batch_size=512, pref_contexts=4096,
                num_candidates=8, toxic_retries=4, pref_iters=128, pref_batch_size=64, pref_warmup_iters=10,
                seeds=3, eval_contexts=256, eval_samples=8, ppl_replies=4000),
    # one 24 GB GPU, from a pretrained GPT-2 (--init_from): the gpu preset's data, gentler learning rates
    "gpt2": dict(block_size=256, dropout=0.1, sft_iters=800, batch_size=32, learning_rate=1e-4, min_lr=1e-5,
                 warmup_iters=100, toxic_copies=5, max_new_tokens=48, sample_batch_size=64,
                 pref_contexts=4096, num_candidates=8, toxic_retries=4, pref_iters=128, pref_batch_size=32,
                 pref_lr=1e-5, seeds=3, eval_contexts=256, eval_samples=8, ppl_replies=4000),
}


def make_tokenizer(s, conversations):
    """GPT-2's tokenizer with --init_from (its embedding needs it), else BPE on the sft split only."""
    if s.init_from:
        return data.gpt2_tokenizer(s.init_from)
    return data.train_tokenizer([t for c in conversations if c.split == "sft" for t in c.turns], s.vocab_size)


def get_lr(it, warmup_iters, max_iters, learning_rate, min_lr):
    """Linear warmup, then cosine decay to min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    progress = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (learning_rate - min_lr)


# ----------------------------------------------------------------------------------------------------------
# step 1: SFT, the dialogue model and, with [TOXIC] after a context, the inner toxic model


def train_sft(s, tok, conversations, hooks=None):
    """A GPT trained on the SFT stream (data.sft_stream); returns it in eval mode, and its loss curve.
    hooks: what the machinery adds to the loop (OneProcess when none: no resume states, one process)."""
    hooks = hooks or OneProcess()
    torch.manual_seed(s.seed)  # the same initial weights in every process
    train_stream = data.sft_stream(tok, conversations, "sft", s.toxic_copies, s.context_turns)
    val_stream = data.sft_stream(tok, conversations, "eval", 1, s.context_turns)
    config = GPTConfig(block_size=s.block_size, vocab_size=tok.get_vocab_size(), n_layer=s.n_layer,
                       n_head=s.n_head, n_embd=s.n_embd, dropout=s.dropout, bias=s.bias)
    if s.init_from:
        raw_model = GPT.from_gpt2(s.init_from, s.block_size, tok.get_vocab(), s.dropout)
    else:
        raw_model = GPT(config)
    raw_model = raw_model.to(s.device)
    optimizer = raw_model.configure_optimizers(s.weight_decay, s.learning_rate, (s.beta1, s.beta2), s.device)
    n_toxic = int((train_stream[0] == data.TOXIC_ID).sum())
    print(f"sft: {raw_model.get_num_params() / 1e6:.2f}M parameters, {len(train_stream[0]):,} training "
          f"tokens ({n_toxic:,} toxic turns behind [TOXIC], copies included), "
          f"{len(val_stream[0]):,} validation tokens")
    generator = torch.Generator().manual_seed(s.seed)  # the same global batches in every process
    rows = s.batch_size // hooks.world // s.grad_accum  # in one forward pass
    # machinery: the model compiled (--compile) and wrapped for torchrun; a killed run's state restored
    model, start, state = hooks.start_loop(raw_model, optimizer, generator, rows)

    @torch.no_grad()
    def val_loss():
        model.eval()
        val_gen = torch.Generator().manual_seed(0)  # the same windows every time
        losses = []
        for _ in range(s.eval_iters):
            x, y = data.get_sft_batch(val_stream, s.batch_size, s.block_size, val_gen)
            total = int((y != -1).sum())
            loss = 0.0
            for xs, ys in zip(x.split(rows), y.split(rows)):  # no more rows in a forward than in training
                n = int((ys != -1).sum())
                if n:
                    with autocast(s.device, s.dtype):
                        loss += raw_model(xs.to(s.device), ys.to(s.device))[1].item() * n
            losses.append(loss / max(total, 1))
        model.train()
        return float(np.mean(losses))

    curve = state.get("curve", [])
    loss_sum = 0.0
    t0 = time.time()
    bar = tqdm(range(start, s.sft_iters), desc="sft", unit="step", initial=start, total=s.sft_iters,
               disable=not hooks.is_main)
    for it in bar:
        lr = get_lr(it, s.warmup_iters, s.sft_iters, s.learning_rate, s.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = data.get_sft_batch(train_stream, s.batch_size, s.block_size, generator)  # the global batch
        for xs, ys, weight in hooks.micro_batches(model, x, y, s.grad_accum):  # this process's pieces
            with autocast(s.device, s.dtype):
                _, loss = model(data.to_device(xs, s.device), data.to_device(ys, s.device))
            (loss * weight).backward()  # a piece without targets: its loss is nan, its gradient 0
            if weight:
                loss_sum = loss_sum + loss.detach() * weight / hooks.world  # stays on the device
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # logging, every few steps: reading the loss waits for the GPU; a resume state every few more
        step = it + 1
        if step % s.log_interval == 0 or step % s.eval_interval == 0 or step % s.checkpoint_interval == 0 \
                or step == s.sft_iters:
            steps = step - (curve[-1]["step"] if curve else start)
            dt = time.time() - t0
            t0 = time.time()
            train_loss = hooks.sum_over_processes(float(loss_sum)) / steps
            loss_sum = 0.0
            tok_s = s.batch_size * s.block_size * steps / dt
            curve.append({"step": step, "loss": train_loss, "lr": lr, "tok_s": tok_s})
            mfu = None
            if s.device.startswith("cuda"):
                mfu = raw_model.estimate_mfu(tok_s * dt / hooks.world, dt)
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}",
                            **({"mfu": f"{100 * mfu:.1f}%"} if mfu else {}))
            if step % s.eval_interval == 0 or step == s.sft_iters:
                tqdm.write(f"sft step {step}: train loss {train_loss:.3f}, val loss {val_loss():.3f}")
            hooks.end_step(it, train_loss, raw_model, optimizer, generator, curve=curve)  # machinery: resume
    raw_model.eval()
    return raw_model, curve


# ----------------------------------------------------------------------------------------------------------
# step 2: self-generated triplets (x, y_w, y_l, y_t) on contexts SFT never trained on


def build_triplets(s, model, tok, conversations, sample_replies=sample.sample_replies):
    """For each pref-split context: K plain replies, the least toxic is chosen and the most toxic rejected;
    one reply with [TOXIC], resampled up to R times until the judge calls it toxic. Empty replies are not
    candidates (an empty chosen reply would teach the policy to say nothing). Each reply is kept as its text
    (for people) and its sampled ids and finished flag (for the code, which scores exactly those ids)."""
    rng = random.Random(s.seed)
    examples = data.contexts_and_replies(conversations, "pref", s.context_turns)
    contexts = [e.context for e in rng.sample(examples, min(s.pref_contexts, len(examples)))]
    kw = sample.sampling_settings(s)
    candidates = sample_replies(model, tok, contexts, num_samples=s.num_candidates, seed=s.seed,
                                progress="triplets: plain replies", **kw)
    probs = data.judge_probs([r.text for rs in candidates for r in rs])
    probs = probs.reshape(len(contexts), s.num_candidates)

    toxic = [None] * len(contexts)
    toxic_prob = [0.0] * len(contexts)
    todo = list(range(len(contexts)))
    for attempt in range(s.toxic_retries):
        retry = [contexts[i] for i in todo]
        replies = sample_replies(model, tok, retry, toxic=True, seed=s.seed + 1 + attempt,
                                 progress=f"triplets: toxic replies, try {attempt + 1}", **kw)
        p = data.judge_probs([r[0].text for r in replies])
        for i, reply, prob in zip(todo, replies, p):
            if reply[0].text and (toxic[i] is None or prob > toxic_prob[i]):  # the most toxic non-empty try
                toxic[i] = reply[0]
                toxic_prob[i] = float(prob)
        todo = [i for i in todo if toxic_prob[i] < s.toxic_threshold]
        if not todo:
            break

    triplets = []
    for i, ctx in enumerate(contexts):
        scored = [(float(p), r) for p, r in zip(probs[i], candidates[i]) if r.text]
        if len(scored) < 2 or toxic[i] is None:  # two non-empty candidates and a non-empty toxic reply
            continue
        p_w, chosen = min(scored, key=lambda x: x[0])
        p_l, rejected = max(scored, key=lambda x: x[0])
        if chosen.ids == rejected.ids:
            continue
        triplet = {"context": ctx}
        for key, reply in (("chosen", chosen), ("rejected", rejected), ("toxic", toxic[i])):
            triplet.update({key: reply.text, f"{key}_ids": reply.ids, f"{key}_finished": reply.finished})
        triplet.update({"p_chosen": p_w, "p_rejected": p_l, "p_toxic": toxic_prob[i],
                        "rejected_is_toxic": p_l >= s.toxic_threshold,
                        "toxic_is_toxic": toxic_prob[i] >= s.toxic_threshold})
        triplets.append(triplet)
    return triplets


# ----------------------------------------------------------------------------------------------------------
# step 3: preference optimization, DPO and ADPO from the same SFT model, same everything but the loss


@torch.no_grad()
def reference_logps(s, model, enc):
    """ref(y_w|x), ref(y_l|x) and tox(y_t|x) = ref(y_t | x, [TOXIC]) for every triplet, once, before training:
    the loop then keeps no reference network. Also ref(y_t|x), for the logs. Dropout off (eval mode)."""
    model.eval()
    names = {"chosen": "ref_chosen_logps", "rejected": "ref_rejected_logps",
             "toxic_under_tox": "toxic_model_toxic_logps", "toxic": "ref_toxic_logps"}
    out = {name: [] for name in names.values()}
    for i in range(0, len(enc), s.pref_batch_size):
        b = data.triplet_batches(enc, range(i, min(i + s.pref_batch_size, len(enc))))
        with autocast(s.device, s.dtype):
            logps = adpo.concatenated_logps(model, [tuple(t.to(s.device) for t in b[k]) for k in names])
        for name, lp in zip(names.values(), logps):
            out[name].append(lp.float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def policy_logps(s, policy, enc, idx):
    """log pi of the chosen, rejected and toxic replies of triplets idx, in one forward."""
    b = data.triplet_batches(enc, idx)
    chosen, rejected, toxic = adpo.concatenated_logps(
        policy, [tuple(t.to(s.device) for t in b[k]) for k in ("chosen", "rejected", "toxic")])
    return {"policy_chosen_logps": chosen, "policy_rejected_logps": rejected, "policy_toxic_logps": toxic}


def train_preference(s, loss_name, sft_model, enc, ref, seed, hooks=None):
    """The policy trained from the SFT model with loss `loss_name` on the encoded triplets (ref: their
    reference_logps), and its per-step metrics. hooks: as train_sft's."""
    hooks = hooks or OneProcess()
    # a copy without dropout, whatever SFT used: the policy's log-probs must equal the reference's at step 0
    policy = GPT(dataclasses.replace(sft_model.config, dropout=0.0)).to(s.device)
    policy.load_state_dict(sft_model.state_dict())
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=s.pref_lr, betas=(s.beta1, s.beta2),
                                  weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)  # the same data order for every loss
    hyper = {"beta": s.beta, "gamma": s.gamma, "eps": s.eps}
    _, start, state = hooks.start_loop(policy, optimizer, generator)  # machinery: a killed run goes on
    order = state.get("order", [])  # the data position
    metrics = state.get("metrics", [])
    bar = tqdm(range(start, s.pref_iters), desc=loss_name, unit="step", initial=start, total=s.pref_iters,
               disable=not hooks.is_main)
    for it in bar:
        if len(order) < s.pref_batch_size:
            order += torch.randperm(len(enc), generator=generator).tolist()
        idx = order[:s.pref_batch_size]
        order = order[s.pref_batch_size:]
        idx = hooks.process_part(idx)  # this process's part of the batch (all of it in one process)
        lr = get_lr(it, s.pref_warmup_iters, s.pref_iters, s.pref_lr, s.pref_lr)  # warmup, then constant
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(s.device, s.dtype):
            logps = policy_logps(s, policy, enc, idx)
        batch_ref = {k: v[idx].to(s.device) for k, v in ref.items()}
        loss_of = lambda lp: adpo.call_loss(loss_name, {**lp, **batch_ref, **hyper}).mean()  # noqa: E731
        loss = loss_of(logps)
        diagnose = it % s.diag_interval == 0  # every few steps, also: which reply the gradient comes from
        loss.backward(retain_graph=diagnose)  # the graph is kept for that measurement only
        diagnostics = evaluate.gradient_by_reply(loss_of, logps, policy, per_reply=diagnose)
        hooks.average_gradients(policy)  # over the processes: the gradient of the whole batch's mean
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), s.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        row = {"step": it + 1, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr, **diagnostics,
               **adpo.preference_metrics(**{k: v.detach() for k, v in logps.items()}, **batch_ref,
                                         beta=s.beta, gamma=s.gamma)}
        metrics.append(hooks.mean_over_processes(row))  # the whole batch's (grad/*: norms averaged)
        bar.set_postfix(loss=f"{metrics[-1]['loss']:.3f}", margin=f"{metrics[-1]['rewards/margins']:.3f}",
                        acc=f"{metrics[-1]['rewards/accuracies']:.2f}")
        hooks.end_step(it, loss, policy, optimizer, generator, order=order, metrics=metrics)  # machinery
    policy.eval()
    return policy, metrics


# ----------------------------------------------------------------------------------------------------------
# step 4: the evaluation, every model on the same held-out contexts (evaluate.py)


@torch.no_grad()
def final_pass(s, policy, enc, ref):
    """Over every triplet after training: the change of log pi(y_w|x) from the SFT model, and the accuracy."""
    chosen, rejected = [], []
    for i in range(0, len(enc), s.pref_batch_size):
        with autocast(s.device, s.dtype):
            lp = policy_logps(s, policy, enc, range(i, min(i + s.pref_batch_size, len(enc))))
        chosen.append(lp["policy_chosen_logps"].float().cpu())
        rejected.append(lp["policy_rejected_logps"].float().cpu())
    h_w = torch.cat(chosen) - ref["ref_chosen_logps"]
    h_l = torch.cat(rejected) - ref["ref_rejected_logps"]
    return {"chosen_logp_change": h_w.mean().item(), "final_accuracy": (h_w > h_l).float().mean().item()}


def evaluate_policy(s, name, policy, metrics, sft_model, tok, sets, seed, enc, ref,
                    sample_replies=sample.sample_replies):
    """A trained policy's evaluation (evaluate.evaluate), how its training went (its per-step metrics), and,
    with triplets, the final pass over them (ref: their reference_logps)."""
    r, replies, units = evaluate.evaluate(s, policy, sft_model, tok, sets, seed, name, enc, sample_replies)
    r.update(evaluate.stability(metrics))
    if enc is not None:
        r.update(final_pass(s, policy, enc, ref))
    return r, replies, units


# ----------------------------------------------------------------------------------------------------------
# what a loop asks of the machinery, in the simplest case: main() passes harness.loop.Hooks instead


class OneProcess:
    """The hooks of a training loop in one process that keeps nothing between runs (tests, a notebook)."""
    world, is_main = 1, True  # processes; this one prints

    def start_loop(self, model, optimizer, generator, rows=None):
        return model, 0, {}  # the model to run, the step to start from, the loop's saved state

    def end_step(self, step, loss, model, optimizer, generator, **state):
        pass  # harness.loop.Hooks: stop on a non-finite loss; a resume state every few steps

    def micro_batches(self, model, x, y, grad_accum):
        """grad_accum pieces of the batch, each weighted by its share of the batch's target tokens."""
        total, n = max(int((y != -1).sum()), 1), x.size(0)
        for piece in (slice(i * n // grad_accum, (i + 1) * n // grad_accum) for i in range(grad_accum)):
            yield x[piece], y[piece], int((y[piece] != -1).sum()) / total

    def process_part(self, items):
        return items  # this process's part of a batch

    def average_gradients(self, model):
        pass  # over the processes

    def sum_over_processes(self, value):
        return value  # over the processes

    def mean_over_processes(self, row):
        return row  # each value averaged over the processes


# the code that computes each artifact, from where the walk starts (harness/codedeps.py follows everything
# these reach, in any module: editing any of it makes the artifact stale; each loss adds its own function;
# the machinery adds the parts of its own that an artifact passes through: harness.artifacts.OWN_CODE)
CODE = {"tokenizer.json": (make_tokenizer,),
        "sft.pt": ("model", train_sft),
        "triplets.jsonl": (build_triplets,),
        "pref": (train_preference, reference_logps),
        "eval": ("provoked.txt", evaluate.eval_sets, evaluate.evaluate, evaluate.evaluate_sft_control,
                 evaluate_policy),
        "report.json": (evaluate.token_logratios,)}


# ----------------------------------------------------------------------------------------------------------


def main(argv):
    # the machinery (harness/): the settings checked, the corpus read, out_dir locked; and, before anything is
    # written, what the stages read is there and fresh (a stale file names the command that rebuilds it)
    s, conversations, run = harness.start(argv, Settings(), PRESETS, CODE)

    # 1. SFT: the dialogue model, and with [TOXIC] the inner toxic model (a fresh artifact is not made again)
    if run.todo("sft.pt"):
        tok = run.tokenizer(lambda: make_tokenizer(s, conversations))  # made once, kept in out_dir
        sft_model, curve = train_sft(s, tok, conversations, run.hooks("sft.pt"))
        run.save_sft(sft_model, tok, curve)
    sft_model, tok = run.load_sft()  # the later steps use its tokenizer

    # 2. self-generated triplets (x, y_w, y_l, y_t) on contexts SFT never trained on
    if run.todo("triplets.jsonl"):
        triplets = build_triplets(s, sft_model, tok, conversations, run.sampler("triplets.jsonl"))
        run.save_triplets(triplets)
    triplets, enc = run.triplets(tok, sft_model)  # read back and encoded, when a step to do reads them
    ref = reference_logps(s, sft_model, enc) if enc is not None else None  # once: no reference network kept

    # 3. DPO and ADPO from the same SFT model, on the same triplets: the loss is the only difference
    for loss, seed in run.to_train():
        policy, metrics = train_preference(s, loss, sft_model, enc, ref, seed, run.hooks(loss, seed))
        run.save_policy(loss, seed, policy, tok, metrics)

    # 4. evaluation: SFT, SFT with [TOXIC], DPO and ADPO on the same held-out contexts, with the same seeds
    if run.todo("report.json"):
        sets = evaluate.eval_sets(s, conversations, "eval")
        for seed in run.seeds:
            run.evaluation("sft", seed, lambda: evaluate.evaluate(
                s, sft_model, sft_model, tok, sets, seed, "sft", enc, run.sample))
            run.evaluation("sft_control", seed, lambda: evaluate.evaluate_sft_control(
                s, sft_model, tok, sets, seed, run.sample))
            for name in run.evaluated:
                run.evaluation(name, seed, lambda: evaluate_policy(
                    s, name, *run.load_policy(name, seed), sft_model, tok, sets, seed, enc, ref, run.sample))
        policies = {name: run.load_policy(name, s.seed)[0] for name in run.evaluated if enc is not None}
        logratios = evaluate.token_logratios(policies, sft_model, tok, enc, triplets, dtype=s.dtype)
        run.report(sets, triplets, logratios)  # report.json, report.md, samples.json; the table printed
    run.done()


# main() itself: which step runs and what it is given; an edit of it makes every artifact stale
CODE["glue"] = (main,)


if __name__ == "__main__":
    harness.run_main(main)
