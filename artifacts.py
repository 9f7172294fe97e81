"""
What each stage writes to out_dir, and why a rerun can trust it. A run can be killed, rerun with other settings
or data, or handed a file from someone else; none of these may give a wrong result.

- Fingerprints: out_dir/fingerprints.json records, for each finished artifact, a hash of the settings and inputs
  it depends on: the corpus' content for tokenizer.json, then each artifact the fingerprint of the one it is
  built from (tokenizer -> sft.pt -> triplets.jsonl -> dpo.pt, adpo.pt -> report.json). A file whose recorded
  fingerprint differs from the one this command would give is stale: its stage rebuilds it, or, when the stage
  is not in --stages, the run stops before writing anything, naming the file and the command that rebuilds it.
- Completion: every file is written to a temporary name and renamed (os.replace is atomic), and recorded in
  fingerprints.json only after that, so a file killed half-way is never taken for a finished one.
- Resume: SFT and each preference run save NAME.resume.pt every --checkpoint_interval steps (weights,
  optimizer, step, the RNG states and the data order); the same command, rerun, continues from there. The
  sampling stages keep each finished chunk in NAME.chunks.json until the stage is done.
- Safe loading: torch.load(weights_only=True) only rebuilds tensors and plain values. A full pickle can run any
  code while it loads, so a checkpoint that needs one is refused, never opened.
- Errors a user can cause end in one line `error: ...` and exit code 1 (run_main).
"""

import dataclasses
import hashlib
import json
import math
import os
import pickle
import random
import re
import sys

import numpy as np
import torch

import data
import distributed
from configurator import ConfigError
from data import DataError
from model import GPT, CheckpointError, GPTConfig


class RunError(ValueError):
    """A run that cannot go on: a stale, missing, corrupt or refused artifact, or a non-finite loss. The
    message is one line for the user."""


# ----------------------------------------------------------------------------------------------------------
# fingerprints: which settings each artifact depends on, besides the artifact it is built from

DEPENDS_ON = {
    "tokenizer.json": ("vocab_size", "init_from"),  # and the corpus (data, max_conversations, toxic_threshold)
    "sft.pt": ("seed", "context_turns", "toxic_copies", "n_layer", "n_head", "n_embd", "block_size", "dropout",
               "bias", "sft_iters", "batch_size", "learning_rate", "min_lr", "warmup_iters", "weight_decay",
               "beta1", "beta2", "grad_clip"),
    "triplets.jsonl": ("seed", "context_turns", "toxic_threshold", "temperature", "top_k", "max_new_tokens",
                       "sample_batch_size", "pref_contexts", "num_candidates", "toxic_retries"),
    "pref": ("min_judge_gap", "max_new_tokens", "beta", "gamma", "eps", "pref_iters", "pref_batch_size", "pref_lr",
             "pref_warmup_iters", "beta1", "beta2", "grad_clip", "diag_interval"),  # and the loss and seed
    "report.json": ("seed", "context_turns", "toxic_threshold", "temperature", "top_k", "max_new_tokens",
                    "sample_batch_size", "min_judge_gap", "eval_contexts", "eval_samples", "ppl_replies"),
}
# settings that change no artifact: where and how a run goes, not what it computes (the corpus settings and
# --loss/--seeds enter through the corpus' content and each checkpoint's own loss and seed)
CHANGE_NO_ARTIFACT = ("preset", "out_dir", "stages", "device", "data", "max_conversations", "loss", "seeds",
                      "eval_interval", "eval_iters", "checkpoint_interval", "compile", "grad_accum", "log_interval")
# the code that computes each artifact: a loss edited in adpo.py makes dpo.pt and adpo.pt stale (train.py, the
# order of the stages, is not tracked: after editing it, delete what the edit changes)
CODE = {"tokenizer.json": (), "sft.pt": ("model.py", "data.py"), "triplets.jsonl": ("sample.py",), "pref": ("adpo.py",),
        "report.json": ("evaluate.py",)}
HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("sft", "triplets", "pref", "eval")
STAGE_OF = {"tokenizer.json": "sft", "sft.pt": "sft", "triplets.jsonl": "triplets", "report.json": "eval"}


