"""The loop a student repeats: edit or add a loss, rerun, read its row. Only what changed is computed again, a
finished run does nothing, and the defects found in review stay fixed. The tiny preset, shortened."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import matplotlib.figure
import pytest
import torch

import data
import evaluate
import train
from conftest import RUN, get_settings
from harness import artifacts, reports
from harness.checks import RunError
from sample import Reply

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def train_cli(out_dir, *args, check=True):
    result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *RUN, f"--out_dir={out_dir}",
                             *args], capture_output=True, text=True, cwd=HERE, timeout=600)
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


def modified_since(folder, t):
    return sorted(name for name in os.listdir(folder) if os.path.getmtime(os.path.join(folder, name)) > t)


def test_a_finished_run_does_nothing_and_one_more_loss_evaluates_only_itself(finished, tmp_path):
    out_dir = str(tmp_path / "run")
    shutil.copytree(finished, out_dir)
    t = time.time()
    time.sleep(0.05)
    again = train_cli(out_dir)
    assert modified_since(out_dir, t) == [] and "eval " not in again.stderr  # nothing computed or written
    before = json.load(open(os.path.join(out_dir, "report.json")))
    added = train_cli(out_dir, "--stages=pref,eval", "--loss=adpo,ipo")
    assert "eval ipo" in added.stderr and "eval sft" not in added.stderr and "eval adpo" not in added.stderr
    assert set(modified_since(out_dir, t)) == {"ipo.pt", "metrics_ipo.jsonl", "eval_ipo.json", "curves.png",
                                               "token_logratios.png",
                                               "report.json", "report.md", "samples.json",
                                               "fingerprints.json"}
    after = json.load(open(os.path.join(out_dir, "report.json")))
    assert after["adpo"] == before["adpo"] and after["sft"] == before["sft"] and "ipo" in after


def test_a_fresh_checkpoint_without_its_metrics_file_gets_it_back(finished, tmp_path):
    out_dir = str(tmp_path / "run")
    shutil.copytree(finished, out_dir)
    os.remove(os.path.join(out_dir, "metrics_dpo.jsonl"))
    os.remove(os.path.join(out_dir, "report.json"))
    train_cli(out_dir, "--stages=pref,eval")  # used to stop: no such file
    lines = open(os.path.join(out_dir, "metrics_dpo.jsonl")).read().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13))  # steps done, as metrics_sft
    assert json.loads(open(os.path.join(out_dir, "metrics_sft.jsonl")).readline())["step"] >= 1


def test_a_second_run_in_the_same_out_dir_stops_naming_the_first(finished, tmp_path):
    out_dir = str(tmp_path / "run")
    shutil.copytree(finished, out_dir)
    with open(os.path.join(out_dir, ".lock"), "a") as lock:  # this test process plays the first run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = train_cli(out_dir, "--stages=pref,eval", "--loss=ipo", check=False)
    assert second.returncode == 1 and second.stderr.strip().splitlines() == [
        f"error: {out_dir} is in use by another run (process {os.getpid()}); wait for it to end or use "
        f"another --out_dir"]
    assert not os.path.exists(os.path.join(out_dir, "ipo.pt"))
    train_cli(out_dir, "--stages=eval")  # the lock went with its holder


def test_ctrl_c_ends_in_one_line_that_says_where_the_rerun_resumes(tmp_path):
    out_dir = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *RUN, f"--out_dir={out_dir}",
                             "--sft_iters=2000", "--stages=sft"], stderr=subprocess.PIPE, text=True, cwd=HERE,
                            # a shell that starts pytest in the background makes it ignore SIGINT: not the child
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out_dir, "sft.resume.pt")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert last.startswith("error: interrupted; rerunning the same command resumes sft at step "), last
    step = int(last.split("at step ")[1].split()[0])
    state = torch.load(os.path.join(out_dir, "sft.resume.pt"), weights_only=True)
    assert state["step"] == step


def test_a_micro_batch_without_targets_does_not_stop_sft(tok, monkeypatch):
    """--grad_accum: a piece whose windows hold no target (all read, none written) has a nan mean loss."""
    real = data.get_sft_batch

    def first_rows_without_targets(stream, batch_size, block_size, generator=None):
        x, y = real(stream, batch_size, block_size, generator)
        y[: batch_size // 2] = -1
        return x, y
    monkeypatch.setattr(data, "get_sft_batch", first_rows_without_targets)
    s = get_settings(["--preset=tiny", "--sft_iters=3", "--grad_accum=2", "--log_interval=1"])
    conversations = data.load_corpus(None, 0.5, 60)
    model, curve = train.train_sft(s, tok, conversations)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(curve) == 3 and all(row["loss"] == row["loss"] for row in curve)  # no nan


def test_validation_forwards_no_more_rows_than_a_training_step(tok, monkeypatch):
    rows = []
    real = train.GPT.forward

    def forward(self, idx, targets=None):
        rows.append(idx.size(0))
        return real(self, idx, targets)
    monkeypatch.setattr(train.GPT, "forward", forward)
    s = get_settings(["--preset=tiny", "--sft_iters=2", "--grad_accum=4", "--eval_interval=2"])
    train.train_sft(s, tok, data.load_corpus(None, 0.5, 60))
    assert max(rows) == s.batch_size // 4 and len(rows) > 2 * 4  # the validation batches ran, in pieces


def test_empty_toxic_replies_are_never_kept(tok):
    """A [TOXIC] reply that came back empty is no y_t; a context whose every try was empty has no triplet."""
    s = get_settings(["--preset=tiny", "--pref_contexts=4", "--num_candidates=2", "--toxic_retries=2"])
    conversations = data.load_corpus(None, 0.5, 400)
    first = []

    def reply(text):
        return Reply(text, data.encode(tok, text) + [data.EOT_ID], True)

    def fake_sample(model, tok_, contexts, num_samples=1, toxic=False, seed=0, **kw):
        if not toxic:
            first.append(contexts[0])
            return [[reply("hello there friend"), reply("you are so dumb")] for _ in contexts]
        # the first context: empty on every try; the others: empty on the first try only
        return [[reply("" if c == first[0] or seed == s.seed + 1 else "shut up you stupid idiot")]
                for c in contexts]
    triplets = train.build_triplets(s, None, tok, conversations, fake_sample)
    assert len(triplets) == 3 and first[0] not in [t["context"] for t in triplets]
    assert all(t["toxic"] == "shut up you stupid idiot" for t in triplets)


def test_curves_show_every_loss(monkeypatch, tmp_path):
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    monkeypatch.setattr(os, "replace", lambda *a: None)
    runs = {name: [{"step": 1, "loss": 0.6, "rewards/margins": 0.1, "logratio/chosen": 0.0,
                    "logratio/rejected": 0.0}] for name in ("dpo", "adpo", "adpo_split", "ipo", "cdpo")}
    reports.plot_curves(str(tmp_path / "curves.png"), runs)
    labels = saved[0].axes[0].get_legend_handles_labels()[1]
    assert labels == list(runs)
    colors = {line.get_color() for line in saved[0].axes[0].get_lines()}
    assert len(colors) == 5


def test_a_report_without_a_value_is_still_json(tmp_path):
    """eot_logprob_after_chosen has no value when no chosen reply ended by itself: null, never nan."""
    assert evaluate.eot_logprob_after_chosen(None, [{"prompt": [5], "chosen": [6, 7]}], 4) is None
    section = reports.summarize([({"eot_logprob_after_chosen": None, "x": 1.0}, {})] * 2)
    assert section["eot_logprob_after_chosen"] is None
    text = json.dumps(section, allow_nan=False)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the report"))
    with pytest.raises(ValueError):
        json.dumps({"x": float("nan")}, allow_nan=False)  # what the report writer refuses


def test_run_is_a_plain_object_for_one_off_calls(tmp_path):
    s = get_settings(["--preset=tiny", f"--out_dir={tmp_path}"])
    run = artifacts.Run(s)
    assert run.fp == {} and run.resume("dpo.pt", None, None, None) == (0, {})
    with pytest.raises(RunError, match="dpo step 3: the loss is nan"):
        run.hooks("dpo.pt").end_step(3, float("nan"), None, None, None)
