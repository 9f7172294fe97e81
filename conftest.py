"""Fixtures shared by the test files: a tiny GPT, a small tokenizer, a few encoded triplets, and the slow, obvious
log-prob that every fast scoring path is checked against."""

import contextlib
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch

import data
import model as model_module
import train
import harness
from harness import checks
from model import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))  # the repository root
SOURCE_FOLDERS = ("harness", "tools")  # the packages beside the top-level scripts


def copy_source(dest):
    """The project's code and data files (top-level .py and .txt, the packages) copied into folder dest."""
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(HERE):
        if name.endswith((".py", ".txt")):
            shutil.copy(os.path.join(HERE, name), os.path.join(dest, name))
    for folder in SOURCE_FOLDERS:
        shutil.copytree(os.path.join(HERE, folder), os.path.join(dest, folder),
                        ignore=shutil.ignore_patterns("__pycache__"))
# the tiny preset, short enough for a test, long enough that each stage saves resume states a kill can land between
RUN = ["--preset=tiny", "--sft_iters=40", "--pref_iters=12", "--checkpoint_interval=4"]


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """One uninterrupted `train.py *RUN` into its own out_dir: copy it (shutil.copytree) before changing it."""
    out_dir = str(tmp_path_factory.mktemp("finished"))
    result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *RUN, f"--out_dir={out_dir}"],
                            capture_output=True, text=True, cwd=HERE, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir


def cli(main, *argv):
    """`python script.py argv` whose main() is `main`, run in this process (no interpreter or PyTorch to start):
    its exit status and what it printed, as subprocess.run gives them. For the commands that stop early."""
    out, err = io.StringIO(), io.StringIO()
    saved, sys.argv = sys.argv, ["script.py", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            harness.run_main(main)
    except SystemExit as e:
        status = e.code
    finally:
        sys.argv = saved
    if isinstance(status, str):  # sys.exit("error: ..."): the interpreter prints it, exit status 1
        err.write(status + "\n")
        status = 1
    return subprocess.CompletedProcess(argv, status or 0, out.getvalue(), err.getvalue())


def get_settings(argv):
    """train.py's settings for a command line (the defaults, the preset's, argv's), checked."""
    return checks.get_settings(argv, train.Settings(), train.PRESETS)


def make_tiny_gpt(seed=0, vocab_size=64, block_size=48, dropout=0.0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32,
                         dropout=dropout)).eval()


@pytest.fixture(scope="session")
def tiny_gpt():
    """tiny_gpt(seed=0, vocab_size=64, block_size=48, dropout=0.0): a seeded 2-layer GPT in eval mode."""
    return make_tiny_gpt


@pytest.fixture(scope="module")
def tok():
    texts = ["hello there, how are you doing today?", "i am fine thanks", "what do you do for fun?",
             "i like to read books and play games", "that sounds great"] * 20
    return data.train_tokenizer(texts, vocab_size=300)


def triplet_record(tok, context, **replies):
    """A triplets.jsonl line as the triplets stage writes it; a reply given as (text, finished)."""
    t = {"context": context}
    for key, (text, finished) in replies.items():
        ids = data.encode(tok, text)
        t.update({key: text, f"{key}_ids": ids + [data.EOT_ID] if finished else ids, f"{key}_finished": finished})
    return t


@pytest.fixture
def tiny_triplets(tok):
    """(settings, encoded triplets): two triplets on tok, four times each, for a tiny_gpt of tok's vocabulary."""
    triplets = [triplet_record(tok, ["hello there, how are you doing today?"], chosen=("i am fine thanks", True),
                               rejected=("that sounds great", True), toxic=("what do you do for fun?", False)),
                triplet_record(tok, ["what do you do for fun?"], chosen=("i like to read books and play games", False),
                               rejected=("hello there", True), toxic=("i am fine", True))] * 4
    s = train.Settings(block_size=48, max_new_tokens=16, pref_batch_size=8, device="cpu")
    return s, data.encode_triplets(tok, triplets, s.block_size, s.max_new_tokens)


def generate_with_logits(model, *args, **kwargs):
    """model.generate(*args, **kwargs), and the (B, steps, vocab) logits each step sampled from."""
    seen = []
    real = model_module.sample_next

    def recording(logits, *a, **k):
        seen.append(logits.clone())
        return real(logits, *a, **k)
    model_module.sample_next = recording
    try:
        out = model.generate(*args, **kwargs)
    finally:
        model_module.sample_next = real
    return out, torch.stack(seen, dim=1)


def loop_logp(model, prompt, ids):
    """log p(ids | prompt), one full forward per token: the slow, obvious reference."""
    total = 0.0
    for i in range(len(ids)):
        logits, _ = model(torch.tensor([prompt + ids[:i]]))
        total += logits[0, -1].float().log_softmax(-1)[ids[i]].item()
    return total


@pytest.fixture(scope="session")
def token_loop_logp():
    """token_loop_logp(model, prompt, ids): log p(ids | prompt), one full forward per token."""
    return loop_logp
