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

import numpy as np
import pytest
import torch

import adpo
import data
import train
from conftest import RUN, SOURCE_FOLDERS, copy_source, get_settings
from harness import artifacts, codedeps
from tools import stress, sweep

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

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
    s = get_settings(["--preset=tiny"])
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
    "distributed.micro_batches": ("harness.distributed", "    total = max(int((y != -1).sum()), 1)\n",
                                  "    total = max(int((y != -1).sum()), 2)\n", AFTER_SFT),
    # a method, reached through the class a cached function builds
    "evaluate.IndexedWords.__contains__": ("evaluate", "or any(entry == word for entry in self.always)",
                                           "or any(entry == word.lower() for entry in self.always)",
                                           EVALS + REPORT),
    # a function under functools.cache
    "evaluate.wordlist": ("evaluate", "    judge = Profanity()", "    judge = Profanity(['darn'])",
                          EVALS + REPORT),
    # a table of functions, read by the report only
    "reports.TRANSFORMS": ("harness.reports", 'TRANSFORMS = {"val_ppl": math.exp}',
                            'TRANSFORMS = {"val_ppl": lambda x: math.exp(x)}', REPORT),
    # a module constant used only as a default argument
    "reports.COMPARED_KEYS": ("harness.reports", 'COMPARED_KEYS = ["toxicity_adversarial", ',
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
    # the review of the layout change: no more than what the code computes (an edit stales no earlier step)
    "sample.as_replies": ("sample", "    if rows and isinstance(rows[0], str):",
                          "    if rows and isinstance(rows[0], (str,)):", AFTER_TRIPLETS),
    "reports.plot_curves": ("harness.reports", "figsize=(15, 4))", "figsize=(16, 4))",
                            POLICIES + ["eval_dpo.json", "eval_adpo.json"] + REPORT),
    "loop.Hooks.process_part": ("harness.loop", "        return distributed.split(items)",
                                "        return list(distributed.split(items))",
                                POLICIES + ["eval_dpo.json", "eval_adpo.json"] + REPORT),
    "loop.Hooks.mean_over_processes": ("harness.loop", "        return distributed.mean_over_processes(row)",
                                       "        return dict(distributed.mean_over_processes(row))",
                                       POLICIES + ["eval_dpo.json", "eval_adpo.json"] + REPORT),
    "distributed.world_size": ("harness.distributed", "    return dist.get_world_size() if dist.is_initialized() else 1\n",
                               "    return dist.get_world_size() if dist.is_initialized() else int(1)\n", AFTER_SFT),
    "OneProcess.micro_batches": ("train", "            yield x[piece], y[piece], int((y[piece] != -1).sum()) / total",
                                 "            yield x[piece], y[piece], float((y[piece] != -1).sum()) / total", []),
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


def test_a_helper_that_only_main_calls_counts_for_every_artifact(monkeypatch):
    """The review's case: main() hands a step what a helper of its own computed; an edit of the helper."""
    path = codedeps.module_file("train")
    real = codedeps.read_source
    helper = "\n\ndef subset(conversations):\n    return conversations[:{}]\n\n\ndef main(argv):"
    line = "    s, conversations, run = harness.start(argv, Settings(), PRESETS, CODE)\n"
    call = (line, line + "    conversations = subset(conversations)\n")

    def edited(n):
        return real(path).replace("\n\ndef main(argv):", helper.format(n)).replace(*call)
    monkeypatch.setattr(codedeps, "read_source", lambda p: edited(100) if p == path else real(p))
    before = fingerprints()
    monkeypatch.setattr(codedeps, "read_source", lambda p: edited(50) if p == path else real(p))
    after = fingerprints()
    assert sorted(n for n in before if before[n] != after[n]) == sorted(EVERYTHING)


def test_a_pretrained_folder_counts_by_content_not_path(tmp_path):
    """--init_from: the GPT-2 files' content is an input of the tokenizer (and so of everything)."""
    conversations = [data.Conversation("1", ["hi", "hello"], [False, False], "sft")]

    def tokenizer_fp(folder):
        s = get_settings(["--preset=tiny", f"--init_from={folder}"])
        return artifacts.fingerprints(s, conversations, ["dpo"], [s.seed], train.CODE)["tokenizer.json"]
    for folder in ("a", "b"):
        os.makedirs(tmp_path / folder)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (tmp_path / folder / name).write_text(name)
    same = tokenizer_fp(tmp_path / "a")
    assert tokenizer_fp(tmp_path / "b") == same  # a copy elsewhere
    (tmp_path / "b" / "model.safetensors").write_text("other weights")
    assert tokenizer_fp(tmp_path / "b") != same


def test_a_data_file_counts_by_content(monkeypatch, tmp_path):
    """provoked.txt, read by the evaluation: an edit of its content makes the evaluations stale."""
    before = fingerprints()
    path = os.path.join(codedeps.ROOT, "provoked.txt")
    real = open(path, "rb").read()
    shadow = tmp_path / "root"
    shadow.mkdir()
    for name in os.listdir(codedeps.ROOT):  # the same files, provoked.txt edited: ROOT pointed there
        if name.endswith(".py") or name in SOURCE_FOLDERS:
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
        assert stale_after(monkeypatch, "tests.test_staleness", old, old.replace("1.5", "2.5"), losses) == mine
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
                  "evaluate:EVASIONS", "adpo:token_logps", "file"):
        assert piece in reached
    assert not {"adpo:dpo_loss", "adpo:adpo_loss", "adpo:LOSSES"} & reached  # the losses count on their own
    report = {key.rsplit(":", 1)[0] for key in codedeps.reached(*train.CODE["report.json"],
                                                                *artifacts.OWN_CODE["report.json"])}
    assert {"harness.reports:TRANSFORMS", "harness.reports:COMPARED_KEYS", "evaluate:token_logratios"} <= report


