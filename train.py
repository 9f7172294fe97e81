"""
The whole ADPO pipeline, stage by stage, as in the paper's method section:

  sft       fine-tune a small GPT on human chit-chat where every toxic reply follows [TOXIC]  -> sft.pt
  triplets  on contexts SFT never saw: K plain replies, ranked by the judge into chosen y_w and
            rejected y_l, and one reply y_t sampled with [TOXIC] (the inner toxic model)      -> triplets.jsonl
  pref      from sft.pt, train DPO and ADPO (or --loss=NAME) on the same triplets, data order,
            seed and steps, so the loss is the only difference                               -> dpo.pt, adpo.pt
  eval      toxicity, coherence, evasiveness and stability, side by side                     -> report.json/.md

    python train.py                       # the default preset: gpu with CUDA, else cpu
    python train.py --preset=tiny         # every stage in seconds to a minute (tests and CI)
    python train.py --loss=ipo --beta=0.5 # any --key=value below
    torchrun --standalone --nproc_per_node=2 train.py   # 2 processes (GPUs; gloo on CPU), see distributed.py
"""

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

import adpo
import artifacts
import data
import distributed
import evaluate
import sample
from artifacts import STAGES, load_checkpoint, save_checkpoint, write_text
from configurator import ConfigError, apply_overrides, check_rules, parse_overrides
from model import GPT, GPTConfig, autocast, compile_model, gpt2_config


@dataclass
class Settings:
    # run
    preset: str = ""  # tiny | cpu | gpu | gpt2; empty: gpu when CUDA is present, else cpu
    out_dir: str = "out"  # everything a run writes goes here
    stages: str = "sft,triplets,pref,eval"  # the stages to run, in this order
    seed: int = 1337
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    compile: bool = torch.cuda.is_available()  # torch.compile the SFT model (falls back to eager if it fails)
    # data
    data: str = ""  # a JSONL file of conversations (schema in the README); empty: the chitchat corpus
    max_conversations: int = 0  # use only this many conversations (0: all)
    toxic_threshold: float = 0.5  # a text is toxic when the judge's probability is at least this
    vocab_size: int = 4096  # byte-level BPE vocabulary, special tokens included
    context_turns: int = 2  # turns of context before a reply
    toxic_copies: int = 7  # times each toxic turn is shown behind [TOXIC] (after its context) in SFT
    # model
    init_from: str = ""  # a GPT-2 folder to start SFT from (empty: from scratch); sets the model and vocabulary
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    block_size: int = 128  # tokens per SFT window; also the longest context + reply
    dropout: float = 0.0  # SFT only: the preference stage runs every network without dropout (pi = ref at step 0)
    bias: bool = True
    # sft
    sft_iters: int = 900  # optimizer steps
    batch_size: int = 32  # windows per step, over all processes under torchrun
    grad_accum: int = 1  # each process's windows in this many forward/backward passes (less memory, same step)
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
    top_k: Optional[int] = 50  # sample among the 50 likeliest tokens (none: all; then kl_from_sft is unbiased)
    max_new_tokens: int = 32  # longest reply
    sample_batch_size: int = 128  # rows per generate() call
    # triplets
    pref_contexts: int = 512  # contexts from the pref split
    num_candidates: int = 4  # K plain replies per context, ranked by the judge
    toxic_retries: int = 3  # R tries at a reply with [TOXIC] that the judge calls toxic
    min_judge_gap: float = 0.0  # train only on triplets with p(rejected) - p(chosen) at least this
    # preference optimization
    # trained beside the DPO baseline (names in adpo.LOSSES): the paper's ADPO, and ADPO-split, the form and gamma
    # that cut toxicity as much as DPO and kept perplexity within 15% of SFT's in the sweep on the dev split (README)
    loss: str = "adpo,adpo_split"
    beta: float = 0.1  # weight of the chosen/rejected margin
    gamma: float = 0.03  # weight of the toxic term (ADPO); the paper's setting 0.1 costs coherence here (README)
    eps: float = 0.1  # label-flip rate (cDPO)
    pref_iters: int = 64  # optimizer steps per loss (about 2 epochs of the cpu preset's triplets)
    pref_batch_size: int = 16  # triplets per step, over all processes under torchrun
    pref_lr: float = 5e-5
    pref_warmup_iters: int = 10
    diag_interval: int = 4  # every this many steps, log each reply's share of the gradient (one backward each)
    checkpoint_interval: int = 50  # SFT and preference steps between resume states (NAME.resume.pt)
    seeds: int = 1  # repeat the preference stages and their evaluation with this many seeds
    # evaluation
    eval_contexts: int = 128  # adversarial contexts, and as many normal ones (and the provoked turns)
    eval_samples: int = 4  # replies per context
    ppl_replies: int = 1000  # held-out non-toxic human replies for perplexity


