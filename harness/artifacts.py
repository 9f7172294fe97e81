"""
The machinery behind train.py: one Run object, built by main(), owns out_dir and everything a rerun relies on,
so that the method's functions take plain arguments. A run can be killed, rerun with other settings or data,
or handed a file from someone else; none of these may give a wrong result.

- Fingerprints: out_dir/fingerprints.json records, for each finished artifact, a hash of the settings, the
  inputs and the code it is computed from (all the project code its stage reaches: codedeps.py): the
  corpus' content for tokenizer.json, then each artifact the fingerprint of the one it is built from
  (tokenizer -> sft.pt -> triplets.jsonl -> dpo.pt, adpo.pt -> report.json). A file whose recorded
  fingerprint differs from this command's is stale: its stage rebuilds it, or, when the stage is not in
  --stages, the run stops before writing anything, naming the file and the command that rebuilds it.
- Completion: every file is written to a temporary name and renamed (os.replace is atomic), and recorded in
  fingerprints.json only after that, so a file killed half-way is never taken for a finished one.
- Resume: SFT and each preference run save NAME.resume.pt every --checkpoint_interval steps (weights,
  optimizer, step, the RNG states and the data order); the same command, rerun, continues from there. The
  sampling stages keep each finished piece (a sampling call, a model's evaluation) in NAME.chunks.json.
- torchrun: only rank 0 writes; sampling splits the rows over the processes and gathers the replies.
"""

import fcntl
import hashlib
import json
import os
import random
import time
from contextlib import contextmanager

import numpy as np
import torch

import adpo
from harness import codedeps
import data
from harness import distributed
import sample
from harness import checks
from harness.checks import STAGES, RunError, check_finite, check_out_dir, checkpoint_dict, read_checkpoint
from model import compile_model

# the settings each artifact depends on, besides the artifact it is built from
DEPENDS_ON = {
    # the tokenizer also depends on the corpus (data, max_conversations, toxic_threshold)
    "tokenizer.json": ("vocab_size",),  # and --init_from's files, by content (file_digests)
    "sft.pt": ("seed", "context_turns", "toxic_copies", "n_layer", "n_head", "n_embd", "block_size",
               "dropout", "bias", "sft_iters", "batch_size", "learning_rate", "min_lr", "warmup_iters",
               "weight_decay", "beta1", "beta2", "grad_clip"),
    "triplets.jsonl": ("seed", "context_turns", "toxic_threshold", "temperature", "top_k", "max_new_tokens",
                       "sample_batch_size", "pref_contexts", "num_candidates", "toxic_retries"),
    "pref": ("min_judge_gap", "max_new_tokens", "beta", "gamma", "eps", "pref_iters", "pref_batch_size",
             "pref_lr", "pref_warmup_iters", "beta1", "beta2", "grad_clip", "diag_interval"),  # + loss, seed
    "eval": ("seed", "context_turns", "toxic_threshold", "temperature", "top_k", "max_new_tokens",
             "sample_batch_size", "min_judge_gap", "eval_contexts", "eval_samples", "ppl_replies"),
    "report.json": ("toxic_threshold",),  # and every model's evaluation
}
# settings that change no artifact: where and how a run goes, not what it computes (the corpus settings and
# --loss/--seeds enter through the corpus' content and each checkpoint's own loss and seed)
CHANGE_NO_ARTIFACT = ("preset", "out_dir", "stages", "device", "data", "max_conversations", "loss", "seeds",
                      "init_from",  # its path: its files count by their content
                      "eval_interval", "eval_iters", "checkpoint_interval", "compile", "grad_accum",
                      "log_interval")
STAGE_OF = {"tokenizer.json": "sft", "sft.pt": "sft", "triplets.jsonl": "triplets", "report.json": "eval"}


