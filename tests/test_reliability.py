"""Interrupted, changed, bad or hostile inputs (artifacts.py): resume after kill -9, stale artifacts, safe
loading, one-line errors. About a minute on 2 CPU cores: every run is the tiny preset, shortened."""

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import harness
import sample
import train
from conftest import RUN, get_settings
from harness import artifacts, checks
from harness.artifacts import Run
from tools import chat, sweep

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def start_train(out_dir, *args):
    """train.py in the background, its output in a file (a pipe nobody reads would block it when full)."""
    log = open(f"{out_dir}.log", "a+")
    return subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *RUN, f"--out_dir={out_dir}", *args],
                            stdout=log, stderr=subprocess.STDOUT, text=True, cwd=HERE)


def output(out_dir):
    with open(f"{out_dir}.log") as f:
        return f.read()


def run_train(out_dir, *args):
    assert start_train(out_dir, *args).wait(timeout=600) == 0, output(out_dir)[-3000:]


def kill_when(proc, path):
    """SIGKILL proc as soon as path (a glob pattern) exists: no handler runs, whatever it was writing stays
    half-written."""
    deadline = time.time() + 300
    while not glob.glob(path):
        assert proc.poll() is None and time.time() < deadline, f"no {path} before the run ended"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def comparable(out_dir):
    """report.json without what may differ between two runs of one command: timings and out_dir."""
    with open(os.path.join(out_dir, "report.json")) as f:
        report = json.load(f)
    del report["wall_time_s"], report["stage_seconds"], report["settings"]["out_dir"]
    return report