def test_the_sweeps_cache_keys_hold_the_code_that_computes_them(monkeypatch):
    """A cached sweep point or stress run is computed again when the code that computes it changed: here the
    interval code (reports.summarize), which the grid's goal test reads, and the stress run's val_ppl."""
    def keys():
        return (sweep.sweep_code(sweep.main, sweep.grid_sweep, sweep.run_point, sweep.preference_inputs),
                sweep.sweep_code(stress.main, stress.stress_sweep, stress.stress_run, sweep.preference_inputs))
    grid_code, stress_code = keys()
    plant(monkeypatch, codedeps.module_file("harness.reports"), "def summarize(runs):\n",
          "def summarize(runs):\n    runs = list(runs)\n")
    assert keys()[0] != grid_code and keys()[1] == stress_code
    plant(monkeypatch, codedeps.module_file("evaluate"), "    return math.exp(-logps.sum() / tokens.sum())",
          "    return math.exp(-logps.sum() / tokens.sum() + 0)")
    assert keys()[1] != stress_code
    grid_code, stress_code = keys()  # the review's case: the human replies the stress runs are scored on
    plant(monkeypatch, codedeps.module_file("evaluate"), "def eval_sets(s, conversations, split=\"eval\"):\n",
          "def eval_sets(s, conversations, split=\"eval\"):\n    conversations = conversations[:100]\n")
    assert keys()[0] != grid_code and keys()[1] != stress_code
    grid_code, stress_code = keys()  # the review's case: what stress_sweep hands each run
    plant(monkeypatch, codedeps.module_file("tools.stress"), 'ps, loss, seed, enc, ref, sets["human"], sft_model,',
          'ps, loss, seed, enc, ref, sets["human"][:10], sft_model,')
    assert keys()[1] != stress_code
    grid_code, stress_code = keys()  # and what open_sweep hands them
    plant(monkeypatch, codedeps.module_file("tools.sweep"), 'sets = evaluate.eval_sets(s, conversations, "dev")',
          'sets = evaluate.eval_sets(s, conversations[:100], "dev")')
    assert keys()[0] != grid_code and keys()[1] != stress_code


# ----------------------------------------------------------------------------------------------------------
# end to end on the tiny preset


def copy_checkout(tmp_path, finished):
    """The project's files and a finished out_dir, copied elsewhere: another path, the same content."""
    root = tmp_path / "checkout"
    copy_source(root)
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

import torch

import helpers as h
from consts import *
from consts2 import *
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


METRICS = {}


def metric(f):
    METRICS[f.__name__] = f
    return f


@metric
def registered(x):
    return x + 1


def via_registry(x):
    return [fn(x) for fn in METRICS.values()]


def via_local_import(x):
    from helpers import triple
    return triple(x)


try:
    from helpers import double as _double
except ImportError:
    _double = None


def via_try_import(x):
    return _double(x)


def via_star_constant(x):
    return x * SCALE


def via_globals(x):
    return globals()["registered"](x)


def via_data_file():
    return open("assets/words.txt").read()


A = lambda x: x * 1.5; B = lambda x: x * 2.5  # noqa: E702, E731


def make(k):
    def scaled(x):
        return k * h.double(x)
    return scaled


class Scaled:
    def __init__(self, k):
        self.k = k

    def __call__(self, x):
        return self.k * h.triple(x)


