"""export.py: a checkpoint as a Hugging Face GPT-2 folder, read back by our own GPT-2 loader (GPT.from_gpt2)
and, when it is installed, by transformers. Nothing is trained or downloaded: a few seconds on 2 CPU cores."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import train
from harness.artifacts import Run
from harness.checks import EXPORT_FILES, check_gpt2_folder
from data import UserError
from harness.configurator import ConfigError
from model import GPT, GPTConfig
from tools import export

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
BLOCK_SIZE = 32
TEXT = "hello there, how are you doing today?"


def save_checkpoint(out_dir, bias=True):
    """out_dir/tiny.pt as train.py saves one: an untrained GPT whose every weight is moved off its init
    (biases not 0, LayerNorm gains not 1), so that a dropped bias or a missed transpose changes the logits."""
    texts = [TEXT, "i am fine thanks", "you idiot", "that sounds great"] * 20
    tok = data.train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    config = GPTConfig(block_size=BLOCK_SIZE, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_embd=32,
                       bias=bias)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # wte once: lm_head is the same tensor
            p.add_(torch.randn_like(p) * 0.3)
    Run(train.Settings(out_dir=out_dir)).save_checkpoint("tiny.pt", model, tok)
    return os.path.join(out_dir, "tiny.pt"), model, tok


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint path, folder it was exported to, model, tokenizer)."""
    path, model, tok = save_checkpoint(str(tmp_path_factory.mktemp("ckpt")))
    folder = os.path.join(str(tmp_path_factory.mktemp("hf")), "tiny")  # not there yet: export creates it
    export.main([f"--checkpoint={path}", f"--out={folder}"])
    return path, folder, model, tok


def random_ids(vocab_size):
    return torch.randint(0, vocab_size, (3, BLOCK_SIZE), generator=torch.Generator().manual_seed(0))


def test_export_reads_back_as_the_same_model_and_tokenizer(exported):
    _, folder, model, tok = exported
    assert sorted(os.listdir(folder)) == sorted(EXPORT_FILES)  # no .tmp left behind
    check_gpt2_folder(folder, BLOCK_SIZE)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["n_positions"] == BLOCK_SIZE
    # a turn ends with <|eot|>, which the model writes; bos our <|endoftext|>, pad our <|pad|>
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (3, 1, 0)
    with open(os.path.join(folder, "generation_config.json"), encoding="utf-8") as f:
        assert json.load(f)["eos_token_id"] == data.EOT_ID

    reloaded = GPT.from_gpt2(folder, BLOCK_SIZE, tok.get_vocab()).eval()
    ids = random_ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids)[0], model(ids)[0], rtol=0, atol=1e-6)

    assert data.gpt2_tokenizer(folder).get_vocab() == tok.get_vocab()
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        exported_spec, ours = json.load(f), json.loads(tok.to_str())
    assert exported_spec["model"] == ours["model"]  # our BPE exactly: vocabulary and merges


TYPED = ["<|toxic|>", "hi <|toxic|> you idiot", "<|toxic|><|toxic|>", " <|toxic|>", "<|eot|><|toxic|>x"]


def test_exported_tokenizer_reads_typed_text_as_ours_does(exported):
    """No typed text becomes the control token (a user's message must not switch on the inner toxic model);
    the id itself stays in the vocabulary. Checked with the tokenizers library, as any tool loads the file."""
    from tokenizers import Tokenizer
    _, folder, _, tok = exported
    hf = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    for text in TYPED + [TEXT]:
        ids = hf.encode(text).ids
        assert data.TOXIC_ID not in ids, text
        if "<|eot|>" not in text:  # end-of-turn stays matchable in text (chat templates), ours never matches
            assert ids == data.encode(tok, text), text
    assert hf.token_to_id(data.TOXIC) == data.TOXIC_ID and hf.decode([data.TOXIC_ID], skip_special_tokens=False) \
        == data.TOXIC
    assert hf.encode("<|eot|>").ids == [data.EOT_ID]


def test_transformers_loads_the_export_with_the_same_logits(exported):
    transformers = pytest.importorskip("transformers")
    _, folder, model, tok = exported
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = random_ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids)[0], rtol=1e-5, atol=1e-5)
    assert (hf.config.eos_token_id, hf.config.pad_token_id) == (data.EOT_ID, data.PAD_ID)
    assert hf.generation_config.eos_token_id == data.EOT_ID
    for hf_tok in (transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json")),
                   transformers.AutoTokenizer.from_pretrained(folder)):
        assert hf_tok.get_vocab() == tok.get_vocab()
        assert hf_tok(TEXT)["input_ids"] == data.encode(tok, TEXT)
        for text in TYPED:
            assert data.TOXIC_ID not in hf_tok(text)["input_ids"], (type(hf_tok).__name__, text)
    assert transformers.AutoTokenizer.from_pretrained(folder).eos_token_id == data.EOT_ID


