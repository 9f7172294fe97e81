"""Staleness by planted edits (codedeps.py, artifacts.fingerprints): each edit of the project's code makes
stale exactly the artifacts computed from it, wherever the code is (another module, behind a decorator, in a
method, a cached function, a table, a default argument, a constant, a lambda), and nothing else. Most compare
fingerprints before and after an edit planted in the source the walk reads; the last ones rerun the tiny
preset."""

import functools
import os
import shutil
import subprocess
import sys

import pytest

import adpo
import artifacts
import codedeps
import data
import sweep
import train
from conftest import RUN

HERE = os.path.dirname(os.path.abspath(__file__))

TOKENIZER = ["tokenizer.json"]
SFT = ["sft.pt"]
TRIPLETS = ["triplets.jsonl"]
EVALS = ["eval_sft.json", "eval_sft_control.json", "eval_dpo.json", "eval_adpo.json"]
POLICIES = ["dpo.pt", "adpo.pt"]
REPORT = ["report.json"]
EVERYTHING = TOKENIZER + SFT + TRIPLETS + EVALS + POLICIES + REPORT
AFTER_SFT = SFT + TRIPLETS + EVALS + POLICIES + REPORT
AFTER_TRIPLETS = TRIPLETS + EVALS + POLICIES + REPORT  # triplets feed the policies and every evaluation


def fingerprints(losses=("dpo", "adpo")):
    s = train.get_settings(["--preset=tiny"])
    conversations = [data.Conversation("1", ["hi", "hello"], [False, False], "sft")]
    return artifacts.fingerprints(s, conversations, list(losses), [s.seed], train.CODE)


def plant(monkeypatch, path, old, new):
    """The walk reads `path` with `old` replaced by `new` (which must occur once: a typo fails the test)."""
    real = codedeps.read_source
    text = real(path)
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {path}"
    edited = text.replace(old, new)
    monkeypatch.setattr(codedeps, "read_source", lambda p: edited if p == path else real(p))


def stale_after(monkeypatch, module, old, new, losses=("dpo", "adpo")):
    before = fingerprints(losses)
    plant(monkeypatch, codedeps.module_file(module), old, new)
    after = fingerprints(losses)
    return sorted(name for name in before if before[name] != after[name])