def digest(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def checkpoint_name(loss, seed, first_seed):
    return f"{loss}.pt" if seed == first_seed else f"{loss}_seed{seed}.pt"


def fingerprints(s, conversations, losses, seeds):
    """{file name: fingerprint} of every artifact this command would write, before any is written."""
    def pick(name):  # the settings and the source code the artifact depends on
        code = []
        for file_name in CODE[name]:
            with open(os.path.join(HERE, file_name), encoding="utf-8") as f:
                code.append(f.read())
        return {k: getattr(s, k) for k in DEPENDS_ON[name]}, code

    corpus = digest([(c.id, c.turns, c.toxic, c.split) for c in conversations])
    fp = {"tokenizer.json": digest(corpus, pick("tokenizer.json"))}
    fp["sft.pt"] = digest(fp["tokenizer.json"], pick("sft.pt"))
    fp["triplets.jsonl"] = digest(fp["sft.pt"], pick("triplets.jsonl"))
    for seed in seeds:
        for loss in losses:
            fp[checkpoint_name(loss, seed, s.seed)] = digest(fp["triplets.jsonl"], pick("pref"), loss, seed)
    fp["report.json"] = digest(fp, pick("report.json"))
    return fp


def recorded(out_dir):
    """{file name: fingerprint} of the finished artifacts in out_dir."""
    path = os.path.join(out_dir, "fingerprints.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return dict(json.load(f))
    except (ValueError, TypeError):
        raise RunError(f"{path} is not valid JSON; delete it to rebuild every stage") from None


def is_fresh(path, fingerprint):
    """The file is there, finished, and made from the same settings and inputs as this command's."""
    return os.path.isfile(path) and recorded(os.path.dirname(path)).get(os.path.basename(path)) == fingerprint


def record(path, fingerprint):
    """Mark path finished; called only once path is complete on disk."""
    fps = recorded(os.path.dirname(path))
    fps[os.path.basename(path)] = fingerprint
    atomic_write(os.path.join(os.path.dirname(path), "fingerprints.json"), json.dumps(fps, indent=1) + "\n")


def check_inputs(out_dir, fp, stages, argv):
    """Before anything is written: each artifact a requested stage reads and no requested stage rebuilds must be
    there and fresh. Required: sft.pt and the tokenizer (for any stage after sft), triplets.jsonl (for pref).
    Optional for eval: triplets.jsonl, used when present, so then it must be fresh; and a loss' checkpoints,
    evaluated when its first seed's is present, so then every seed's must be there and fresh. And out_dir must
    be writable."""
    check_out_dir(out_dir)
    reads = set()
    if any(x in stages for x in ("triplets", "pref", "eval")):
        reads |= {"sft.pt", "tokenizer.json"}
    if "pref" in stages:
        reads.add("triplets.jsonl")
    optional = set()
    if "eval" in stages:
        optional = {"triplets.jsonl"}
        for name in fp:  # the preference checkpoints: the names not in STAGE_OF
            first_seed = name.split("_seed")[0].removesuffix(".pt") + ".pt"  # dpo_seed1338.pt -> dpo.pt
            if name not in STAGE_OF and os.path.exists(os.path.join(out_dir, first_seed)):
                reads.add(name)
    names = ["sft.pt"] + [n for n in fp if n != "sft.pt"]  # the model first: it is what a stale tokenizer spoils
    for name in [n for n in names if n in reads | optional]:
        stage = STAGE_OF.get(name, "pref")
        path = os.path.join(out_dir, name)
        if stage in stages or (name not in reads and not os.path.exists(path)):
            continue
        last = max(STAGES.index(x) for x in stages)
        rebuild = STAGES[STAGES.index(stage):last + 1]  # its stage and every later one up to this command's last
        command = " ".join(["python train.py"] + [a for a in argv if not a.startswith("--stages=")]
                           + [f"--stages={','.join(rebuild)}"])
        if not os.path.exists(path):
            kind = "checkpoint" if name.endswith(".pt") else name.split(".")[0]
            raise RunError(f"no {kind} at {path}; build it with: {command}")
        if not is_fresh(path, fp[name]):
            raise RunError(f"{path} is stale (made with other settings or data, or not finished); "
                           f"rebuild it with: {command}")


def check_out_dir(out_dir):
    """An out_dir that cannot be created or written stops the run before any stage starts."""
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise RunError(f"cannot write to --out_dir={out_dir}: {parent} is not a writable folder")


# ----------------------------------------------------------------------------------------------------------
# writing: a temporary file, then an atomic rename


def write_text(path, text, fingerprint=None):
    """Under torchrun only rank 0 writes; the others wait until it has."""
    if distributed.is_main():
        atomic_write(path, text)
        if fingerprint is not None:
            record(path, fingerprint)
            if os.path.exists(chunks_path(path)):
                os.remove(chunks_path(path))  # the pieces of a finished stage
    distributed.barrier()


def atomic_write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def save(obj, path):
    if distributed.is_main():
        tmp = path + ".tmp"
        torch.save(obj, tmp)
        os.replace(tmp, path)
    distributed.barrier()


def get_tokenizer(out_dir, conversations, vocab_size, fingerprint, init_from=""):
    """tokenizer.json if it is fresh; else a new one (data.get_tokenizer; GPT-2's with init_from), recorded.
    Under torchrun rank 0 makes it first, the others then find it fresh."""
    path = os.path.join(out_dir, "tokenizer.json")
    if is_fresh(path, fingerprint):
        return data.load_tokenizer(path)
    if os.path.exists(path):
        os.remove(path)  # stale: data.get_tokenizer would reuse any tokenizer of the same size, whatever its corpus
    tok = data.get_tokenizer(conversations, vocab_size, path, init_from)
    record(path, fingerprint)
    return tok


def save_checkpoint(path, model, s, fingerprint=None, extra=None):
    """Weights, model config, settings, tokenizer path and fingerprint, written atomically; then recorded as
    finished, and the resume state of its training, now useless, removed."""
    ckpt = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
            "settings": dataclasses.asdict(s), "tokenizer": os.path.join(s.out_dir, "tokenizer.json"),
            "fingerprint": fingerprint, **(extra or {})}
    save(ckpt, path)
    if fingerprint is not None and distributed.is_main():
        record(path, fingerprint)
        if os.path.exists(resume_path(path)):
            os.remove(resume_path(path))
    distributed.barrier()


# ----------------------------------------------------------------------------------------------------------
# loading: tensors and plain values only


def read_checkpoint(path, device="cpu"):
    """The dict saved in path, never running code from it: weights_only=True refuses any pickled object other
    than tensors, numbers, strings, lists and dicts (a callable in a shared file would run on a full load)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; run `python train.py` first (or pass --checkpoint=...)")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))  # what a full load would call
        if refused:
            raise RunError(f"{path}: refused: loading it would call {refused.group(1)} (a checkpoint from "
                           f"train.py holds only tensors and plain values)") from None
        raise RunError(f"{path}: not a readable checkpoint (corrupt)") from None
    except Exception:  # noqa: BLE001 (a truncated zip, random bytes, an empty file: torch raises many kinds)
        raise RunError(f"{path}: not a readable checkpoint (truncated or corrupt)") from None


def load_checkpoint(path, device="cpu", dropout=None):
    """(model in eval mode, tokenizer, checkpoint dict) from a file written by train.py. dropout, when given,
    replaces the checkpoint's (the preference stage needs 0: with dropout the policy's log-probs are noisy,
    and pi = ref would not hold at step 0)."""
    ckpt = read_checkpoint(path, device)
    missing = [k for k in ("model", "model_config", "tokenizer") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise RunError(f"{path}: not a checkpoint written by train.py (no {missing[0]!r})")
    try:
        config = GPTConfig(**dict(ckpt["model_config"], **({} if dropout is None else {"dropout": dropout})))
        model = GPT(config)
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError, ValueError):
        raise RunError(f"{path}: its weights do not fit its model config (written by another version?)") from None
    model.to(device).eval()
    tok_path = ckpt["tokenizer"]
    if not os.path.isfile(tok_path):  # the checkpoint's folder moved: look beside it
        tok_path = os.path.join(os.path.dirname(path), "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise RunError(f"{path}: no tokenizer.json beside it (nor at {ckpt['tokenizer']})")
    try:
        tok = data.load_tokenizer(tok_path)
    except Exception:  # noqa: BLE001 (tokenizers raises its own Exception on a broken file)
        raise RunError(f"{tok_path}: not a readable tokenizer (truncated or corrupt)") from None
    if tok.get_vocab_size() > config.vocab_size:
        raise RunError(f"{tok_path} has {tok.get_vocab_size()} tokens, more than {path}'s model "
                       f"({config.vocab_size}): not the tokenizer it was trained with")
    return model, tok, ckpt


# ----------------------------------------------------------------------------------------------------------
# resume: the whole training state every --checkpoint_interval steps


def resume_path(path):
    return os.path.splitext(path)[0] + ".resume.pt"


def rng_states(generator):
    """Every random state a training step reads: torch's (CUDA's too), numpy's, Python's and the batches'."""
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # as tensors and lists: weights_only loading takes no numpy array and no tuple of them
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_states(states, generator):
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def save_training(resume, step, model, optimizer, generator, **extra):
    """resume = (path of NAME.resume.pt, fingerprint of NAME.pt), or None for no resume state."""
    if resume is not None:
        path, fingerprint = resume
        save({"fingerprint": fingerprint, "step": step, "model": model.state_dict(),
              "optimizer": optimizer.state_dict(), "rng": rng_states(generator), **extra}, path)


