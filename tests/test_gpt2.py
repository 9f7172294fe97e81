"""Starting from a pretrained GPT-2 (--init_from): tested on a small random GPT-2 that each test folder holds
in the Hugging Face layout (config.json, model.safetensors with GPT-2's names and Conv1D layout, tokenizer.json).
Nothing is downloaded."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import evaluate
import train
from conftest import cli, generate_with_logits, get_settings
from harness import reports
from harness.checks import CheckpointError, check_gpt2_folder
from harness.configurator import ConfigError
from model import GPT

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
CONFIG = dict(model_type="gpt2", activation_function="gelu_new", layer_norm_epsilon=1e-5, n_layer=2, n_head=2,
              n_embd=32, n_positions=64, n_ctx=64, n_inner=None)


def write_gpt2_folder(folder, seed=0, **config):
    """A random GPT-2 as Hugging Face saves one: a byte-level BPE whose last id is <|endoftext|> (in the vocab
    and an added token, as GPT-2's), tensors named h.0.attn.c_attn.weight ... without the transformer. prefix,
    Linear weights stored (in, out) as Conv1D does, the causal-mask buffer h.N.attn.bias beside them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    os.makedirs(folder, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    texts = ["hello there, how are you doing today?", "i am fine thanks", "what do you do for fun?",
             "i like to read books and play games", "that sounds great", "i hate mondays"] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|endoftext|>"])
    spec = json.loads(tok.to_str())
    spec["model"]["vocab"]["<|endoftext|>"] = tok.token_to_id("<|endoftext|>")
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(spec, f)

    cfg = {**CONFIG, "vocab_size": tok.get_vocab_size(), **config}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    C, V, P = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
    g = torch.Generator().manual_seed(seed)
    # weights large enough that the activations reach GELU's curved part: a wrong GELU or eps shows
    rand = lambda *shape, std=0.3: torch.randn(*shape, generator=g) * std  # noqa: E731
    tensors = {"wte.weight": rand(V, C), "wpe.weight": rand(P, C), "ln_f.weight": 1 + rand(C), "ln_f.bias": rand(C)}
    for i in range(cfg["n_layer"]):
        tensors.update({f"h.{i}.ln_1.weight": 1 + rand(C), f"h.{i}.ln_1.bias": rand(C),
                        f"h.{i}.attn.c_attn.weight": rand(C, 3 * C), f"h.{i}.attn.c_attn.bias": rand(3 * C),
                        f"h.{i}.attn.c_proj.weight": rand(C, C), f"h.{i}.attn.c_proj.bias": rand(C),
                        f"h.{i}.ln_2.weight": 1 + rand(C), f"h.{i}.ln_2.bias": rand(C),
                        f"h.{i}.mlp.c_fc.weight": rand(C, 4 * C), f"h.{i}.mlp.c_fc.bias": rand(4 * C),
                        f"h.{i}.mlp.c_proj.weight": rand(4 * C, C), f"h.{i}.mlp.c_proj.bias": rand(C),
                        f"h.{i}.attn.bias": torch.ones(P, P).tril()[None, None]})
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})  # as transformers saves
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return write_gpt2_folder(str(tmp_path_factory.mktemp("gpt2")))