EDITS = {
    # the review's case: scoring without end-of-turn changes SFT's val_ppl as much as the policies'
    "adpo.token_logps": ("adpo", "    mask = targets != -1\n", "    mask = (targets != -1) & (targets != 1)\n",
                         POLICIES + EVALS + REPORT),
    # a decorated function (@torch.no_grad) and what it calls in its own module
    "sample.sample_replies": ("sample", "        bar.update(len(out))\n", "        bar.update(len(out) + 0)\n",
                              AFTER_TRIPLETS),
    "sample.prompt_ids": ("sample", "max_tokens=model.config.block_size - max_new_tokens)",
                          "max_tokens=model.config.block_size - max_new_tokens - 1)", AFTER_TRIPLETS),
    # callees in other modules
    "data.train_tokenizer": ("data", "initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)",
                             "initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False, "
                             "min_frequency=3)", EVERYTHING),
    "distributed.micro_batches": ("distributed", "    total = max(int((y != -1).sum()), 1)\n",
                                  "    total = max(int((y != -1).sum()), 2)\n", AFTER_SFT),
    # a method, reached through the class a cached function builds
    "evaluate.IndexedWords.__contains__": ("evaluate", "or any(entry == word for entry in self.always)",
                                           "or any(entry == word.lower() for entry in self.always)",
                                           EVALS + REPORT),
    # a function under functools.cache
    "evaluate.wordlist": ("evaluate", "    judge = Profanity()", "    judge = Profanity(['darn'])",
                          EVALS + REPORT),
    # a table of functions, read by the report only
    "evaluate.TRANSFORMS": ("evaluate", 'TRANSFORMS = {"val_ppl": math.exp}',
                            'TRANSFORMS = {"val_ppl": lambda x: math.exp(x)}', REPORT),
    # a module constant used only as a default argument
    "evaluate.COMPARED_KEYS": ("evaluate", 'COMPARED_KEYS = ["toxicity_adversarial", ',
                               'COMPARED_KEYS = ["toxicity_normal", "toxicity_adversarial", ', REPORT),
    # a module constant the evaluation reads
    "evaluate.EVASIONS": ("evaluate", "EVASIONS = (", "EVASIONS = ('no comment', ", EVALS + REPORT),
    # the review's off-by-one in the token figure
    "evaluate.token_logratios": ("evaluate", "idx = range(min(n, len(enc)))", "idx = range(min(n, len(enc)) - 1)",
                                 REPORT),
    # a loss: its own checkpoint and evaluation, and the report; DPO's stay fresh
    "adpo.adpo_loss": ("adpo", "    return -F.logsigmoid(beta * (h_w - h_l) - gamma * h_t)",
                       "    return -F.logsigmoid(beta * (h_w - h_l) - 2 * gamma * h_t)",
                       ["adpo.pt", "eval_adpo.json", "report.json"]),
    # the glue: what train.main() passes each step (its own source counts for every artifact)
    "train.main": ("train", "run.sampler(\"triplets.jsonl\"))", "run.sampler(name=\"triplets.jsonl\"))",
                   EVERYTHING),
    # a comment, a docstring, a function nobody calls: nothing
    "a comment": ("adpo", "float32: bf16 sums lose whole nats", "float32: bf16 sums lose nats", []),
    "a docstring": ("sample", "The same seed gives the same replies.", "A seed gives its replies.", []),
    "an unused function": ("adpo", "\nLOSSES = {", "\ndef nll_loss(policy_chosen_logps):\n"
                           "    return -policy_chosen_logps\n\n\nLOSSES = {", []),
}


@pytest.mark.parametrize("place", list(EDITS))
def test_an_edit_makes_stale_exactly_what_it_computes(monkeypatch, place):
    module, old, new, stale = EDITS[place]
    assert stale_after(monkeypatch, module, old, new) == sorted(stale)


def test_a_data_file_counts_by_content(monkeypatch, tmp_path):
    """provoked.txt, read by the evaluation: an edit of its content makes the evaluations stale."""
    before = fingerprints()
    path = os.path.join(codedeps.ROOT, "provoked.txt")
    real = open(path, "rb").read()
    shadow = tmp_path / "root"
    shadow.mkdir()
    for name in os.listdir(codedeps.ROOT):  # the same files, provoked.txt edited: ROOT pointed there
        if name.endswith(".py"):
            os.symlink(os.path.join(codedeps.ROOT, name), shadow / name)
    (shadow / "provoked.txt").write_bytes(real + b"one more provoking line\n")
    monkeypatch.setattr(codedeps, "ROOT", str(shadow))
    codedeps.module_file.cache_clear()
    try:
        after = fingerprints()
    finally:
        codedeps.module_file.cache_clear()
    assert sorted(n for n in before if before[n] != after[n]) == sorted(EVALS + REPORT)


def lambda_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    return adpo.dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)


MINE = lambda policy_chosen_logps, ref_chosen_logps: (ref_chosen_logps - policy_chosen_logps) * 1.5  # noqa: E731