def resume_training(resume, model, optimizer, generator):
    """The step to start from (0, or that of a resume state of the same fingerprint, restored into model,
    optimizer and RNGs), and the extra state saved with it. A resume state of other settings is ignored."""
    if resume is None or not os.path.isfile(resume[0]):
        return 0, {}
    state = read_checkpoint(resume[0])
    if state.get("fingerprint") != resume[1]:
        return 0, {}
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_states(state["rng"], generator)
    print(f"{os.path.basename(resume[0])}: resumed at step {state['step']}")
    return state["step"], state


def chunks_path(path):
    return os.path.splitext(path)[0] + ".chunks.json"


def chunks(path, fingerprint):
    """The sampling stages resume by chunk (one sample_replies call, one model's evaluation): returns
    chunk(key, compute, decode) -> decode(compute()), where compute runs only if no earlier run of the same
    fingerprint saved its result under key in path (JSON: never code). Both paths return the result as read
    back from JSON, so a resumed stage and an uninterrupted one compute with the very same numbers."""
    saved = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        saved = stored["chunks"] if stored.get("fingerprint") == fingerprint else {}
        print(f"{os.path.basename(path)}: resumed after {len(saved)} finished chunk(s)")

    def chunk(key, compute, decode=lambda value: value):
        if key not in saved:
            saved[key] = json.loads(json.dumps(compute(), default=lambda x: x.tolist()))  # numpy, torch -> lists
            write_text(path, json.dumps({"fingerprint": fingerprint, "chunks": saved}))
        return decode(saved[key])
    return chunk


def stop_if_not_finite(loss, stage, step):
    """A nan or inf loss ruins every later step: stop, keeping the last good checkpoint (NAME.resume.pt) in
    out_dir. The preference stage checks every step, before the update; SFT reads its loss every few steps
    (no wait for the GPU each step) and saves a resume state only after checking the steps it holds."""
    value = float(loss.detach() if torch.is_tensor(loss) else loss)  # a tensor (a wait for the GPU) or a number
    if not math.isfinite(value):
        raise RunError(f"{stage} step {step}: the loss is {value}; stopped, out_dir keeps the last good "
                       f"checkpoint (try a lower learning rate)")


# ----------------------------------------------------------------------------------------------------------


def run_main(main):
    """Run main(argv); an error the user caused (settings, data, artifacts, files) ends in one line."""
    try:
        main(sys.argv[1:])
    except (ConfigError, DataError, CheckpointError, RunError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # an unwritable or full out_dir
        sys.exit(f"error: {e.filename or ''}: {e.strerror or e}")
    finally:
        distributed.teardown()