def snapshot(folder):
    """Every file in folder with a hash of its content."""
    result = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                result[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return result


def cli_error(main, argv, monkeypatch):
    """What a user sees: the message and exit code of `python script.py argv`, run in this process."""
    monkeypatch.setattr(sys, "argv", ["script.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        harness.run_main(main)
    return str(exit_info.value.code)


def copy_of(finished, tmp_path):
    out_dir = str(tmp_path / "run")
    shutil.copytree(finished, out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------------
# resume


def test_kill_in_every_stage_then_rerun_gives_the_same_report(finished, tmp_path):
    out_dir = str(tmp_path / "killed")
    kill_when(start_train(out_dir), os.path.join(out_dir, "sft.resume.pt"))
    assert not os.path.exists(os.path.join(out_dir, "sft.pt"))  # killed during SFT
    state = torch.load(os.path.join(out_dir, "sft.resume.pt"), weights_only=True)  # loads safely, like all ours
    assert {"model", "optimizer", "step", "rng", "fingerprint"} <= set(state)
    # then while sampling the triplets, during DPO, during the evaluation
    for marker, unfinished in ((os.path.join("triplets.chunks", "*.json"), "triplets.jsonl"), ("dpo.resume.pt", "adpo.pt"),
                               ("eval_sft_control.json", "report.json")):
        kill_when(start_train(out_dir), os.path.join(out_dir, marker))
        assert not os.path.exists(os.path.join(out_dir, unfinished))
    start = len(output(out_dir))
    run_train(out_dir)
    for resumed in ("sft.resume.pt: resumed at step", "triplets.chunks: resumed after 1",
                    "dpo.resume.pt: resumed at step"):
        assert resumed in output(out_dir)
    assert "eval sft: adversarial" not in output(out_dir)[start:]  # the SFT model's evaluation was kept
    assert comparable(out_dir) == comparable(finished)
    assert not [name for name in os.listdir(out_dir) if "resume" in name]  # removed once their stage is done


def test_sampling_chunks_are_computed_once_per_fingerprint(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"logps": np.array([-1.5, -0.25]), "reply": ["hi", [5, 1], True]}

    s = get_settings(["--preset=tiny", f"--out_dir={tmp_path}"])

    def run(fingerprint):  # a command whose report.json has this fingerprint
        r = Run(s)
        r.fp["report.json"] = fingerprint
        return r
    first = run("a").once("report.json", "model 1", compute)
    again = run("a").once("report.json", "model 1", compute)  # the rerun after a kill: read back, not sampled
    other = run("b").once("report.json", "model 1", compute)  # other settings: sampled anew
    assert len(calls) == 2 and first == again == other == {"logps": [-1.5, -0.25], "reply": ["hi", [5, 1], True]}
    assert sample.as_replies([[["hi", [5, 1], True]]]) == [[sample.Reply("hi", [5, 1], True)]]


def test_rerun_of_a_finished_command_skips_every_trained_stage(finished, tmp_path):
    out_dir = copy_of(finished, tmp_path)
    before = snapshot(out_dir)
    run_train(out_dir, "--stages=sft,triplets")
    assert snapshot(out_dir) == before and "sft: " not in output(out_dir)


def test_non_finite_loss_stops_with_one_line_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    out_dir = str(tmp_path / "nan")
    message = cli_error(train.main, [*RUN, f"--out_dir={out_dir}", "--learning_rate=1e30", "--warmup_iters=0",
                                     "--checkpoint_interval=1", "--stages=sft"], monkeypatch)
    assert message.startswith("error: sft step ") and "the loss is nan" in message and "\n" not in message
    assert not os.path.exists(os.path.join(out_dir, "sft.pt"))
    state = checks.read_checkpoint(os.path.join(out_dir, "sft.resume.pt"))
    assert all(torch.isfinite(w).all() for w in state["model"].values())  # the last good one


# ----------------------------------------------------------------------------------------------------------
# stale artifacts


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """A corpus of the tiny preset's size, other than the built-in one."""
    path = str(tmp_path_factory.mktemp("data") / "other.jsonl")
    conversations = data.load_corpus(None, 0.5, 300)
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": c.id, "turns": c.turns, "toxic": c.toxic}) + "\n" for c in conversations)
    return path


def test_other_data_retrains_the_tokenizer_and_makes_later_stages_stale(finished, other_data, tmp_path,
                                                                       monkeypatch):
    """--data=other.jsonl --stages=sft: the old triplets, dpo.pt and adpo.pt now come from another model."""
    out_dir = copy_of(finished, tmp_path)
    before, fingerprints = snapshot(out_dir), artifacts.recorded(out_dir)
    run_train(out_dir, f"--data={other_data}", "--stages=sft")
    for name in ("tokenizer.json", "sft.pt"):
        assert snapshot(out_dir)[name] != before[name] and artifacts.recorded(out_dir)[name] != fingerprints[name]
    for stages in ("pref,eval", "eval"):
        message = cli_error(train.main, [*RUN, f"--out_dir={out_dir}", f"--data={other_data}", f"--stages={stages}"],
                            monkeypatch)
        assert f"{os.path.join(out_dir, 'triplets.jsonl')} is stale" in message, message
    os.remove(os.path.join(out_dir, "triplets.jsonl"))
    message = cli_error(train.main, [*RUN, f"--out_dir={out_dir}", f"--data={other_data}", "--stages=eval"],
                        monkeypatch)
    assert f"{os.path.join(out_dir, 'dpo.pt')} is stale" in message and message.endswith("--stages=pref,eval")


@pytest.mark.parametrize("args, stale, rebuild", [
    (["--data=OTHER", "--stages=pref,eval"], "sft.pt", "--stages=sft,triplets,pref,eval"),
    (["--beta=0.2", "--stages=eval"], "dpo.pt", "--stages=pref,eval"),  # eval never evaluates a stale policy
    (["--min_judge_gap=0.01", "--stages=eval"], "dpo.pt", "--stages=pref,eval"),
])
def test_stale_artifact_outside_stages_stops_naming_it_and_the_rebuild(finished, other_data, tmp_path,
                                                                        monkeypatch, args, stale, rebuild):
    out_dir = copy_of(finished, tmp_path)
    args = [a.replace("OTHER", other_data) for a in args]
    before = snapshot(out_dir)
    message = cli_error(train.main, [*RUN, f"--out_dir={out_dir}", *args], monkeypatch)
    assert f"{os.path.join(out_dir, stale)} is stale" in message and message.endswith(rebuild)
    assert "\n" not in message and snapshot(out_dir) == before


def test_sweep_refuses_a_stale_sft_model(finished, other_data, tmp_path, monkeypatch):
    out_dir = copy_of(finished, tmp_path)
    before = snapshot(out_dir)
    message = cli_error(sweep.main, ["--preset=tiny", f"--out_dir={out_dir}", f"--data={other_data}"], monkeypatch)
    assert f"{os.path.join(out_dir, 'sft.pt')} is stale" in message and snapshot(out_dir) == before


def test_every_seed_checkpoint_is_checked_before_evaluation(finished, tmp_path, monkeypatch):
    out_dir = copy_of(finished, tmp_path)
    for loss in ("dpo", "adpo"):  # the second seed's files, but not trained with its seed
        shutil.copy(os.path.join(out_dir, f"{loss}.pt"), os.path.join(out_dir, f"{loss}_seed1338.pt"))
    before = snapshot(out_dir)
    message = cli_error(train.main, [*RUN, f"--out_dir={out_dir}", "--seeds=2", "--stages=eval"], monkeypatch)
    assert f"{os.path.join(out_dir, 'dpo_seed1338.pt')} is stale" in message and snapshot(out_dir) == before
    for loss in ("dpo", "adpo"):  # and none at all for the second seed
        os.remove(os.path.join(out_dir, f"{loss}_seed1338.pt"))
    before = snapshot(out_dir)
    message = cli_error(train.main, [*RUN, f"--out_dir={out_dir}", "--seeds=2", "--stages=eval"], monkeypatch)
    assert message.startswith(f"error: no checkpoint at {os.path.join(out_dir, 'dpo_seed1338.pt')}")
    assert snapshot(out_dir) == before  # stopped before the evaluation started


def test_every_setting_is_fingerprinted_or_declared_harmless():
    """A setting added to train.py must say which artifacts it changes, or a stale file would pass as fresh."""
    tracked = {k for keys in artifacts.DEPENDS_ON.values() for k in keys} | set(artifacts.CHANGE_NO_ARTIFACT)
    assert set(train.Settings.__dataclass_fields__) == tracked


# ----------------------------------------------------------------------------------------------------------
# safe loading and one-line errors


class RunsCodeWhenUnpickled:
    """A full pickle.load calls open(marker, "w"): the file appearing would prove code from a checkpoint ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_checkpoint_with_a_pickled_callable_is_refused_and_never_called(finished, tmp_path):
    marker, path = str(tmp_path / "ran"), str(tmp_path / "shared.pt")
    ckpt = torch.load(os.path.join(finished, "sft.pt"), weights_only=True)
    torch.save({**ckpt, "extra": RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(checks.RunError, match="refused"):
        checks.load_checkpoint(path)
    result = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), f"--checkpoint={path}"],
                            capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 1 and result.stderr.startswith(f"error: {path}: refused")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(marker)


def test_every_checkpoint_the_project_writes_loads_with_weights_only(finished):
    for name in ("sft.pt", "dpo.pt", "adpo.pt"):  # the resume states: see the kill test
        torch.load(os.path.join(finished, name), weights_only=True)


def test_a_full_disk_stops_with_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "report.json")
    artifacts.write_text(path, "the old report\n")
    real_open = open

    class FullDisk:  # a file that takes 4 bytes, then fails as a write on a full disk does
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            self.file.write(text[:4])
            raise OSError(28, "No space left on device", self.file.name)

    monkeypatch.setattr(artifacts, "open", FullDisk, raising=False)  # artifacts' open, nobody else's
    message = cli_error(lambda argv: artifacts.write_text(path, "the new report\n"), [], monkeypatch)
    assert message == f"error: {path}.tmp: No space left on device"
    with real_open(path) as f:
        assert f.read() == "the old report\n"  # the half-written file never replaced it


def broken_files(finished, folder):
    """Checkpoints a user may pass: cut short, random bytes, not ours, and a run whose sft.pt is cut short."""
    with open(os.path.join(finished, "sft.pt"), "rb") as f:
        whole = f.read()
    paths = {name: os.path.join(folder, name) for name in ("truncated.pt", "noise.pt", "foreign.pt", "run")}
    with open(paths["truncated.pt"], "wb") as f:
        f.write(whole[:len(whole) // 2])
    with open(paths["noise.pt"], "wb") as f:
        f.write(os.urandom(4096))
    torch.save({"weights": torch.zeros(2)}, paths["foreign.pt"])
    shutil.copytree(finished, paths["run"])
    shutil.copy(paths["truncated.pt"], os.path.join(paths["run"], "sft.pt"))
    with open(os.path.join(folder, "bad.jsonl"), "w") as f:
        f.write('{"turns": ["hi", "hello"]}\n{"turns": [1, 2]}\n')
    with open(os.path.join(folder, "a_file"), "w") as f:
        f.write("not a folder")
    return paths


BAD_TRAIN = [  # (arguments, the start of what the one line says); {d}: the test's folder
    (["--learning_rate=-1"], "--learning_rate must be positive"),
    (["--pref_lr=nan"], "--pref_lr must be a finite number"),
    (["--eval_interval=0"], "--eval_interval must be at least 1"),
    (["--top_k=0"], "--top_k must be at least 1"),
    (["--temperature=-1"], "--temperature must be positive"),
    (["--context_turns=0"], "--context_turns must be at least 1"),
    (["--sample_batch_size=0"], "--sample_batch_size must be at least 1"),
    (["--ppl_replies=0"], "--ppl_replies must be at least 1"),
    (["--eval_iters=0"], "--eval_iters must be at least 1"),
    (["--vocab_size=100"], "--vocab_size must be at least 260"),
    (["--stages=,"], "--stages must be a list of stages"),
    (["--data={d}/missing.jsonl"], "{d}/missing.jsonl: no such data file"),
    (["--data={d}/bad.jsonl"], "{d}/bad.jsonl:2:"),
    (["--max_conversations=5"], "the pref split has no context with a reply"),  # not found after SFT
    (["--out_dir={d}/a_file/run"], "cannot write to --out_dir={d}/a_file/run"),
    (["--out_dir={d}/run", "--stages=triplets"], "{d}/run/sft.pt: not a readable checkpoint"),
]
BAD_SAMPLE = [
    (["--prompt="], "--prompt must be some text"),
    (["--prompt= | "], "--prompt must be some text"),
    (["--top_k=0"], "--top_k must be at least 1"),
    (["--temperature=-1"], "--temperature must be at least 0"),
    (["--top_p=0"], "--top_p must be in (0, 1]"),
    (["--num_samples=0"], "--num_samples must be at least 1"),
    (["--max_new_tokens=1000"], "--max_new_tokens=1000 leaves no room for a context in the block"),
    (["--checkpoint={d}/truncated.pt"], "{d}/truncated.pt: not a readable checkpoint"),
    (["--checkpoint={d}/noise.pt"], "{d}/noise.pt: not a readable checkpoint"),
    (["--checkpoint={d}/foreign.pt"], "{d}/foreign.pt: not a checkpoint written by train.py"),
    (["--checkpoint={d}/missing.pt"], "no checkpoint at {d}/missing.pt"),
]


def test_bad_inputs_stop_with_one_line_and_change_nothing(finished, tmp_path, monkeypatch):
    folder = str(tmp_path)
    broken_files(finished, folder)
    before = snapshot(folder)
    cases = [(train.main, [*RUN, f"--out_dir={folder}/run", *args], expected) for args, expected in BAD_TRAIN]
    cases += [(chat.main, [f"--checkpoint={finished}/sft.pt", *args], expected) for args, expected in BAD_SAMPLE]
    for main, argv, expected in cases:
        argv = [a.replace("{d}", folder) for a in argv]
        message = cli_error(main, argv, monkeypatch)
        assert message.startswith("error: " + expected.replace("{d}", folder)), (argv, message)
        assert "\n" not in message, argv
        assert snapshot(folder) == before, argv
    # the same, as a user runs it: exit code 1, one line on stderr, no traceback
    result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--preset=tiny", "--learning_rate=-1",
                             f"--out_dir={folder}/run"], capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: --learning_rate must be positive, got -1.0"]


# ----------------------------------------------------------------------------------------------------------
# a checkpoint carries its tokenizer


def sample_cli(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), "--prompt=i hate mondays",
                           "--num_samples=3", "--max_new_tokens=8", *args], capture_output=True, text=True, cwd=HERE)


def test_a_copied_checkpoint_decodes_with_its_own_tokenizer(other_data, tmp_path):
    """The new user's case: sft.pt copied away (alone), out_dir retrained on other data with the same
    vocabulary size; the copy must still decode with the tokenizer it was trained with."""
    out_dir = str(tmp_path / "out")
    run_train(out_dir, "--stages=sft", "--sft_iters=2")  # trained here: its settings name this out_dir
    saved = tmp_path / "saved"
    saved.mkdir()
    shutil.copy(os.path.join(out_dir, "sft.pt"), saved / "sft.pt")  # no tokenizer.json beside it
    before = sample_cli(f"--checkpoint={out_dir}/sft.pt")
    tokenizer = snapshot(out_dir)["tokenizer.json"]
    run_train(out_dir, f"--data={other_data}", "--stages=sft", "--sft_iters=2")
    assert snapshot(out_dir)["tokenizer.json"] != tokenizer  # out_dir's tokenizer is another one now
    after = sample_cli(f"--checkpoint={saved}/sft.pt")
    assert before.returncode == after.returncode == 0, after.stderr
    assert after.stdout == before.stdout and after.stdout.count("  > ") == 3


def test_a_checkpoint_without_its_tokenizer_is_one_line(finished, tmp_path):
    ckpt = torch.load(os.path.join(finished, "sft.pt"), weights_only=True)
    del ckpt["tokenizer_json"]
    path = str(tmp_path / "old.pt")
    torch.save(ckpt, path)
    result = sample_cli(f"--checkpoint={path}")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {path}: not a checkpoint written by train.py (no 'tokenizer_json')")

