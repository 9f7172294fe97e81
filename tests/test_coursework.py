"""Tests of the coursework tools: the loss checker (adpo.py --check), sample.py --compare and --chat.
A few seconds on 2 CPU cores: the checkpoints are tiny untrained GPTs, saved as train.py saves them."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import adpo
import data
import train
from harness.artifacts import Run
from harness.checks import load_checkpoint
from model import GPT, GPTConfig
from sample import sample_replies
from tools import check_loss
from tools.chat import fit_history, shown

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def run_script(script, *args, stdin=None, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True, text=True,
                          cwd=HERE, input=stdin, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def failed(results):
    return [prop for status, prop, _ in results if status == "FAIL"]


# ----------------------------------------------------------------------------------------------------------
# the loss checker


@pytest.mark.parametrize("name", list(adpo.LOSSES))
def test_checker_passes_every_shipped_loss(name):
    results = check_loss.check_loss(name)
    assert not failed(results), results
    assert sum(status == "PASS" for status, _, _ in results) >= 6


def test_checker_cli_exit_codes():
    ok = run_script("adpo.py", "--check=adpo")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("PASS") == 8 and "FAIL" not in ok.stdout
    for args in (["--check=kto"], ["--chek=adpo"]):  # the tool itself, as `python -m tools.check_loss`
        bad = subprocess.run([sys.executable, "-m", "tools.check_loss", *args], capture_output=True, text=True,
                             cwd=HERE, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert bad.returncode == 2 and bad.stdout == ""
        assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


def dpo_flipped(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """-log sigmoid( -beta (h_w - h_l) ): prefers the rejected reply."""
    return adpo.dpo_loss(policy_rejected_logps, policy_chosen_logps, ref_rejected_logps, ref_chosen_logps, beta)


def adpo_toxic_flipped(policy_chosen_logps, policy_rejected_logps, policy_toxic_logps, ref_chosen_logps,
                       ref_rejected_logps, toxic_model_toxic_logps, beta=0.1, gamma=0.1):
    """-log sigmoid( beta (h_w - h_l) + gamma h_t ): rewards the toxic reply."""
    h_w = policy_chosen_logps - ref_chosen_logps
    h_l = policy_rejected_logps - ref_rejected_logps
    h_t = policy_toxic_logps - toxic_model_toxic_logps
    return -F.logsigmoid(beta * (h_w - h_l) + gamma * h_t)


def dpo_mean(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """A batch mean where per-example losses are expected."""
    return adpo.dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                         beta).mean()


def dpo_naive(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """log(sigmoid(z)) instead of logsigmoid(z): sigmoid(-1000) is 0 in float32, log 0 = -inf, grad NaN."""
    margin = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    return -torch.log(torch.sigmoid(margin))


@pytest.mark.parametrize("name, loss, failing", [
    ("dpo", dpo_flipped, ["raises the chosen reply", "lowers the rejected reply", "raises the margin"]),
    ("adpo", adpo_toxic_flipped, ["lowers the toxic reply"]),
    ("dpo", dpo_mean, ["shape (B,)"]),
    ("dpo", dpo_naive, ["finite values and gradients"]),
    ("new", dpo_naive, ["finite values and gradients"]),  # a name of the student's own
])
def test_checker_fails_a_broken_loss_and_names_the_property(monkeypatch, capsys, name, loss, failing):
    monkeypatch.setitem(adpo.LOSSES, name, loss)  # a student's wrong version of a shipped loss
    assert check_loss.main([f"--check={name}"]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.strip().startswith("FAIL")]
    assert len(fails) == len(failing), out  # exactly the broken properties, not every check
    for prop, line in zip(failing, fails):
        assert prop in line, out
    if loss is dpo_naive:
        assert "values not finite" in fails[0] and "gradients not finite" in fails[0]


def test_checker_takes_a_students_new_loss(monkeypatch):
    """The README's toxic-only loss, not in the expected-value tables: its value at pi = ref must still be
    one number for every example; a loss that reads the log-probs instead of the log-ratios fails there."""
    def toxic_only(policy_chosen_logps, policy_toxic_logps, ref_chosen_logps, toxic_model_toxic_logps,
                   beta=0.1, gamma=0.1):
        h_w = policy_chosen_logps - ref_chosen_logps
        h_t = policy_toxic_logps - toxic_model_toxic_logps
        return -F.logsigmoid(beta * h_w - gamma * h_t)

    def no_reference(policy_chosen_logps, policy_rejected_logps, beta=0.1):
        return -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps))

    monkeypatch.setitem(adpo.LOSSES, "toxic_only", toxic_only)
    monkeypatch.setitem(adpo.LOSSES, "no_reference", no_reference)
    results = check_loss.check_loss("toxic_only")
    skipped = [prop for status, prop, _ in results if status == "SKIP"]
    assert not failed(results) and len(skipped) == 2  # no rejected reply; gamma = 0 is not its definition
    assert "rejected" in skipped[0] and "gamma = 0" in skipped[1]
    assert failed(check_loss.check_loss("no_reference")) == [
        "value when the policy equals the reference (every h = 0): one value for every example"]


# ----------------------------------------------------------------------------------------------------------
# sample.py --compare and --chat on tiny checkpoints


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """sft.pt, dpo.pt (the same weights as sft.pt) and adpo.pt (other weights), untrained, with a tokenizer."""
    out_dir = str(tmp_path_factory.mktemp("ckpts"))
    texts = ["hello there, how are you doing today?", "i am fine thanks", "you idiot", "that sounds great"] * 20
    tok = data.train_tokenizer(texts, vocab_size=300)
    s = train.Settings(out_dir=out_dir)
    for name, seed in (("sft", 0), ("dpo", 0), ("adpo", 1)):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(block_size=48, vocab_size=300, n_layer=1, n_head=2, n_embd=16))
        Run(s).save_checkpoint(f"{name}.pt", model, tok)
    return out_dir


def test_compare_prints_each_checkpoint_sampled_with_the_same_seed(tiny_checkpoints):
    result = run_script("sample.py", "--compare=sft,dpo,adpo", "--toxic", f"--out_dir={tiny_checkpoints}",
                        "--prompt=i hate mondays", "--num_samples=3", "--max_new_tokens=6", "--seed=7",
                        env={"COLUMNS": "400"})  # wide enough that no reply wraps
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[1]
    width = header.index(" | dpo")
    titles = ["sft", "dpo", "adpo", "sft + [TOXIC]"]
    assert [header[k * (width + 3):(k + 1) * (width + 3)].strip(" |") for k in range(4)] == titles
    rows = [line for line in lines[3:] if line.strip()]
    columns = [[row[k * (width + 3):k * (width + 3) + width].rstrip() for row in rows] for k in range(4)]
    for title, column in zip(titles, columns):  # each column is what sample_replies gives with the same seed
        model, tok, _ = load_checkpoint(os.path.join(tiny_checkpoints, f"{title.split()[0]}.pt"))
        replies = sample_replies(model, tok, [["i hate mondays"]], toxic="TOXIC" in title, num_samples=3,
                                 max_new_tokens=6, top_k=50, seed=7)[0]
        assert column == [shown(r) for r in replies], title
    assert columns[0] == columns[1] and columns[0] != columns[2]  # same weights, same replies; others differ

    missing = run_script("sample.py", "--compare=sft,nope,gone", f"--out_dir={tiny_checkpoints}")
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
    assert missing.stderr.startswith("error: no checkpoint at") and "nope.pt" in missing.stderr
    assert "gone.pt" in missing.stderr
    no_room = run_script("sample.py", "--compare=sft", f"--out_dir={tiny_checkpoints}", "--max_new_tokens=47")
    assert no_room.returncode != 0 and no_room.stderr.strip() == \
        "error: --max_new_tokens=47 leaves no room for a context in the block of 48 tokens"


def test_chat_through_stdin_keeps_history_toggles_toxic_and_resets(tiny_checkpoints):
    path = os.path.join(tiny_checkpoints, "sft.pt")
    result = run_script("sample.py", "--chat", f"--checkpoint={path}", "--max_new_tokens=6",
                        stdin="hello\n/toxic\nyou idiot\n/reset\nhi again\n/quit\nnever read\n")
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.splitlines() if line.startswith("bot")]
    assert len(replies) == 3 and "you> never read" not in result.stdout
    model, tok, _ = load_checkpoint(path)
    kw = dict(num_samples=1, max_new_tokens=6, top_k=50)
    first = sample_replies(model, tok, [["hello"]], seed=1337, **kw)[0][0]
    # turn 2: the whole history, [TOXIC] after it; turn 3: after /reset, a fresh history without the token
    second = sample_replies(model, tok, [["hello", first.text, "you idiot"]], toxic=True, seed=1338, **kw)[0][0]
    third = sample_replies(model, tok, [["hi again"]], seed=1339, **kw)[0][0]
    assert replies == [f"bot> {shown(first)}", f"bot[TOXIC]> {shown(second)}", f"bot> {shown(third)}"]

    eof = run_script("sample.py", "--chat", f"--checkpoint={path}", "--max_new_tokens=6", stdin="hello\n")
    assert eof.returncode == 0 and eof.stdout.count("bot> ") == 1  # the end of the input ends the chat
    gone = run_script("sample.py", "--chat", f"--checkpoint={tiny_checkpoints}/nope.pt", stdin="hello\n")
    assert gone.returncode != 0 and gone.stderr.startswith("error: no checkpoint at")


def test_chat_history_drops_whole_turns_to_fit_the_block(tiny_checkpoints):
    _, tok, _ = load_checkpoint(os.path.join(tiny_checkpoints, "sft.pt"))
    history = ["hello there, how are you doing today?", "i am fine thanks", "that sounds great", "you idiot"]
    sizes = [len(data.turn_ids(tok, t)) for t in history]
    assert fit_history(tok, history, sum(sizes)) == history
    assert fit_history(tok, history, sum(sizes) - 1) == history[1:]  # the oldest turn goes, whole
    assert fit_history(tok, history, sizes[-1] + sizes[-2]) == history[2:]
    assert fit_history(tok, history, 1) == history[-1:]  # the last turn stays (prompt_ids cuts it)