PRESETS = {
    # every stage on 2 CPU cores in about a minute, ADPO only beside DPO: tests and CI
    "tiny": dict(loss="adpo", max_conversations=400, vocab_size=512, n_layer=2, n_head=2, n_embd=64, block_size=64,
                 sft_iters=60, batch_size=16, learning_rate=3e-3, min_lr=3e-4, warmup_iters=10,
                 eval_interval=30, eval_iters=2, max_new_tokens=12, pref_contexts=24, num_candidates=3,
                 toxic_retries=1, pref_iters=6, pref_batch_size=8, pref_warmup_iters=2, eval_contexts=8,
                 eval_samples=2, ppl_replies=32, toxic_copies=2),
    # 2 CPU cores, about 20 minutes in all (measured: 18.9)
    "cpu": dict(),
    # one GPU: the whole corpus, a larger model, three seeds
    "gpu": dict(vocab_size=8192, n_layer=8, n_head=8, n_embd=512, block_size=256, dropout=0.1,
                sft_iters=2500, batch_size=64, learning_rate=6e-4, min_lr=6e-5, warmup_iters=200, toxic_copies=5,
                max_new_tokens=48, sample_batch_size=512, pref_contexts=4096, num_candidates=8, toxic_retries=4,
                pref_iters=128, pref_batch_size=64, pref_warmup_iters=10, seeds=3,
                eval_contexts=256, eval_samples=8, ppl_replies=4000),
    # one 24 GB GPU, from a pretrained GPT-2 (--init_from, README): the gpu preset's data, gentler learning rates
    "gpt2": dict(block_size=256, dropout=0.1, sft_iters=800, batch_size=32, learning_rate=1e-4, min_lr=1e-5,
                 warmup_iters=100, toxic_copies=5, max_new_tokens=48, sample_batch_size=64, pref_contexts=4096,
                 num_candidates=8, toxic_retries=4, pref_iters=128, pref_batch_size=32, pref_lr=1e-5, seeds=3,
                 eval_contexts=256, eval_samples=8, ppl_replies=4000),
}

def get_settings(argv):
    """Defaults, then the preset's, then the command line's --key=value."""
    overrides = parse_overrides(argv)
    preset = overrides.get("preset") or ("gpu" if torch.cuda.is_available() else "cpu")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    s = apply_overrides(Settings(), {k: str(v) for k, v in PRESETS[preset].items()})
    s = apply_overrides(s, overrides)
    s = dataclasses.replace(s, preset=preset)
    check_settings(s)
    return s