def digest(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def checkpoint_name(loss, seed, first_seed):
    return f"{loss}.pt" if seed == first_seed else f"{loss}_seed{seed}.pt"


# tables the shared code reaches but does not depend on: each loss counts in its own checkpoints only
SHARED_EXCLUDES = ("adpo.LOSSES",)


def code_of(*roots):
    """The code (and data files) the roots reach, with the losses' table left out (codedeps.py)."""
    return codedeps.code_of(*roots, exclude=SHARED_EXCLUDES)


def loss_code(loss):
    """What an edit of loss `loss` can change: its function (or lambda, or partial) and what it reaches."""
    return codedeps.code_of(adpo.LOSSES[loss]) if loss in adpo.LOSSES else []


def eval_name(model, seed, first_seed):
    """The evaluation of one model and seed: eval_sft.json, eval_sft_control.json, eval_dpo_seed1338.json."""
    return f"eval_{model}.json" if seed == first_seed else f"eval_{model}_seed{seed}.json"


def fingerprints(s, conversations, losses, seeds, code, evaluated=None):
    """{file name: fingerprint} of every artifact this command would write, before any is written. code: what
    computes each artifact (train.CODE). evaluated: the losses the eval step will find (default: all)."""
    def pick(name):
        return {k: getattr(s, k) for k in DEPENDS_ON[name]}, code_of(*code.get(name, ()))

    corpus = digest([(c.id, c.turns, c.toxic, c.split) for c in conversations])
    # the glue (train.main: which step runs, with what, and the helpers it calls, but not the steps' own
    # code, which counts for their artifacts alone): for every artifact
    steps = [x for name, roots in code.items() if name != "glue" for x in roots
             if not isinstance(x, str) or x.endswith(codedeps.DATA_SUFFIXES)]
    glue = codedeps.code_of(*code.get("glue", ()), exclude=SHARED_EXCLUDES + tuple(steps))
    gpt2_files = [os.path.join(s.init_from, name) for name in checks.GPT2_FILES] if s.init_from else []
    pretrained = file_digests(gpt2_files)
    fp = {"tokenizer.json": digest(corpus, pick("tokenizer.json"), glue, pretrained)}
    fp["sft.pt"] = digest(fp["tokenizer.json"], pick("sft.pt"))
    fp["triplets.jsonl"] = digest(fp["sft.pt"], pick("triplets.jsonl"))
    evaluation = pick("eval")
    for seed in seeds:
        fp[eval_name("sft", seed, s.seed)] = digest(fp["sft.pt"], fp["triplets.jsonl"], evaluation, "sft",
                                                    seed)
        fp[eval_name("sft_control", seed, s.seed)] = digest(fp["sft.pt"], evaluation, "sft_control", seed)
        for loss in losses:
            name = checkpoint_name(loss, seed, s.seed)
            fp[name] = digest(fp["triplets.jsonl"], pick("pref"), loss_code(loss), loss, seed)
            fp[eval_name(loss, seed, s.seed)] = digest(fp[name], fp["triplets.jsonl"], evaluation, loss, seed)
    models = ["sft", "sft_control"] + list(losses if evaluated is None else evaluated)
    fp["report.json"] = digest([fp[eval_name(m, seed, s.seed)] for seed in seeds for m in models],
                               pick("report.json"))
    return fp


def file_digests(paths):
    """The content of each file (a GPT-2 folder's, for --init_from), not its path. A missing file: None."""
    out = []
    for path in paths:
        if not os.path.isfile(path):
            out.append(None)
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out.append(h.hexdigest())
    return out


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


def preference_checkpoints(names):
    return [n for n in names if n.endswith(".pt") and n != "sft.pt"]


def check_inputs(out_dir, fp, stages, argv):
    """Before anything is written: each artifact a requested stage reads and no requested stage rebuilds
    must be there and fresh. Required: sft.pt and the tokenizer (for any stage after sft), triplets.jsonl (for
    pref). Optional for eval: triplets.jsonl, used when present, so then it must be fresh; and a loss'
    checkpoints, evaluated when its first seed's is present, so then every seed's must be there and fresh.
    And out_dir must be writable."""
    check_out_dir(out_dir)
    reads = set()
    if any(x in stages for x in ("triplets", "pref", "eval")):
        reads.add("sft.pt")  # it carries its tokenizer: tokenizer.json is only the sft step's cache
    if "pref" in stages:
        reads.add("triplets.jsonl")
    optional = set()
    if "eval" in stages:
        optional = {"triplets.jsonl"}
        for name in preference_checkpoints(fp):
            first_seed = name.split("_seed")[0].removesuffix(".pt") + ".pt"  # dpo_seed1338.pt -> dpo.pt
            if os.path.exists(os.path.join(out_dir, first_seed)):
                reads.add(name)
    # the model first: it is what a stale tokenizer spoils
    names = ["sft.pt"] + [n for n in fp if n != "sft.pt"]
    for name in [n for n in names if n in reads | optional]:
        stage = STAGE_OF.get(name, "pref")
        path = os.path.join(out_dir, name)
        if stage in stages or (name not in reads and not os.path.exists(path)):
            continue
        last = max(STAGES.index(x) for x in stages)
        # its stage and every later one up to this command's last
        rebuild = STAGES[STAGES.index(stage):last + 1]
        command = " ".join(["python train.py"] + [a for a in argv if not a.startswith("--stages=")]
                           + [f"--stages={','.join(rebuild)}"])
        if not os.path.exists(path):
            kind = "checkpoint" if name.endswith(".pt") else name.split(".")[0]
            raise RunError(f"no {kind} at {path}; build it with: {command}")
        if not is_fresh(path, fp[name]):
            raise RunError(f"{path} is stale (made with other settings or data, or not finished); "
                           f"rebuild it with: {command}")


# ----------------------------------------------------------------------------------------------------------
# writing: a temporary file, then an atomic rename; under torchrun only rank 0 writes, the others wait


def atomic_write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_text(path, text, fingerprint=None):
    """path written whole or not at all; with a fingerprint, recorded as finished, its chunks removed."""
    if distributed.is_main():
        atomic_write(path, text)
        if fingerprint is not None:
            record(path, fingerprint)
            if os.path.exists(chunks_path(path)):
                os.remove(chunks_path(path))  # the pieces of a finished stage
    distributed.barrier()


def save(obj, path):
    if distributed.is_main():
        tmp = path + ".tmp"
        torch.save(obj, tmp)
        os.replace(tmp, path)
    distributed.barrier()


def resume_path(path):
    return os.path.splitext(path)[0] + ".resume.pt"


def chunks_path(path):
    return os.path.splitext(path)[0] + ".chunks.json"


# ----------------------------------------------------------------------------------------------------------
# resume: every random state a training step reads, as tensors and plain values (weights_only loading)


def rng_states(generator):
    """torch's (CUDA's too), numpy's, Python's and the batches' random states."""
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


# ----------------------------------------------------------------------------------------------------------


class Run:
    """One command's hold on out_dir. train.py's steps ask it three kinds of things: is an artifact
    fresh (skip its step), save and resume training (two calls in a loop), and write a file or a piece
    of a stage."""

    def __init__(self, s, argv=(), conversations=None, losses=(), seeds=(), code=None, stages=()):
        """Checks, before anything is written, that what the stages read is there and fresh. Without
        conversations, a run that keeps nothing between commands (no fingerprints: tests, sweep points)."""
        self.s = s
        self.t_start = time.time()
        self.fp = {}
        # the losses the eval step evaluates: all after a pref step, else those whose checkpoints are there
        self.evaluated = [n for n in losses if "pref" in stages or os.path.isfile(self.path(f"{n}.pt"))]
        if conversations is not None:
            self.fp = fingerprints(s, conversations, losses, seeds, code or {}, self.evaluated)
            check_inputs(s.out_dir, self.fp, stages, argv)
        self.stage_seconds = {}
        self._chunks = {}

    def path(self, name):
        return os.path.join(self.s.out_dir, name)

    def fresh(self, name):
        return is_fresh(self.path(name), self.fp[name])

    @contextmanager
    def timed(self, stage):
        t0 = time.time()
        yield
        self.stage_seconds[stage] = time.time() - t0

    def wall_time(self):
        return time.time() - self.t_start

    def write(self, name, text):
        """out_dir/name, atomically; an artifact (a name with a fingerprint) is then recorded as finished."""
        write_text(self.path(name), text, self.fp.get(name))

    def save_checkpoint(self, name, model, tok, **extra):
        """out_dir/name with the tokenizer inside, recorded as finished; its resume state is removed."""
        path = self.path(name)
        save(checkpoint_dict(model, tok, self.s, fingerprint=self.fp.get(name), **extra), path)
        if distributed.is_main() and name in self.fp:
            record(path, self.fp[name])
            if os.path.exists(resume_path(path)):
                os.remove(resume_path(path))
        RESUMABLE.clear()
        distributed.barrier()

    def tokenizer(self, make):
        """tokenizer.json if it is fresh, else make() saved there and recorded. Rank 0 makes it first."""
        def get():
            path = self.path("tokenizer.json")
            if self.fresh("tokenizer.json"):
                with open(path, encoding="utf-8") as f:
                    return data.tokenizer_from_str(f.read())
            tok = make()
            if distributed.is_main():
                atomic_write(path, tok.to_str())
                record(path, self.fp["tokenizer.json"])
            return tok
        return distributed.main_first(get)

    # training: where a loop resumes, and what it saves

    def prepare(self, model, rows):
        """The model a training loop runs: compiled with --compile, wrapped for DDP under torchrun."""
        if self.s.compile:
            model = compile_model(model, (rows, self.s.block_size), self.s.device)
        return distributed.wrap(model, self.s.device)

    def resume(self, name, model, optimizer, generator):
        """(the step to start from, the state saved with it): 0 and {}, or those of NAME.resume.pt when it was
        saved by the same command (same fingerprint), restored into model, optimizer and the random states."""
        path = resume_path(self.path(name))
        if name not in self.fp or not os.path.isfile(path):
            return 0, {}
        state = read_checkpoint(path)
        if state.get("fingerprint") != self.fp[name]:
            return 0, {}
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_states(state["rng"], generator)
        print(f"{os.path.basename(path)}: resumed at step {state['step']}")
        return state["step"], state

    def end_step(self, name, step, loss, model, optimizer, generator, **state):
        """After step `step` (counted from 0): stop on a non-finite loss; every --checkpoint_interval steps,
        save everything the loop needs to go on (state: its data position, its logs)."""
        check_finite(loss, name.split("_seed")[0].removesuffix(".pt"), step)  # dpo_seed1338.pt: dpo
        if (step + 1) % self.s.checkpoint_interval == 0 and name in self.fp:
            save({"fingerprint": self.fp[name], "step": step + 1, "model": model.state_dict(),
                  "optimizer": optimizer.state_dict(), "rng": rng_states(generator), **state},
                 resume_path(self.path(name)))
            RESUMABLE.update(name=name, step=step + 1)

    # sampling: split over the processes, and kept piece by piece until the stage is done

    def sample(self, model, tok, contexts, num_samples=1, seed=0, progress=None, **kw):
        """sample.sample_replies, each process sampling its share of the rows (rank 0 with the single-process
        random stream, the others with their own); every process gets all the replies, in order."""
        if distributed.world_size() == 1:
            return sample.sample_replies(model, tok, contexts, num_samples=num_samples, seed=seed,
                                         progress=progress, **kw)
        rows = distributed.split([c for c in contexts for _ in range(num_samples)])
        mine = sample.sample_replies(model, tok, rows, seed=seed + 1_000_003 * distributed.rank(),
                                     progress=progress if distributed.is_main() else None, **kw)
        replies = distributed.gather([r for rs in mine for r in rs])
        return [replies[i * num_samples:(i + 1) * num_samples] for i in range(len(contexts))]

    def once(self, name, key, compute, decode=lambda value: value):
        """decode(compute()), computed only if no earlier run of the same fingerprint of artifact `name`
        saved it under key in NAME.chunks.json. Both ways the value is read back from JSON, so a resumed stage
        and an uninterrupted one compute with the very same numbers."""
        if name not in self._chunks:
            saved, path = {}, chunks_path(self.path(name))
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    stored = json.load(f)
                saved = stored["chunks"] if stored.get("fingerprint") == self.fp[name] else {}
                print(f"{os.path.basename(path)}: resumed after {len(saved)} finished chunk(s)")
            self._chunks[name] = saved
        saved = self._chunks[name]
        if key not in saved:
            # numpy arrays and torch tensors -> lists
            saved[key] = json.loads(json.dumps(compute(), default=lambda x: x.tolist()))
            write_text(chunks_path(self.path(name)),
                       json.dumps({"fingerprint": self.fp[name], "chunks": saved}))
        return decode(saved[key])

    def lock_out_dir(self):
        """out_dir created and held by this run (an flock, which even kill -9 releases): a second run started
        in it stops at once, naming the process that holds it. Under torchrun rank 0 holds it."""
        os.makedirs(self.s.out_dir, exist_ok=True)
        if not distributed.is_main():
            return
        self._lock = open(self.path(".lock"), "a")  # created once, never written
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(self.path(".lock"))
            raise RunError(f"{self.s.out_dir} is in use by another run (process {holder}); wait for it to "
                           f"end or use another --out_dir") from None

    def kept(self, name, compute, decode=lambda value: value):
        """decode(the JSON in out_dir/name) when it is fresh, else decode(compute()) written there first, so a
        value read back later and one just computed are the very same numbers."""
        if not self.fresh(name):
            # numpy and torch values as lists; no nan (not JSON)
            value = json.dumps(compute(), default=lambda x: x.tolist(), allow_nan=False)
            self.write(name, value + "\n")
        with open(self.path(name), encoding="utf-8") as f:
            return decode(json.load(f))

    def sampler(self, name):
        """A function like sample.sample_replies whose calls are kept in name's chunks: a killed stage resumes
        after its last finished sampling call."""
        def sample_kept(model, tok, contexts, **kw):
            key = digest(contexts, {k: v for k, v in kw.items() if k != "progress"})
            return self.once(name, key, lambda: self.sample(model, tok, contexts, **kw), sample.as_replies)
        return sample_kept


def lock_holder(path):
    """The process that holds an flock on path, from /proc/locks (Linux), or "unknown"."""
    inode = str(os.stat(path).st_ino)
    try:
        with open("/proc/locks") as f:
            for line in f:  # 1: FLOCK  ADVISORY  WRITE 1234 08:02:5678 0 EOF
                fields = line.replace("->", "").split()
                if fields[1] == "FLOCK" and fields[5].split(":")[-1] == inode:
                    return fields[4]
    except (OSError, IndexError):
        pass
    return "unknown"


# ----------------------------------------------------------------------------------------------------------

RESUMABLE = {}  # the last resume state this process saved of a checkpoint not finished yet: name, step


def run_main(main):
    """checks.run_main(main), and Ctrl-C as one line that says where rerunning the same command goes on."""
    def interruptible(argv):
        try:
            main(argv)
        except KeyboardInterrupt:
            if RESUMABLE:
                where = (f"resumes {RESUMABLE['name'].removesuffix('.pt')} at step {RESUMABLE['step']} "
                         f"({os.path.basename(resume_path(RESUMABLE['name']))})")
            else:
                where = "goes on from what is finished"
            raise RunError(f"interrupted; rerunning the same command {where}") from None
    checks.run_main(interruptible)