def test_transformers_generate_stops_at_end_of_turn(exported, tmp_path):
    """Greedy generate of the export writes what ours writes and stops where ours stops: at <|eot|>."""
    transformers = pytest.importorskip("transformers")
    path, _, model, tok = exported
    model = copy.deepcopy(model)
    prompt = data.encode(tok, TEXT)
    third = model.generate([prompt], 3, temperature=0.0)[0][2]
    with torch.no_grad():  # a model that ends its turn where it wrote its third token before
        model.transformer.wte.weight[data.EOT_ID] = model.transformer.wte.weight[third] * 1.5
    folder = str(tmp_path / "eot")
    export.export(model, checks_tokenizer_json(path), folder)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    ours = model.generate([prompt], 16, temperature=0.0, stop_token=data.EOT_ID, pad_token=data.PAD_ID)[0]
    assert ours[-1] == data.EOT_ID and len(ours) < 16  # the test means something: ours stopped
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    assert out == ours


def checks_tokenizer_json(path):
    from harness.checks import read_checkpoint
    return read_checkpoint(path)["tokenizer_json"]


def test_export_replaces_an_earlier_export_and_refuses_any_other_folder(exported, tmp_path):
    path, folder, _, _ = exported
    export.main([f"--checkpoint={path}", f"--out={folder}"])  # an earlier export is overwritten
    assert sorted(os.listdir(folder)) == sorted(EXPORT_FILES)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt"):
        export.main([f"--checkpoint={path}", f"--out={tmp_path}"])
    with pytest.raises(ConfigError, match="is a file"):
        export.main([f"--checkpoint={path}", f"--out={tmp_path / 'notes.txt'}"])
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_a_model_without_biases_is_refused_in_one_line(tmp_path):
    path, _, _ = save_checkpoint(str(tmp_path), bias=False)
    out = tmp_path / "hf"
    result = subprocess.run([sys.executable, "-m", "tools.export", f"--checkpoint={path}",
                             f"--out={out}"], capture_output=True, text=True, cwd=HERE, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "bias=False" in result.stderr and not out.exists()  # refused before anything is written


# ----------------------------------------------------------------------------------------------------------
# the triplets in TRL's format


@pytest.fixture(scope="module")
def trl_export(exported, tmp_path_factory):
    """(triplets, their file, the rows exported from it) on the exported checkpoint's tokenizer: a reply the
    model ended, replies cut at max_new_tokens, a context cut from the left, typed "<|toxic|>"; and two no
    text gives back: a reply sampled a character a token where the tokenizer writes fewer tokens, and a
    context whose typed "<|eot|>" the exported tokenizer reads as the id."""
    path, _, _, tok = exported
    split = [i for char in "there" for i in data.encode(tok, char)]  # a token a character
    assert split != data.encode(tok, "there")  # which the tokenizer writes in fewer tokens

    def triplet(context, chosen_ids, toxic_finished=True):  # a cut reply: max_new_tokens = 12 tokens
        toxic = data.encode(tok, "you idiot") + [data.EOT_ID] if toxic_finished else \
            data.encode(tok, "you idiot, " * 4)[:12]
        t = {"context": context, "p_chosen": 0.1, "p_rejected": 0.9, "p_toxic": 0.9}
        for r, ids in (("chosen", chosen_ids), ("rejected", data.encode(tok, "that sounds great") + [data.EOT_ID]),
                       ("toxic", toxic)):
            t.update({r: data.decode(tok, ids), f"{r}_ids": ids, f"{r}_finished": ids[-1] == data.EOT_ID})
        return t
    finished = data.encode(tok, "i am fine thanks") + [data.EOT_ID]
    triplets = [triplet([TEXT], finished),  # line 1
                triplet(["hi <|toxic|> there", TEXT], finished, toxic_finished=False),  # 2: a cut toxic reply
                triplet([TEXT * 3, "i am fine thanks"], finished),  # 3: a context longer than the prompt room
                triplet([TEXT], split + [data.EOT_ID]),  # 4: ids that are not the tokenizer's encoding
                triplet(["what <|eot|> is this"], finished),  # 5: typed end-of-turn
                triplet([TEXT], data.encode(tok, "i am fine thanks " * 4)[:12])]  # 6: a cut chosen reply
    folder = tmp_path_factory.mktemp("trl")
    source, out = folder / "triplets.jsonl", folder / "trl.jsonl"
    source.write_text("\n" + "".join(json.dumps(t) + "\n" for t in triplets))  # a blank first line
    export.main([f"--triplets={source}", f"--out={out}", f"--checkpoint={path}"])  # max_new_tokens: 12
    return triplets, source, [json.loads(line) for line in out.read_text().splitlines()]


def test_triplets_in_trls_format_encode_to_the_ids_our_trainer_scores(exported, trl_export, tmp_path):
    """Each row's prompt, replies, and prompt + reply (TRL's DPOTrainer tokenizes the two together), encoded by
    the exported tokenizer.json, are exactly data.encode_triplets' ids; a triplet no text gives back is left
    out (trl_export's lines 4 and 5)."""
    from tokenizers import Tokenizer
    path, folder, _, tok = exported
    triplets, source, rows = trl_export
    assert [row["line"] for row in rows] == [2, 3, 4, 7]  # lines of the file
    enc = data.encode_triplets(tok, triplets, BLOCK_SIZE, 12)
    assert len(enc[2]["prompt"]) == BLOCK_SIZE - 12 < len(data.context_ids(tok, triplets[2]["context"]))
    hf = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))  # the exported model's tokenizer
    for row in rows:
        e = enc[row["line"] - 2]
        assert set(row) == {"prompt", "chosen", "rejected", "toxic", "line"}
        assert hf.encode(row["prompt"]).ids == e["prompt"] and data.TOXIC_ID not in e["prompt"]
        for r in data.REPLIES:
            assert hf.encode(row[r]).ids == e[r], (row["line"], r)
            assert hf.encode(row["prompt"] + row[r]).ids == e["prompt"] + e[r], (row["line"], r)
    assert rows[0]["chosen"] == "i am fine thanks<|eot|>" and rows[1]["toxic"] == "you idiot, you idiot, you idiot,"
    with pytest.raises(ConfigError, match="give a .jsonl file"):
        export.main([f"--triplets={source}", f"--out={tmp_path}", f"--checkpoint={path}"])
    with pytest.raises(ConfigError, match="the triplets file itself"):
        export.main([f"--triplets={source}", f"--out={source}", f"--checkpoint={path}"])
    assert json.loads(source.read_text().splitlines()[1]) == triplets[0]
    for wrong in ("--max_new_tokens=16", "--min_judge_gap=0.9"):  # not the sampling's; no triplet that far apart
        with pytest.raises(UserError, match="max_new_tokens=16, but the triplets' cut replies are 12|lower"):
            export.main([f"--triplets={source}", f"--out={tmp_path / 'x.jsonl'}", f"--checkpoint={path}", wrong])
    gapped = tmp_path / "gap.jsonl"  # the preference stage's selection (train.py --min_judge_gap)
    source.write_text("".join(json.dumps(t) + "\n" for t in [triplets[0], {**triplets[5], "p_rejected": 0.15}]))
    for wrong in ("--max_new_tokens=7", "--max_new_tokens=16"):  # told by line 2's cut reply, left out below
        with pytest.raises(ConfigError, match="cut replies are 12"):
            export.main([f"--triplets={source}", f"--out={gapped}", f"--checkpoint={path}", "--min_judge_gap=0.5",
                         wrong])
    export.main([f"--triplets={source}", f"--out={gapped}", f"--checkpoint={path}", "--min_judge_gap=0.5"])
    assert [json.loads(line)["line"] for line in gapped.read_text().splitlines()] == [1]
    source.write_text(json.dumps(triplets[0]) + "\n")
    with pytest.raises(ConfigError, match="ended by itself"):  # no cut reply tells the prompt room
        export.main([f"--triplets={source}", f"--out={gapped}", f"--checkpoint={path}"])


