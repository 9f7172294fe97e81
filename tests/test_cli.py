"""The command line around the method: settings that switch a part of ADPO off (gamma 0, toxic_copies 0), and
a reader of stdout that stops early (`python sample.py | head -1`). A few seconds on 2 CPU cores: the
checkpoint is a tiny untrained GPT, saved as train.py saves it."""

import os
import re
import subprocess
import sys

import pytest
import torch

import data
import train
from conftest import get_settings
from harness.artifacts import Run
from harness.configurator import ConfigError
from model import GPT, GPTConfig

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
# stdout buffered, as a user's is (PYTHONUNBUFFERED would make every print a write of its own)
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------------------------------
# settings at the edge of their rules


def test_gamma_and_toxic_copies_may_be_zero_not_negative():
    """gamma 0: ADPO is DPO (EXERCISES.md 3); toxic_copies 0: SFT without the control token (exercise 7)."""
    s = get_settings(["--preset=tiny", "--gamma=0", "--toxic_copies=0"])
    assert s.gamma == 0 and s.toxic_copies == 0
    for arg, message in (("--gamma=-0.1", "--gamma must be at least 0, got -0.1"),
                         ("--toxic_copies=-1", "--toxic_copies must be at least 0, got -1")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            get_settings(["--preset=tiny", arg])


def test_no_toxic_copies_is_sft_without_the_control_token():
    """toxic_copies=0 leaves the conversation itself, toxic turns read, never written, and no [TOXIC]."""
    tok = data.train_tokenizer(["hello there", "shut up idiot", "that sounds great"] * 10, vocab_size=300)
    turns, toxic = ["hello there", "shut up idiot", "that sounds great"], [False, True, False]
    ids, targets = data.sft_stream(tok, [data.Conversation("0", turns, toxic, "sft")], toxic_copies=0)
    hello, shut, great = (data.encode(tok, t) + [data.EOT_ID] for t in turns)
    assert ids.tolist() == [data.ENDOFTEXT_ID] + hello + shut + great
    assert targets.tolist() == [-1] + hello + [-1] * len(shut) + great


# ----------------------------------------------------------------------------------------------------------
# a reader that stops early


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """sft.pt: an untrained GPT with a tokenizer, made in a second."""
    out_dir = str(tmp_path_factory.mktemp("ckpt"))
    texts = ["hello there, how are you doing today?", "i am fine thanks", "you idiot", "that sounds great"]
    tok = data.train_tokenizer(texts * 20, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=300, n_layer=1, n_head=2, n_embd=16))
    Run(train.Settings(out_dir=out_dir)).save_checkpoint("sft.pt", model, tok)
    return os.path.join(out_dir, "sft.pt")


def test_sample_piped_into_a_reader_that_stops_ends_quietly(checkpoint):
    """`python sample.py ... | head -1`: about 170 kB of replies, more than a pipe holds, so a write fails
    after the reader has gone. No message, and exit code 141 (128 + SIGPIPE) says it happened."""
    args = [sys.executable, os.path.join(HERE, "sample.py"), f"--checkpoint={checkpoint}", "--prompt=hi",
            "--num_samples=2000", "--max_new_tokens=40"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                            env=ENV)
    assert proc.stdout.readline() == "context: hi\n"
    proc.stdout.close()  # the reader stops, as head -1 does
    _, stderr = proc.communicate(timeout=120)
    assert stderr == "" and proc.returncode == 141


def test_a_reader_gone_before_the_last_flush_ends_quietly():
    """Output small enough to sit in stdout's buffer until the end: the failed write is the last flush."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the script starts
    code = "import harness; harness.run_main(lambda argv: print('one line'))"
    result = subprocess.run([sys.executable, "-c", code], stdout=write_end, stderr=subprocess.PIPE, text=True,
                            cwd=HERE, env=ENV, timeout=120)
    os.close(write_end)
    assert result.stderr == "" and result.returncode == 141