@pytest.mark.parametrize("registered", ["lambda", "partial"])
def test_a_loss_registered_as_a_lambda_or_a_partial_is_followed(monkeypatch, registered):
    loss = MINE if registered == "lambda" else functools.partial(adpo.adpo_loss, gamma=0.0)
    monkeypatch.setitem(adpo.LOSSES, "mine", loss)
    losses = ("dpo", "mine")
    mine = sorted(["mine.pt", "eval_mine.json", "report.json"])
    if registered == "lambda":  # an edit of the lambda's own line
        old = "policy_chosen_logps) * " + "1.5"  # written apart, so that it occurs once in this file
        assert stale_after(monkeypatch, "test_staleness", old, old.replace("1.5", "2.5"), losses) == mine
    else:  # an edit of the function it binds, and another keyword
        assert stale_after(monkeypatch, "adpo", "    return -F.logsigmoid(beta * (h_w - h_l) - gamma * h_t)",
                       "    return -F.logsigmoid(beta * (h_w - h_l) - 2 * gamma * h_t)",
                           losses) == mine
        before = fingerprints(losses)
        monkeypatch.setitem(adpo.LOSSES, "mine", functools.partial(adpo.adpo_loss, gamma=0.5))
        after = fingerprints(losses)
        assert sorted(n for n in before if before[n] != after[n]) == mine


def test_the_walk_follows_every_kind_of_reference():
    """What each edit above relies on, named: the walk reaches these from the stages' code."""
    reached = {key.rsplit(":", 1)[0] for key in codedeps.reached(*train.CODE["eval"],
                                                                exclude=artifacts.SHARED_EXCLUDES)}
    for piece in ("sample:sample_replies", "sample:prompt_ids", "evaluate:wordlist", "evaluate:IndexedWords",
                  "evaluate:EVASIONS", "adpo:token_logps", "checks:load_checkpoint", "file"):
        assert piece in reached
    assert not {"adpo:dpo_loss", "adpo:adpo_loss", "adpo:LOSSES"} & reached  # the losses count on their own
    report = {key.rsplit(":", 1)[0] for key in codedeps.reached(*train.CODE["report.json"])}
    assert {"evaluate:TRANSFORMS", "evaluate:COMPARED_KEYS", "evaluate:token_logratios"} <= report


def test_the_sweeps_cache_keys_hold_the_code_that_computes_them(monkeypatch):
    """A cached sweep point or stress run is computed again when the code that computes it changed: here the
    interval code (evaluate.summarize), which the grid's goal test reads, and the stress run's val_ppl."""
    grid_code = artifacts.code_of(sweep.grid_sweep, sweep.run_point, sweep.preference_inputs)
    stress_code = artifacts.code_of(sweep.stress_run, sweep.preference_inputs)
    plant(monkeypatch, codedeps.module_file("evaluate"), "def summarize(runs):\n",
          "def summarize(runs):\n    runs = list(runs)\n")
    assert artifacts.code_of(sweep.grid_sweep, sweep.run_point, sweep.preference_inputs) != grid_code
    assert artifacts.code_of(sweep.stress_run, sweep.preference_inputs) == stress_code
    plant(monkeypatch, codedeps.module_file("evaluate"), "    return math.exp(-logps.sum() / tokens.sum())",
          "    return math.exp(-logps.sum() / tokens.sum() + 0)")
    assert artifacts.code_of(sweep.stress_run, sweep.preference_inputs) != stress_code


# ----------------------------------------------------------------------------------------------------------
# end to end on the tiny preset