class Old:
    def __init__(self):
        self.v = 1

    def _get(self):
        return self.v * 3

    value = property(_get)


def via_class_property():
    return Old().value


class Ops:
    def double(self, x):
        return 2 * x

    OPS = {"double": double}

    def run(self, name, x):
        return self.OPS[name](self, x)


def via_class_table(x):
    return Ops().run("double", x)


class Net(torch.nn.Module):
    def forward(self, x):
        return x - 7


NET = Net()


def via_module_instance(x):
    return NET(x)
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
    ("via_registry", "lib", "    return x + 1", "    return x + 2", True),  # filled by a decorator
    ("via_local_import", "helpers", "return 3 * x", "return 3 * x + 0", True),
    ("via_try_import", "helpers", "return 2 * x", "return 2 * x + 0", True),
    ("via_star_constant", "consts", "SCALE = 1.0", "SCALE = 2.0", True),
    ("via_globals", "lib", "    return x + 1", "    return x + 2", True),
    ("via_star_constant", "consts2", "SCALE = 5.0", "SCALE = 6.0", True),  # the last star import binds
    ("via_class_property", "lib", "return self.v * 3", "return self.v * 4", True),  # a method the body names
    ("via_class_table", "lib", "    def double(self, x):\n        return 2 * x",
     "    def double(self, x):\n        return 2 * x + 0", True),
    ("via_module_instance", "lib", "        return x - 7", "        return x - 8", True),
    ("A", "lib", "x * 1.5", "x * 1.25", True),  # two lambdas on one line
    ("B", "lib", "x * 1.5", "x * 1.25", False),
    ("bump", "lib", "counter = 0", "counter = 1", True),
    ("bump", "lib", "    return counter\n", "    return counter  # a comment\n", False),
]


@pytest.fixture
def small_project(tmp_path, monkeypatch):
    (tmp_path / "lib.py").write_text(LIB)
    (tmp_path / "helpers.py").write_text(HELPERS)
    (tmp_path / "consts.py").write_text("SCALE = 1.0\n")
    (tmp_path / "consts2.py").write_text("SCALE = 5.0\n")
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "words.txt").write_text("darn\n")
    monkeypatch.setattr(codedeps, "ROOT", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    codedeps.module_file.cache_clear()
    for name in ("lib", "helpers", "consts", "consts2"):
        sys.modules.pop(name, None)
    import lib
    yield lib
    for name in ("lib", "helpers", "consts", "consts2"):
        sys.modules.pop(name, None)
    codedeps.module_file.cache_clear()


@pytest.mark.parametrize("root, module, old, new, changes", WALKS)
def test_the_walk_reaches_every_kind_of_reference(small_project, monkeypatch, root, module, old, new, changes):
    function = getattr(small_project, root)
    before = codedeps.code_of(function)
    plant(monkeypatch, codedeps.module_file(module), old, new)
    assert (codedeps.code_of(function) != before) == changes


def test_values_a_function_was_made_with_count_and_never_by_address(small_project, tmp_path):
    """A loss made by a call (a closure, a callable instance, a partial): its arguments are part of its code;
    the text holds no memory address (it would differ in the next process: stale on every run)."""
    lib = small_project
    assert codedeps.code_of(lib.make(2.0)) == codedeps.code_of(lib.make(2.0)) != codedeps.code_of(lib.make(3.0))
    assert codedeps.code_of(lib.Scaled(2.0)) != codedeps.code_of(lib.Scaled(3.0))
    partial = functools.partial(lib.via_callback, f=lib.by_name)
    assert " at 0x" not in "".join(codedeps.code_of(partial))
    assert codedeps.plain({"s": {"beta", "alpha", "gamma"}}) == '[["s", ["alpha", "beta", "gamma"]]]'  # no hash order
    big = np.zeros(2000)
    bigger = big.copy()
    bigger[1000] = 1.0  # numpy prints a summary of a big array: its bytes count
    assert codedeps.code_of(functools.partial(lib.via_callback, f=big)) != \
        codedeps.code_of(functools.partial(lib.via_callback, f=bigger))
    assert codedeps.plain(torch.tensor([0.12341])) != codedeps.plain(torch.tensor([0.12344]))
    before = codedeps.code_of(lib.via_registry)  # a registry changed at run time: walked anew
    lib.METRICS["more"] = lib.via_alias
    assert codedeps.code_of(lib.via_registry) != before
    del lib.METRICS["more"]
    before = codedeps.code_of(lib.via_data_file)  # a data file in a folder of the project, by content
    (tmp_path / "assets" / "words.txt").write_text("heck\n")
    assert codedeps.code_of(lib.via_data_file) != before