def test_trls_own_preprocessing_gives_our_ids(exported, trl_export, tmp_path):
    """With TRL installed (not a requirement: skipped without it), DPOTrainer's own preprocessing of the rows
    gives the ids our trainer scores, for every row whose chosen and rejected replies end with <|eot|>
    (docs/running.md's filter); TRL appends <|eot|> to a cut reply (line 7). Measured with TRL 1.16."""
    pytest.importorskip("trl")
    from datasets import load_dataset
    from transformers import AutoTokenizer, GPT2LMHeadModel
    from trl import DPOConfig, DPOTrainer
    _, folder, _, tok = exported
    triplets, source, rows = trl_export
    enc = data.encode_triplets(tok, triplets, BLOCK_SIZE, 12)
    dataset = load_dataset("json", data_files=str(source.parent / "trl.jsonl"), split="train")
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], bf16=False, max_length=BLOCK_SIZE)
    trainer = DPOTrainer(model=GPT2LMHeadModel.from_pretrained(folder), args=args, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(folder))
    for row, ex in zip(rows, trainer.train_dataset):
        e = enc[row["line"] - 2]
        assert ex["prompt_ids"] == e["prompt"]
        exact = row["chosen"].endswith(data.EOT) and row["rejected"].endswith(data.EOT)
        assert (ex["chosen_ids"] == e["chosen"] and ex["rejected_ids"] == e["rejected"]) == exact, row["line"]