def copy_checkout(tmp_path, finished):
    """The project's files and a finished out_dir, copied elsewhere: another path, the same content."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in os.listdir(HERE):
        if name.endswith((".py", ".txt")):
            shutil.copy(os.path.join(HERE, name), root / name)
    shutil.copytree(finished, root / "out")
    return str(root)


def train_in(root, *args):
    result = subprocess.run([sys.executable, "train.py", *RUN, "--out_dir=out", *args], cwd=root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def mtimes(folder):
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


def test_a_copied_checkout_reruns_nothing_and_an_edit_reruns_what_it_feeds(finished, tmp_path):
    root = copy_checkout(tmp_path, finished)
    out = os.path.join(root, "out")
    before = mtimes(out)
    train_in(root)
    assert mtimes(out) == before  # nothing written: every fingerprint equal in the other folder
    # the review's reproduction: end-of-turn no longer scored
    path = os.path.join(root, "adpo.py")
    text = open(path).read()
    open(path, "w").write(text.replace("    mask = targets != -1\n", "    mask = (targets != -1) & (targets != 1)\n"))
    train_in(root)
    after = mtimes(out)
    rewritten = sorted(n for n in after if after[n] != before.get(n))
    for name in POLICIES + EVALS + REPORT:
        assert name in rewritten
    for name in TOKENIZER + SFT + TRIPLETS:
        assert name not in rewritten


# ----------------------------------------------------------------------------------------------------------
# the walk on a small project of its own: every way Python reaches code


LIB = '''
import functools

import helpers as h
from helpers import CONST as C
from helpers import *

TABLE = [h.double, h.triple]
if True:
    def conditional():
        return 1


class Box:
    scale = 2

    def __init__(self, v):
        self.v = v

    @property
    def doubled(self):
        return self.v * self.scale

    def __add__(self, other):
        return Box(self.v + other.v)


counter = 0


def bump():
    global counter
    counter += 1
    return counter


def by_name(x):
    return getattr(h, "double")(x)


def by_table(i, x):
    return TABLE[i](x)


def via_alias(x):
    return h.triple(x) + C


def via_star(x):
    return star_fn(x)


def via_property(v):
    return Box(v).doubled


def via_operator(a, b):
    return (Box(a) + Box(b)).v


def via_conditional():
    return conditional()


def via_nested(x):
    def inner(y):
        return h.double(y)
    return inner(x)


def via_callback(x, f=h.triple):
    return f(x)


@functools.cache
def cached():
    return h.double(1)
'''

HELPERS = '''
CONST = 3


def double(x):
    return 2 * x


def triple(x):
    return 3 * x


def star_fn(x):
    return x


def unrelated():
    return 5
'''

WALKS = [  # root, file, old, new, whether the root's code changes
    ("by_name", "helpers", "return 2 * x", "return 2 * x + 0", True),
    ("by_name", "helpers", "return 5", "return 6", False),
    ("by_table", "helpers", "return 3 * x", "return 3 * x + 0", True),
    ("via_alias", "helpers", "CONST = 3", "CONST = 4", True),
    ("via_star", "helpers", "    return x\n", "    return -x\n", True),
    ("via_property", "lib", "    scale = 2", "    scale = 3", True),
    ("via_operator", "lib", "Box(self.v + other.v)", "Box(self.v - other.v)", True),
    ("via_conditional", "lib", "        return 1", "        return 2", True),
    ("via_nested", "helpers", "return 2 * x", "return 2 * x + 0", True),
    ("via_callback", "helpers", "return 3 * x", "return 3 * x + 0", True),
    ("cached", "helpers", "return 2 * x", "return 2 * x + 0", True),  # a root under functools.cache
    ("bump", "lib", "counter = 0", "counter = 1", True),
    ("bump", "lib", "    return counter\n", "    return counter  # a comment\n", False),
]


@pytest.fixture
def small_project(tmp_path, monkeypatch):
    (tmp_path / "lib.py").write_text(LIB)
    (tmp_path / "helpers.py").write_text(HELPERS)
    monkeypatch.setattr(codedeps, "ROOT", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    codedeps.module_file.cache_clear()
    for name in ("lib", "helpers"):
        sys.modules.pop(name, None)
    import lib
    yield lib
    for name in ("lib", "helpers"):
        sys.modules.pop(name, None)
    codedeps.module_file.cache_clear()


@pytest.mark.parametrize("root, module, old, new, changes", WALKS)
def test_the_walk_reaches_every_kind_of_reference(small_project, monkeypatch, root, module, old, new, changes):
    function = getattr(small_project, root)
    before = codedeps.code_of(function)
    plant(monkeypatch, codedeps.module_file(module), old, new)
    assert (codedeps.code_of(function) != before) == changes