RULES = [  # (settings, rule, what the rule asks): all checked before anything is written
    ("sft_iters batch_size num_candidates pref_iters pref_batch_size seeds eval_contexts eval_samples pref_contexts "
     "toxic_retries toxic_copies diag_interval eval_interval eval_iters sample_batch_size ppl_replies context_turns "
     "n_layer n_head n_embd max_new_tokens checkpoint_interval", lambda v: v >= 1, "at least 1"),
    ("beta gamma learning_rate min_lr pref_lr temperature", lambda v: v > 0, "positive"),  # greedy: K equal replies
    ("max_conversations warmup_iters pref_warmup_iters weight_decay grad_clip min_judge_gap", lambda v: v >= 0,
     "at least 0"),
    ("toxic_threshold", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("dropout beta1 beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("eps", lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    ("top_k", lambda v: v is None or v >= 1, "at least 1 (or none: all tokens)"),
    ("vocab_size", lambda v: v >= 260, "at least 260 (the 256 bytes and 4 special tokens)"),
    ("stages", lambda v: v.strip(" ,"), "a list of stages"),
]


def check_settings(s):
    check_rules(s, RULES)
    if s.preset == "gpt2" and not s.init_from and "sft" in stage_list(s):
        raise ConfigError("--preset=gpt2 needs --init_from=DIR, a GPT-2 folder (README: Starting from GPT-2)")
    bad_stages = [x for x in stage_list(s) if x not in STAGES]
    if bad_stages:
        raise ConfigError(f"unknown stage {bad_stages[0]!r}; valid stages: {', '.join(STAGES)}")
    for name in loss_list(s):
        if name not in adpo.LOSSES:
            raise ConfigError(f"unknown loss {name!r}; valid losses: {', '.join(adpo.LOSSES)}")
    if s.n_embd % s.n_head:
        raise ConfigError(f"--n_embd={s.n_embd} must be a multiple of --n_head={s.n_head}")
    if s.max_new_tokens >= s.block_size:
        raise ConfigError(f"--max_new_tokens={s.max_new_tokens} must be below --block_size={s.block_size}")
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but CUDA is not available")
    distributed.check_batches(s.batch_size, s.grad_accum, s.pref_batch_size)  # under torchrun


def stage_list(s):
    return [x.strip() for x in s.stages.split(",") if x.strip()]


def loss_list(s):
    """The DPO baseline, then the losses of --loss."""
    return list(dict.fromkeys(["dpo"] + [x.strip() for x in s.loss.split(",") if x.strip()]))


def get_lr(it, warmup_iters, max_iters, learning_rate, min_lr):
    """Linear warmup, then cosine decay to min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    progress = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (learning_rate - min_lr)


# ----------------------------------------------------------------------------------------------------------
# stage 1: SFT


def train_sft(s, tok, conversations, resume=None):
    """resume: (path, fingerprint) of a resume state to continue from and save to (see artifacts.py), or None."""
    torch.manual_seed(s.seed)  # the same initial weights in every process
    train_stream = data.sft_stream(tok, conversations, "sft", s.toxic_copies, s.context_turns)
    val_stream = data.sft_stream(tok, conversations, "eval", 1, s.context_turns)
    config = GPTConfig(block_size=s.block_size, vocab_size=tok.get_vocab_size(), n_layer=s.n_layer,
                       n_head=s.n_head, n_embd=s.n_embd, dropout=s.dropout, bias=s.bias)
    raw_model = GPT.from_gpt2(s.init_from, s.block_size, tok.get_vocab(), s.dropout) if s.init_from else GPT(config)
    raw_model = raw_model.to(s.device)
    optimizer = raw_model.configure_optimizers(s.weight_decay, s.learning_rate, (s.beta1, s.beta2), s.device)
    print(f"sft: {raw_model.get_num_params() / 1e6:.2f}M parameters, {len(train_stream[0]):,} training tokens "
          f"({int((train_stream[0] == data.TOXIC_ID).sum()):,} toxic turns behind [TOXIC], copies included), "
          f"{len(val_stream[0]):,} validation tokens")
    rows = s.batch_size // distributed.world_size() // s.grad_accum  # per forward pass
    model = distributed.wrap(compile_model(raw_model, (rows, s.block_size), s.device) if s.compile else raw_model,
                             s.device)  # DistributedDataParallel under torchrun
    generator = torch.Generator().manual_seed(s.seed)  # the same global batches in every process

    @torch.no_grad()
    def val_loss():
        model.eval()
        val_gen = torch.Generator().manual_seed(0)  # the same windows every time
        losses = []
        for _ in range(s.eval_iters):
            x, y = data.get_sft_batch(val_stream, s.batch_size, s.block_size, val_gen)
            with autocast(s.device):
                losses.append(raw_model(x.to(s.device), y.to(s.device))[1].item())
        model.train()
        return float(np.mean(losses))

    start, state = artifacts.resume_training(resume, raw_model, optimizer, generator)
    bar = tqdm(range(start, s.sft_iters), desc="sft", unit="step", initial=start, total=s.sft_iters,
               disable=not distributed.is_main())
    t0, tokens_per_iter, loss_sum, curve = time.time(), s.batch_size * s.block_size, 0.0, state.get("curve", [])
    for it in bar:
        lr = get_lr(it, s.warmup_iters, s.sft_iters, s.learning_rate, s.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = data.get_sft_batch(train_stream, s.batch_size, s.block_size, generator)  # the global batch
        for xs, ys, weight, sync in distributed.micro_batches(model, x, y, s.grad_accum):  # this process's rows
            with sync:  # under DDP, the gradients are averaged over the processes after the last piece only
                with autocast(s.device):
                    _, loss = model(data.to_device(xs, s.device), data.to_device(ys, s.device))
                (loss * weight).backward()
            loss_sum = loss_sum + loss.detach() * weight / distributed.world_size()  # stays on the device
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (it + 1) % s.log_interval == 0 or (it + 1) % s.eval_interval == 0 or (it + 1) % s.checkpoint_interval == 0 \
                or it + 1 == s.sft_iters:  # the loss is read (a wait for the GPU) only here
            steps, dt, t0 = it + 1 - (curve[-1]["step"] if curve else start), time.time() - t0, time.time()
            train_loss, loss_sum = distributed.sum_over_processes(float(loss_sum)) / steps, 0.0
            artifacts.stop_if_not_finite(train_loss, "sft", it)  # before a resume state could keep a bad step
            curve.append({"step": it + 1, "loss": train_loss, "lr": lr, "tok_s": tokens_per_iter * steps / dt})
            mfu = raw_model.estimate_mfu(tokens_per_iter * steps / distributed.world_size(), dt) \
                if s.device.startswith("cuda") else None
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{curve[-1]['tok_s']:,.0f}",
                            **({"mfu": f"{100 * mfu:.1f}%"} if mfu else {}))
        if (it + 1) % s.eval_interval == 0 or it + 1 == s.sft_iters:
            tqdm.write(f"sft step {it + 1}: train loss {curve[-1]['loss']:.3f}, val loss {val_loss():.3f}")
        if (it + 1) % s.checkpoint_interval == 0:
            artifacts.save_training(resume, it + 1, raw_model, optimizer, generator, curve=curve)
    write_text(os.path.join(s.out_dir, "metrics_sft.jsonl"), "".join(json.dumps(r) + "\n" for r in curve))
    raw_model.eval()
    return raw_model


@torch.no_grad()
def reference_logps(s, model, enc):
    """ref(y_w|x), ref(y_l|x) and tox(y_t|x) = ref(y_t | x, [TOXIC]) for every triplet, once, before
    training: the training loop then keeps no reference network. Also ref(y_t|x), without the token, which no
    default loss uses but the logs do (how far the policy moved the toxic reply from the SFT model).
    The model is in eval mode (dropout off)."""
    model.eval()
    names = {"chosen": "ref_chosen_logps", "rejected": "ref_rejected_logps",
             "toxic_under_tox": "toxic_model_toxic_logps", "toxic": "ref_toxic_logps"}
    out = {name: [] for name in names.values()}
    for i in range(0, len(enc), s.pref_batch_size):
        b = data.triplet_batches(enc, range(i, min(i + s.pref_batch_size, len(enc))))
        with autocast(s.device):
            logps = adpo.concatenated_logps(model, [tuple(t.to(s.device) for t in b[k]) for k in names])
        for name, lp in zip(names.values(), logps):
            out[name].append(lp.float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------
# stage 3: preference optimization (DPO and ADPO, same everything but the loss)


def policy_logps(s, policy, enc, idx):
    b = data.triplet_batches(enc, idx)
    chosen, rejected, toxic = adpo.concatenated_logps(  # one forward for all three
        policy, [tuple(t.to(s.device) for t in b[k]) for k in ("chosen", "rejected", "toxic")])
    return {"policy_chosen_logps": chosen, "policy_rejected_logps": rejected, "policy_toxic_logps": toxic}


def train_preference(s, loss_name, sft_path, enc, ref, seed, metrics_path, resume=None):
    # without dropout, whatever the SFT used: the policy's log-probs must equal the reference's at step 0
    policy, _, _ = load_checkpoint(sft_path, s.device, dropout=0.0)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=s.pref_lr, betas=(s.beta1, s.beta2), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)  # the same data order for every loss
    start, state = artifacts.resume_training(resume, policy, optimizer, generator)
    order, metrics = state.get("order", []), state.get("metrics", [])  # the data position, the steps so far
    hyper = {"beta": s.beta, "gamma": s.gamma, "eps": s.eps}
    bar = tqdm(range(start, s.pref_iters), desc=loss_name, unit="step", initial=start, total=s.pref_iters,
               disable=not distributed.is_main())
    for it in bar:
        if len(order) < s.pref_batch_size:
            order += torch.randperm(len(enc), generator=generator).tolist()
        idx, order = order[:s.pref_batch_size], order[s.pref_batch_size:]
        idx = distributed.split(idx)  # this process's share of the global batch (all of it in one process)
        lr = get_lr(it, s.pref_warmup_iters, s.pref_iters, s.pref_lr, s.pref_lr)  # warmup, then constant
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(s.device):
            logps = policy_logps(s, policy, enc, idx)
        batch_ref = {k: v[idx].to(s.device) for k, v in ref.items()}
        losses = adpo.call_loss(loss_name, {**logps, **batch_ref, **hyper})
        loss = losses.mean()
        artifacts.stop_if_not_finite(loss, loss_name, it)
        diagnostics = adpo.backward_by_reply(loss, logps, policy, split=it % s.diag_interval == 0)
        distributed.average_gradients(policy)  # over the processes: the gradient of the global batch's mean
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), s.grad_clip if s.grad_clip > 0 else 1e9)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": it, **distributed.mean_over_processes({  # the global batch's (grad/*: norms averaged)
            "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr, **diagnostics,
            **adpo.preference_metrics(**{k: v.detach() for k, v in logps.items()}, **batch_ref, beta=s.beta,
                                      gamma=s.gamma)})}
        metrics.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", margin=f"{row['rewards/margins']:.3f}",
                        acc=f"{row['rewards/accuracies']:.2f}")
        if (it + 1) % s.checkpoint_interval == 0:
            artifacts.save_training(resume, it + 1, policy, optimizer, generator, order=order, metrics=metrics)
    write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in metrics))
    policy.eval()
    return policy, metrics


@torch.no_grad()
def final_pass(s, policy, enc, ref):
    """Over every triplet after training: the change of log pi(y_w|x) from the SFT model, and the accuracy."""
    chosen, rejected = [], []
    for i in range(0, len(enc), s.pref_batch_size):
        with autocast(s.device):
            lp = policy_logps(s, policy, enc, range(i, min(i + s.pref_batch_size, len(enc))))
        chosen.append(lp["policy_chosen_logps"].float().cpu())
        rejected.append(lp["policy_rejected_logps"].float().cpu())
    h_w = torch.cat(chosen) - ref["ref_chosen_logps"]
    h_l = torch.cat(rejected) - ref["ref_rejected_logps"]
    return {"chosen_logp_change": h_w.mean().item(), "final_accuracy": (h_w > h_l).float().mean().item()}


# ----------------------------------------------------------------------------------------------------------


def main(argv):
    t_start = time.time()
    s = get_settings(argv)
    s = dataclasses.replace(s, device=distributed.setup(s.device))  # under torchrun: join the processes
    stages = stage_list(s)
    losses = loss_list(s)  # the DPO baseline and the method(s)
    seeds = [s.seed + i for i in range(s.seeds)]
    out = lambda name: os.path.join(s.out_dir, name)  # noqa: E731

    # everything that can fail on bad input is checked before the first file is written
    if s.init_from and "sft" in stages:
        gpt2_config(s.init_from, s.block_size)
    conversations = data.load_corpus(s.data or None, s.toxic_threshold, s.max_conversations)
    fp = artifacts.fingerprints(s, conversations, losses, seeds)  # file name -> what it must be made from
    artifacts.check_inputs(s.out_dir, fp, stages, argv)  # out_dir writable, what this run reads there and fresh
    data.require_splits(conversations, [sp for st, sp in (("triplets", "pref"), ("eval", "eval")) if st in stages],
                        s.context_turns)
    if "pref" in stages and "triplets" not in stages:
        data.select_triplets(data.read_triplets(out("triplets.jsonl")), s.min_judge_gap)
    counts = {sp: sum(c.split == sp for c in conversations) for sp in data.SPLITS}
    n_toxic = sum(sum(c.toxic) for c in conversations)
    n_turns = sum(len(c.turns) for c in conversations)
    print(f"corpus: {len(conversations):,} conversations ("
          + ", ".join(f"{counts[sp]:,} {sp}" for sp in data.SPLITS)
          + f"), {n_turns:,} turns, {n_toxic:,} toxic ({100 * n_toxic / n_turns:.1f}%)")
    os.makedirs(s.out_dir, exist_ok=True)
    stage_seconds = {"data": time.time() - t_start}

    # 1. SFT: the dialogue model, and with [TOXIC] the inner toxic model
    # (a stage in --stages skips what is already made from the same settings and inputs: see artifacts.py)
    if "sft" in stages and not artifacts.is_fresh(out("sft.pt"), fp["sft.pt"]):
        t0 = time.time()  # the later stages take the tokenizer sft.pt names, never a new one
        tok = distributed.main_first(lambda: artifacts.get_tokenizer(s.out_dir, conversations, s.vocab_size,
                                                                     fp["tokenizer.json"], s.init_from))
        sft_model = train_sft(s, tok, conversations, (artifacts.resume_path(out("sft.pt")), fp["sft.pt"]))
        save_checkpoint(out("sft.pt"), sft_model, s, fp["sft.pt"])
        stage_seconds["sft"] = time.time() - t0
    sft_model, tok, _ = load_checkpoint(out("sft.pt"), s.device)

    # 2. self-generated triplets (x, y_w, y_l, y_t) on contexts SFT never trained on
    if "triplets" in stages and not artifacts.is_fresh(out("triplets.jsonl"), fp["triplets.jsonl"]):
        t0 = time.time()
        chunk = artifacts.chunks(artifacts.chunks_path(out("triplets.jsonl")), fp["triplets.jsonl"])
        triplets = sample.build_triplets(s, sft_model, tok, conversations, chunk)
        write_text(out("triplets.jsonl"), "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in triplets),
                   fp["triplets.jsonl"])
        stats = data.triplet_stats(triplets, s.toxic_threshold)
        print(f"triplets: {len(triplets)} written to {out('triplets.jsonl')}; the judge calls "
              f"{stats['rejected_toxic_share']:.0%} of the rejected and {stats['toxic_toxic_share']:.0%} of the "
              f"toxic replies toxic")
        stage_seconds["triplets"] = time.time() - t0

    # 3. DPO and ADPO from the same SFT model, on the same triplets, reference log-probs computed once
    curves = {}  # loss -> per-step metrics of the first seed, for curves.png
    if "pref" in stages:
        t0 = time.time()
        _, enc = data.preference_data(tok, out("triplets.jsonl"), s.min_judge_gap, sft_model.config.block_size,
                                      s.max_new_tokens)
        ref = reference_logps(s, sft_model, enc)
        for seed in seeds:
            for name in losses:
                ckpt = artifacts.checkpoint_name(name, seed, s.seed)  # dpo.pt, dpo_seed1338.pt, ...
                metrics_path = out(f"metrics_{ckpt[:-len('.pt')]}.jsonl")
                if not artifacts.is_fresh(out(ckpt), fp[ckpt]):
                    policy, metrics = train_preference(s, name, out("sft.pt"), enc, ref, seed, metrics_path,
                                                       (artifacts.resume_path(out(ckpt)), fp[ckpt]))
                    stats = {**final_pass(s, policy, enc, ref), **evaluate.stability(metrics)}
                    save_checkpoint(out(ckpt), policy, s, fp[ckpt], {"loss": name, "pref_seed": seed,
                                                                     "stability": stats})
                if seed == s.seed:
                    curves[name] = [row for _, row in data.json_lines(metrics_path)]
        if distributed.is_main():
            evaluate.plot_curves(out("curves.png"), curves)
        stage_seconds["pref"] = time.time() - t0

    # 4. evaluation: SFT, DPO and ADPO on the same held-out contexts, sampled with the same seed
    if "eval" in stages:
        evaluate.run_eval(s, sft_model, tok, conversations, losses, seeds, fp["report.json"], t_start, stage_seconds)
    print(f"done in {(time.time() - t_start) / 60:.1f} min; outputs in {s.out_dir}/")


if __name__ == "__main__":
    artifacts.run_main(main)