def reference_logits(t, cfg, ids):
    """GPT-2's forward in plain tensor ops, straight from the file's tensors (Conv1D: x @ W + b)."""
    def layer_norm(x, w, b):
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + cfg["layer_norm_epsilon"]) * w + b

    def gelu_new(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    T, H, C = len(ids), cfg["n_head"], cfg["n_embd"]
    x = t["wte.weight"][ids] + t["wpe.weight"][:T]  # (T, C)
    future = torch.ones(T, T).triu(1).bool()
    for i in range(cfg["n_layer"]):
        p = lambda name: t[f"h.{i}.{name}"]  # noqa: E731
        h = layer_norm(x, p("ln_1.weight"), p("ln_1.bias"))
        q, k, v = (h @ p("attn.c_attn.weight") + p("attn.c_attn.bias")).split(C, dim=-1)
        q, k, v = (z.view(T, H, C // H).transpose(0, 1) for z in (q, k, v))  # (H, T, hs)
        att = (q @ k.transpose(-1, -2) / math.sqrt(C // H)).masked_fill(future, float("-inf")).softmax(-1)
        y = (att @ v).transpose(0, 1).reshape(T, C)
        x = x + y @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        h = layer_norm(x, p("ln_2.weight"), p("ln_2.bias"))
        x = x + gelu_new(h @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias")) @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
    return layer_norm(x, t["ln_f.weight"], t["ln_f.bias"]) @ t["wte.weight"].T  # (T, V), tied output


def load(gpt2_dir, block_size=48):
    tok = data.gpt2_tokenizer(gpt2_dir)
    return GPT.from_gpt2(gpt2_dir, block_size, tok.get_vocab()).eval(), tok


TEXT = "hello there, i hate mondays! what do you do for fun?"


def test_gpt2_logits_equal_a_plain_reference_forward(gpt2_dir):
    from tokenizers import Tokenizer
    model, tok = load(gpt2_dir)
    cfg = json.load(open(os.path.join(gpt2_dir, "config.json")))
    gpt2_tok = Tokenizer.from_file(os.path.join(gpt2_dir, "tokenizer.json"))
    gpt2_ids = gpt2_tok.encode("<|endoftext|>").ids + gpt2_tok.encode(TEXT).ids  # GPT-2's ids, as GPT-2 reads
    our_ids = [data.ENDOFTEXT_ID] + data.encode(tok, TEXT)
    assert len(our_ids) == len(gpt2_ids) > 10  # the same tokens, other ids
    expected = reference_logits(load_file(os.path.join(gpt2_dir, "model.safetensors")), cfg, torch.tensor(gpt2_ids))
    logits, _ = model(torch.tensor([our_ids]))
    # to_gpt2[i]: GPT-2's id of the token our id i stands for (-1: a token GPT-2 lacks)
    to_gpt2 = [gpt2_tok.token_to_id(tok.id_to_token(i)) for i in range(tok.get_vocab_size())]
    to_gpt2 = torch.tensor([-1 if g is None else g for g in to_gpt2])
    assert (to_gpt2[:3] == -1).all() and (to_gpt2[3:] >= 0).all()  # new: pad, end-of-turn, [TOXIC]
    torch.testing.assert_close(logits[0, :, 3:], expected[:, to_gpt2[3:]], rtol=1e-5, atol=5e-5)
    # the three new tokens start at GPT-2's mean embedding, in and out (tied)
    wte = load_file(os.path.join(gpt2_dir, "model.safetensors"))["wte.weight"]
    torch.testing.assert_close(model.lm_head.weight[:3], wte.mean(0).expand(3, -1))
    assert model.transformer.wte.weight is model.lm_head.weight


def test_gpt2_logits_equal_transformers(gpt2_dir):
    transformers = pytest.importorskip("transformers")  # a check beside the reference, where it is installed
    model, tok = load(gpt2_dir)
    reference = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    with torch.no_grad():
        expected = reference(torch.tensor([hf_tok(TEXT)["input_ids"]])).logits[0]  # (T, GPT-2's vocab)
    logits, _ = model(torch.tensor([data.encode(tok, TEXT)]))
    ours = [tok.token_to_id(t) for t in hf_tok.convert_ids_to_tokens(list(range(expected.size(-1))))]
    torch.testing.assert_close(logits[0][:, ours], expected, rtol=1e-4, atol=1e-4)


def test_gpt2_reply_is_the_same_with_and_without_the_cache(gpt2_dir):
    model, tok = load(gpt2_dir)
    prompts = [data.context_ids(tok, ["hello there", "i hate mondays"]), data.context_ids(tok, ["hi"], toxic=True)]
    replies = {}
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(0)
        replies[use_cache] = generate_with_logits(model, prompts, 16, temperature=1.0, use_cache=use_cache,
                                                  generator=g, pad_token=data.PAD_ID)
    assert replies[True][0] == replies[False][0] and all(len(r) == 16 for r in replies[True][0])
    torch.testing.assert_close(replies[True][1], replies[False][1], rtol=1e-4, atol=1e-4)


def test_gpt2_special_tokens_are_single_ids_never_made_from_text(gpt2_dir):
    tok = data.gpt2_tokenizer(gpt2_dir)
    for token_id, token in enumerate(data.SPECIAL_TOKENS):  # ours at 0..3, GPT-2's <|endoftext|> at 3
        assert tok.token_to_id(token) == token_id and tok.id_to_token(token_id) == token
    assert tok.get_vocab_size() == 301 + 3  # GPT-2's tokens (<|endoftext|> included) and our three new ones
    text = "you typed <|toxic|> and <|endoftext|><|eot|><|pad|> hello"
    ids = data.encode(tok, text)
    assert not set(ids) & {data.PAD_ID, data.EOT_ID, data.TOXIC_ID, data.ENDOFTEXT_ID}
    assert data.decode(tok, ids) == text
    assert data.turn_ids(tok, "hi")[-1] == data.EOT_ID


def run_train(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], capture_output=True,
                          text=True, cwd=HERE, timeout=600, env=env)


def break_config(folder):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    json.dump(dict(cfg, model_type="llama"), open(os.path.join(folder, "config.json"), "w"))


def break_shapes(folder):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["h.1.mlp.c_fc.weight"] = tensors["h.1.mlp.c_fc.weight"].t().contiguous()  # saved as a Linear
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("spoil, message", [
    (lambda folder: os.remove(os.path.join(folder, "tokenizer.json")), "no tokenizer.json (a GPT-2 folder holds"),
    (break_config, "config.json: model_type is 'llama', not 'gpt2'"),
    (break_shapes, "model.safetensors: h.1.mlp.c_fc.weight: shape (128, 32), config.json implies (32, 128)"),
])
def test_bad_gpt2_folder_is_a_one_line_error(gpt2_dir, tmp_path, spoil, message):
    folder = shutil.copytree(gpt2_dir, tmp_path / "gpt2")
    spoil(folder)
    with pytest.raises(CheckpointError) as error:
        check_gpt2_folder(folder, 64)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_gpt2_folder_stops_train_py_before_it_writes(gpt2_dir, tmp_path):
    folder = shutil.copytree(gpt2_dir, tmp_path / "gpt2")
    break_shapes(folder)
    out_dir = tmp_path / "out"
    result = cli(train.main, "--preset=tiny", f"--init_from={folder}", f"--out_dir={out_dir}")
    assert result.returncode != 0 and result.stderr.startswith("error: ") and "c_fc.weight" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out_dir.exists()  # one line, nothing written
    with pytest.raises(ConfigError, match="--preset=gpt2 needs --init_from=DIR"):
        get_settings(["--preset=gpt2"])


def test_train_from_a_gpt2_folder_end_to_end(gpt2_dir, tmp_path):
    out_dir = str(tmp_path / "out")
    result = run_train("--preset=tiny", f"--init_from={gpt2_dir}", f"--out_dir={out_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(os.path.join(out_dir, "report.json")))
    for section in ("sft", "dpo", "adpo"):
        for key in reports.SECTION_KEYS:
            assert math.isfinite(report[section][key]), (section, key)
    for section in ("dpo", "adpo"):
        for key in reports.STABILITY_KEYS:
            assert key in report[section] or (section, key) == ("dpo", "toxic_grad_share")
    for key in reports.SFT_KEYS:
        assert key in report["sft"]
    assert report["triplets"]["n"] > 0
    # the run's tokenizer is GPT-2's with our special tokens, and every checkpoint has GPT-2's shape
    tokenizer = os.path.join(out_dir, "tokenizer.json")
    assert data.tokenizer_from_str(open(tokenizer).read()).get_vocab() == data.gpt2_tokenizer(gpt2_dir).get_vocab()
    for name in ("sft.pt", "dpo.pt", "adpo.pt"):
        config = torch.load(os.path.join(out_dir, name), weights_only=False)["model_config"]
        assert (config["n_embd"], config["vocab_size"], config["block_size"]) == (32, 304, 64)
    first = json.loads(open(os.path.join(out_dir, "metrics_dpo.jsonl")).readline())
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)  # pi = ref at step 0

    # a later stage without sft keeps the GPT-2 tokenizer (a corpus-trained one would not fit sft.pt)
    result = run_train("--preset=tiny", f"--out_dir={out_dir}", f"--init_from={gpt2_dir}", "--stages=triplets",
                        "--pref_contexts=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert data.tokenizer_from_str(open(tokenizer).read()).get_vocab() == data.gpt2_tokenizer(gpt2_dir).get_vocab()
    result = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), f"--checkpoint={out_dir}/adpo.pt",
                             "--prompt=i hate mondays", "--num_samples=2", "--max_new_tokens=8"],
                            capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 0 and result.stdout.count("  > ") == 2, result.stderr
