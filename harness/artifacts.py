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
  sampling stages keep each finished piece (a sampling call in NAME.chunks/, a model's evaluation) (kept).
- torchrun: only rank 0 writes; sampling splits the rows over the processes and gathers the replies.
"""

import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import time

import numpy as np
import torch

import adpo
import data
import sample
from data import UserError
from harness import checks, codedeps, distributed, reports
from harness.checks import STAGES, RunError, check_out_dir, checkpoint_dict, load_checkpoint, read_checkpoint
from harness.loop import Hooks

# the settings each artifact depends on, besides the artifact it is built from
DEPENDS_ON = {
    # the tokenizer also depends on the corpus (data, max_conversations, toxic_threshold)
    "tokenizer.json": ("vocab_size",),  # and --init_from's files, by content (file_digests)
    "sft.pt": ("dtype", "seed", "context_turns", "toxic_copies", "n_layer", "n_head", "n_embd", "block_size",
               "dropout", "bias", "sft_iters", "batch_size", "learning_rate", "min_lr", "warmup_iters",
               "weight_decay", "beta1", "beta2", "grad_clip"),
    "triplets.jsonl": ("dtype", "seed", "context_turns", "toxic_threshold", "temperature", "top_k",
                       "max_new_tokens", "sample_batch_size", "pref_contexts", "num_candidates",
                       "toxic_retries"),
    "pref": ("dtype", "min_judge_gap", "max_new_tokens", "beta", "gamma", "eps", "pref_iters",
             "pref_batch_size", "pref_lr", "pref_warmup_iters", "beta1", "beta2", "grad_clip",
             "diag_interval"),  # + loss, seed
    "eval": ("dtype", "seed", "context_turns", "toxic_threshold", "temperature", "top_k", "max_new_tokens",
             "sample_batch_size", "min_judge_gap", "eval_contexts", "eval_samples", "ppl_replies"),
    "report.json": ("dtype", "toxic_threshold"),  # and every model's evaluation
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
# and train.OneProcess, the hooks of a loop run alone (tests, notebooks): main() never uses them
SHARED_EXCLUDES = ("adpo.LOSSES", "harness.artifacts.OWN_CODE", "train.OneProcess")


def code_of(*roots):
    """The code (and data files) the roots reach, with the losses' table left out (codedeps.py)."""
    return codedeps.code_of(*roots, exclude=SHARED_EXCLUDES)


def loss_code(loss):
    """What an edit of loss `loss` can change: its function (or lambda, or partial) and what it reaches."""
    return codedeps.code_of(adpo.LOSSES[loss]) if loss in adpo.LOSSES else []


def metrics_name(checkpoint):
    """The per-step metrics of a checkpoint's training: dpo.pt -> metrics_dpo.jsonl."""
    return f"metrics_{checkpoint.removesuffix('.pt')}.jsonl"


def eval_name(model, seed, first_seed):
    """The evaluation of one model and seed: eval_sft.json, eval_sft_control.json, eval_dpo_seed1338.json."""
    return f"eval_{model}.json" if seed == first_seed else f"eval_{model}_seed{seed}.json"


def fingerprints(s, conversations, losses, seeds, code, evaluated=None):
    """{file name: fingerprint} of every artifact this command would write, before any is written. code: what
    computes each artifact (train.CODE). evaluated: the losses the eval step will find (default: all)."""
    def pick(name):
        return {k: getattr(s, k) for k in DEPENDS_ON[name]}, code_of(*code.get(name, ()), *OWN_CODE[name])

    corpus = digest([(c.id, c.turns, c.toxic, c.split) for c in conversations])
    # the glue (train.main: which step runs, with what, and the helpers it calls, but not the steps' own
    # code, which counts for their artifacts alone): for every artifact
    steps = [x for name, roots in [*code.items(), *OWN_CODE.items()] if name != "glue" for x in roots
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


def jsonl(rows):
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


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
            if os.path.isdir(chunks_path(path)):
                shutil.rmtree(chunks_path(path))  # the pieces of a finished stage
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
    return os.path.splitext(path)[0] + ".chunks"


def kept(path, key, compute, decode=lambda value: value, fingerprint=None, strict=True):
    """The one cache of every result kept between runs (a model's evaluation, a sampling call of a stage, a
    sweep's point): decode(the value saved at path) when it was saved under the same key, else
    decode(compute()), saved there first as {"key": key, "value": ...}. Both ways the value is read back from
    JSON, so a result reused and one just computed are the very same numbers. fingerprint: path is an
    artifact, recorded as finished; strict: no nan or inf (not JSON)."""
    if key is None or saved_key(path) != as_json(key):  # the key as JSON reads it back
        text = json.dumps({"key": key, "value": compute()}, default=lambda x: x.tolist(),
                          allow_nan=not strict)
        write_text(path, text + "\n", fingerprint)
    with open(path, encoding="utf-8") as f:
        return decode(json.load(f)["value"])


def saved_key(path):
    """The key the result at path was kept under (kept), or None (no such file, or not one kept wrote)."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        return saved["key"] if "value" in saved else None
    except (OSError, ValueError, TypeError, KeyError):
        return None


def as_json(value):
    """value as JSON reads it back: tuples as lists, numpy arrays and torch tensors as lists."""
    return json.loads(json.dumps(value, default=lambda x: x.tolist()))


# ----------------------------------------------------------------------------------------------------------
# resume: every random state a training step reads, as tensors and plain values (weights_only loading)


def rng_states(generator):
    """torch's (CUDA's or MPS's too), numpy's, Python's and the batches' random states."""
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "mps": [torch.mps.get_rng_state()] if torch.backends.mps.is_available() else [],
            # as tensors and lists: weights_only loading takes no numpy array and no tuple of them
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_states(states, generator):
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if states["mps"] and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"][0])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------------------------------------


class Run:
    """One command's hold on out_dir, built by start(). train.main asks it whether an artifact is to be made
    (todo), hands each training loop its hooks, and gives it what a step made to save; the sampling stages
    keep their finished pieces through it."""

    def __init__(self, s, argv=(), conversations=None, losses=(), seeds=(), code=None, stages=()):
        """Checks, before anything is written, that what the stages read is there and fresh. Without
        conversations, a run that keeps nothing between commands (no fingerprints: tests, sweep points)."""
        self.s, self.stages, self.losses, self.seeds = s, list(stages), list(losses), list(seeds)
        self.t_start = time.time()
        self.fp = {}
        # the losses the eval step evaluates: all after a pref step, else those whose checkpoints are there
        self.evaluated = [n for n in losses if "pref" in stages or os.path.isfile(self.path(f"{n}.pt"))]
        if conversations is not None:
            self.fp = fingerprints(s, conversations, losses, seeds, code or {}, self.evaluated)
            check_inputs(s.out_dir, self.fp, stages, argv)
        self.stage_seconds = {}
        self._chunks = set()  # the artifacts whose kept pieces this run has looked at
        self._stage = None  # (the stage being made, when it started)
        self._curves = {}  # loss -> per-step metrics of the first seed, for curves.png
        self._evaluations = {}  # (model, seed) -> its evaluation

    def path(self, name):
        return os.path.join(self.s.out_dir, name)

    def fresh(self, name):
        return is_fresh(self.path(name), self.fp[name])

    def wall_time(self):
        return time.time() - self.t_start

    def todo(self, name):
        """Whether train.main makes artifact `name` now: its stage is in --stages and it is not fresh. Yes
        also starts the stage's clock."""
        stage = STAGE_OF[name]
        if stage not in self.stages or self.fresh(name):
            return False
        self._stage = (stage, time.time())
        return True

    def _stage_done(self):
        if self._stage is not None:
            self.stage_seconds[self._stage[0]] = time.time() - self._stage[1]
            self._stage = None

    def done(self):
        print(f"done in {self.wall_time() / 60:.1f} min; outputs in {self.s.out_dir}/")

    # writing: atomically, each artifact recorded as finished

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

    # step 1 and 2: the SFT model and the triplets

    def save_sft(self, model, tok, curve):
        self.write("metrics_sft.jsonl", jsonl(curve))
        self.save_checkpoint("sft.pt", model, tok)
        self._stage_done()

    def load_sft(self):
        """(the SFT model, its tokenizer) from sft.pt."""
        model, tok, _ = load_checkpoint(self.path("sft.pt"), self.s.device)
        return model, tok

    def save_triplets(self, triplets):
        self.write("triplets.jsonl", jsonl(triplets))
        self._stage_done()
        print(f"triplets: {len(triplets)} written to {self.path('triplets.jsonl')}; "
              + reports.describe_triplets(triplets, self.s.toxic_threshold))

    def triplets(self, tok, sft_model):
        """triplets.jsonl read back and encoded (checks.load_triplets) when a step still to do reads it and it
        is there; else [] and None."""
        wanted = ("pref" in self.stages and self._to_train()) or \
            ("eval" in self.stages and not self.fresh("report.json"))
        if not wanted or not os.path.isfile(self.path("triplets.jsonl")):
            return [], None
        return checks.load_triplets(self.path("triplets.jsonl"), tok, self.s, sft_model.config.block_size)

    # step 3: the preference stage

    def _policies(self):
        """(loss, seed) of every policy of this command, seed by seed."""
        return [(loss, seed) for seed in self.seeds for loss in self.losses]

    def _to_train(self):
        return [(loss, seed) for loss, seed in self._policies()
                if not self.fresh(checkpoint_name(loss, seed, self.s.seed))]

    def to_train(self):
        """The (loss, seed) pairs of the preference stage not trained by the same command yet (none without
        pref in --stages). When the last is saved: each policy's metrics file where it is missing, and
        curves.png (the first seed's curves)."""
        if "pref" not in self.stages:
            return
        t0, todo = time.time(), self._to_train()
        yield from todo
        for loss, seed in self._policies():
            name = checkpoint_name(loss, seed, self.s.seed)
            metrics_file = metrics_name(name)
            if (loss, seed) in todo or (seed != self.s.seed and os.path.isfile(self.path(metrics_file))):
                continue
            metrics = read_checkpoint(self.path(name))["metrics"]
            if not os.path.isfile(self.path(metrics_file)):
                self.write(metrics_file, jsonl(metrics))
            if seed == self.s.seed:
                self._curves[loss] = metrics
        if distributed.is_main() and (todo or not os.path.isfile(self.path("curves.png"))):
            reports.plot_curves(self.path("curves.png"), {loss: self._curves[loss] for loss in self.losses})
        self.stage_seconds["pref"] = time.time() - t0

    def hooks(self, name, seed=None):
        """The hooks of the loop that makes checkpoint `name` (sft.pt), or loss `name`'s of seed `seed`."""
        return Hooks(self, name if seed is None else checkpoint_name(name, seed, self.s.seed))

    def save_policy(self, loss, seed, policy, tok, metrics):
        name = checkpoint_name(loss, seed, self.s.seed)
        self.save_checkpoint(name, policy, tok, loss=loss, pref_seed=seed, metrics=metrics)
        self.write(metrics_name(name), jsonl(metrics))
        if seed == self.s.seed:
            self._curves[loss] = metrics

    def load_policy(self, loss, seed):
        """(the policy, its per-step metrics) of loss `loss` and seed `seed`."""
        policy, _, ckpt = load_checkpoint(self.path(checkpoint_name(loss, seed, self.s.seed)), self.s.device)
        return policy, ckpt["metrics"]

    # step 4: the evaluations and the report

    def evaluation(self, model, seed, compute):
        """The evaluation of `model` with `seed`: eval_MODEL.json when it is fresh, else compute() written
        there first (read back from JSON both ways, so a resumed stage computes with the same numbers)."""
        name = eval_name(model, seed, self.s.seed)
        self._evaluations[model, seed] = kept(self.path(name), self.fp.get(name), compute,
                                              reports.results_from_json, self.fp.get(name))

    def report(self, sets, triplets, logratios):
        """report.json (written last: it marks the stage finished), report.md and samples.json from the
        evaluations, the token figure; the table printed."""
        runs = {"sft": [], **{name: [] for name in self.evaluated}}
        samples = {}
        for seed in self.seeds:
            r, samples["sft"], units = self._evaluations["sft", seed]
            control, samples["sft_control"] = self._evaluations["sft_control", seed]
            runs["sft"].append(({**control, **r}, units))
            for name in self.evaluated:
                r, samples[name], units = self._evaluations[name, seed]
                runs[name].append((r, units))
        if logratios and distributed.is_main():
            reports.plot_token_logratios(self.path("token_logratios.png"), logratios)
        self._stage_done()
        files = reports.report_files(self.s, runs, sets, samples, triplets, logratios, self.stage_seconds,
                                     self.wall_time())
        for name, text in files.items():  # report.json last
            self.write(name, text)
        print(reports.report_table(json.loads(files["report.json"]), list(runs)))

    # training: where a loop resumes, and what it saves (harness/loop.py)

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

    def save_resume_state(self, name, step, model, optimizer, generator, **state):
        """Every --checkpoint_interval steps, NAME.resume.pt: all a loop needs to go on after step `step`."""
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
        """decode(compute()) of piece `key` of the stage that makes artifact `name`, kept (in NAME.chunks/,
        under the artifact's fingerprint) until the artifact is finished: a killed stage resumes after its
        last finished piece."""
        folder = chunks_path(self.path(name))
        if name not in self._chunks and os.path.isdir(folder):
            keys = [saved_key(os.path.join(folder, f)) for f in os.listdir(folder)]
            done = sum(isinstance(k, list) and k[:1] == [self.fp[name]] for k in keys)
            print(f"{os.path.basename(folder)}: resumed after {done} finished chunk(s)")
        self._chunks.add(name)
        if distributed.is_main():
            os.makedirs(folder, exist_ok=True)  # a file a piece, so a kill leaves the finished ones whole
        return kept(os.path.join(folder, f"{digest(key)}.json"), [self.fp[name], key], compute, decode,
                    strict=False)

    def lock_out_dir(self):
        """out_dir created and held by this run (an flock, which even kill -9 releases): a second run started
        in it stops at once, naming the process that holds it. Under torchrun rank 0 holds it."""
        os.makedirs(self.s.out_dir, exist_ok=True)
        if not distributed.is_main():
            return
        HOLDING.append(self.s.out_dir)  # for run_main: what a rerun after Ctrl-C goes on from
        self._lock = open(self.path(".lock"), "a")  # created once, never written
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(self.path(".lock"))
            raise RunError(f"{self.s.out_dir} is in use by another run (process {holder}); wait for it to "
                           f"end or use another --out_dir") from None

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


# the machinery's own code that each artifact passes through (train.CODE names the method's)
OWN_CODE = {"tokenizer.json": (Run.tokenizer,),
            "sft.pt": (Run.hooks, Hooks.start_loop, Hooks.end_step, Hooks.micro_batches,
                       Hooks.sum_over_processes, Run.save_sft, Run.save_checkpoint, load_checkpoint),
            "triplets.jsonl": (Run.sampler, Run.save_triplets),
            "pref": (Run.hooks, Hooks.start_loop, Hooks.end_step, Hooks.process_part, Hooks.average_gradients,
                     Hooks.mean_over_processes, Run.triplets, Run.to_train, Run.save_policy,
                     Run.save_checkpoint),
            "eval": (Run.triplets, Run.evaluation, Run.load_policy, Run.sample),
            "report.json": (Run.report,)}


def start(argv, defaults, presets, code):
    """train.py's start: its settings (defaults, then the preset's, then argv's --key=value, all checked), the
    corpus, and the Run, which has checked that what the stages read is there and fresh, and holds out_dir.
    code: what computes each artifact (train.CODE)."""
    s = checks.get_settings(argv, defaults, presets)
    s = dataclasses.replace(s, device=distributed.setup(s.device))  # under torchrun: join the processes
    stages = checks.stage_list(s)
    conversations = checks.load_corpus(s)
    print(reports.summary(conversations))
    # the DPO baseline and the method(s); each seed trains and evaluates again
    run = Run(s, argv, conversations, checks.loss_list(s), [s.seed + i for i in range(s.seeds)], code, stages)
    checks.check_inputs(s, stages, conversations, run.path("triplets.jsonl"))
    run.lock_out_dir()  # this run's alone, until it ends
    run.stage_seconds["data"] = run.wall_time()
    return s, conversations, run


# ----------------------------------------------------------------------------------------------------------

RESUMABLE = {}  # the last resume state this process saved of a checkpoint not finished yet: name, step
HOLDING = []  # the out_dir this process holds, if any


def run_main(main):
    """main(sys.argv[1:]) as a command: an int it returns is the exit status (else 0). An error the user
    caused (settings, data, artifacts, files: data.UserError) ends in one line `error: ...`; Ctrl-C in one
    line that says where rerunning the same command goes on. A reader of stdout that stops early
    (`python sample.py | head -1`) ends the command quietly, with exit status 141."""
    try:
        status = main(sys.argv[1:])
        sys.stdout.flush()  # a reader gone during the last write shows here, not in the interpreter's flush
    except BrokenPipeError:  # an OSError, but normal for a pipe: no message (the Python docs' SIGPIPE recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush has nothing to fail
        sys.exit(141)  # 128 + SIGPIPE, as a shell reports `yes | head -1`: not all was written, not an error
    except KeyboardInterrupt:
        where = ""  # a command that keeps nothing: nothing to say
        if RESUMABLE:
            where = (f"; rerunning the same command resumes {RESUMABLE['name'].removesuffix('.pt')} at step "
                     f"{RESUMABLE['step']} ({os.path.basename(resume_path(RESUMABLE['name']))})")
        elif HOLDING:
            where = "; rerunning the same command goes on from what is finished"
        sys.exit("error: interrupted" + where)
    except (UserError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # an unwritable or full out_dir
        sys.exit(f"error: {e.filename or ''}: {e.strerror or e}")
    finally:
        distributed.teardown()
    sys.exit(status if isinstance(status, int) else 0)  # a main may return its results to a caller instead
