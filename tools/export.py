"""
A checkpoint as a Hugging Face GPT-2 folder for other tools: config.json, model.safetensors, tokenizer.json,
generation_config.json and tokenizer_config.json; and the triplets in TRL's preference format.

    python -m tools.export --checkpoint=out/adpo.pt --out=hf/adpo
    python -m tools.export --triplets=out/triplets.jsonl --out=out/trl.jsonl  # TRL's DPOTrainer reads it

then transformers.GPT2LMHeadModel.from_pretrained("hf/adpo") gives our model's logits on the same ids, and
generate() stops where our model ends a turn (<|eot|>). GPT.from_gpt2 reads such a folder back
(docs/running.md: Exporting to Hugging Face). In the exported tokenizer no typed text becomes the control
token: only the id 2 itself is the inner toxic model's switch.

With --triplets, each line of FILE.jsonl is a triplet as text: "prompt", "chosen", "rejected" (what TRL's
DPOTrainer reads) and "toxic", written so that the exported tokenizer encodes them to exactly the ids our
trainer scores (docs/running.md: Training TRL's DPO on our triplets).
"""

import json
import os
from dataclasses import dataclass

import data
from data import ENDOFTEXT, ENDOFTEXT_ID, EOT, EOT_ID, PAD, PAD_ID, REPLIES, TOXIC
from harness import run_main
from harness.checks import (EXPORT_FILES, CheckpointError, check_export_dir, json_lines, load_checkpoint,
                            read_triplets)
from harness.configurator import ConfigError, apply_overrides, parse_overrides
from model import CONV1D


@dataclass
class ExportSettings:
    checkpoint: str = ""  # written by train.py; empty: out/adpo.pt (with --triplets: sft.pt beside them)
    out: str = "hf"  # the folder to write: new, empty, or an earlier export's (--triplets: a .jsonl file)
    triplets: str = ""  # a triplets.jsonl to write in TRL's format to --out, instead of a model
    max_new_tokens: int = 0  # --triplets: the triplets stage's (0: the length of its cut replies)
    min_judge_gap: float = 0.0  # --triplets: the preference stage's (only the triplets it trains on)


def gpt2_config(config):
    """config.json of the GPT-2 that computes our GPT's function (model.py's block is GPT-2's exactly)."""
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_ctx": config.block_size,  # n_ctx: read by old transformers
            "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
            "tie_word_embeddings": True,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            **special_ids()}


def special_ids():
    """A turn ends with <|eot|>, which the model writes (never <|endoftext|>: it only starts a document)."""
    return {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": EOT_ID, "pad_token_id": PAD_ID}


def hf_tokenizer_json(tokenizer_json):
    """Our tokenizer for other tools. Ours reads every typed text as plain text (data._plain_text_only), a
    switch tokenizer.json cannot carry: there the added tokens match typed text. So the control token is
    not an added token: "<|toxic|>" typed by a user is BPE text, as in ours, and id 2 stays in the
    vocabulary (decodes, reachable by id). The other three stay special tokens, matched in typed text as
    Hugging Face tokenizers do (ours never matches them): <|eot|> as chat templates need."""
    spec = json.loads(tokenizer_json)
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != TOXIC]
    merged = {"".join(m) if isinstance(m, list) else m.replace(" ", "") for m in spec["model"]["merges"]}
    if TOXIC in merged:  # BPE could then write it from typed text
        raise CheckpointError(f"the tokenizer's merges can form {TOXIC} from text: it cannot be exported "
                              "safely")
    return json.dumps(spec, ensure_ascii=False)


def tokenizer_config(block_size):
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": ENDOFTEXT, "eos_token": EOT,
            "pad_token": PAD, "model_max_length": block_size, "clean_up_tokenization_spaces": False}


def gpt2_tensors(model):
    """Our weights under GPT-2's names (ours already, transformer. prefix included) in GPT-2's layout."""
    tensors = {}
    for name, w in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # the same tensor as wte; safetensors refuses shared tensors, and GPT-2 ties them again
        if name.endswith(CONV1D):
            w = w.t()  # nn.Linear holds (out, in); GPT-2's Conv1D stores (in, out)
        tensors[name] = w.detach().contiguous()
    return tensors


def export(model, tokenizer_json, out):
    """The EXPORT_FILES in out, each written to NAME.tmp, then all renamed."""
    from safetensors.torch import save_file
    assert model.config.bias, "GPT-2 has biases; a model without them is not one"
    os.makedirs(out, exist_ok=True)
    path = {name: os.path.join(out, name) for name in EXPORT_FILES}
    texts = {"config.json": gpt2_config(model.config), "generation_config.json": special_ids(),
             "tokenizer_config.json": tokenizer_config(model.config.block_size)}
    for name, value in texts.items():
        with open(path[name] + ".tmp", "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2)
    with open(path["tokenizer.json"] + ".tmp", "w", encoding="utf-8") as f:
        f.write(hf_tokenizer_json(tokenizer_json))  # our BPE, special tokens at ids 0-3
    # format "pt": transformers refuses a safetensors file without it
    save_file(gpt2_tensors(model), path["model.safetensors"] + ".tmp", metadata={"format": "pt"})
    for name in EXPORT_FILES:  # the slow writes are done: a folder never mixes two exports for long
        os.replace(path[name] + ".tmp", path[name])


# ----------------------------------------------------------------------------------------------------------
# the triplets in TRL's format


def as_text(tok, ids):
    """ids as text, each end-of-turn written as its token text, which the exported tokenizer reads back as
    the one id (ours never does: data._plain_text_only)."""
    text, piece = "", []
    for i in ids:
        if i == EOT_ID:
            text, piece = text + data.decode(tok, piece) + EOT, []
        else:
            piece.append(i)
    return text + data.decode(tok, piece)


def trl_rows(triplets, tok, block_size, max_new_tokens):
    """(rows, the `line` of each triplet left out). A row is a triplet as text: the prompt as the
    trainer builds it (data.encode_triplets: the context cut from the left to block_size - max_new_tokens
    ids, no [TOXIC]), the replies as sampled (end-of-turn where the model ended the reply, none where
    max_new_tokens cut it). The exported tokenizer encodes the prompt, each reply, and the prompt followed by
    each reply (how TRL's DPOTrainer tokenizes) to exactly the ids our trainer scores. A triplet that no text
    gives back is left out: the model may sample "he" + "llo" where the tokenizer writes "hello", cut a
    character's bytes apart, or sample a special token."""
    from tokenizers import Tokenizer
    exported = Tokenizer.from_str(hf_tokenizer_json(tok.to_str()))
    rows, left_out = [], []
    for t, e in zip(triplets, data.encode_triplets(tok, triplets, block_size, max_new_tokens)):
        row = {"prompt": as_text(tok, e["prompt"]), **{r: as_text(tok, e[r]) for r in REPLIES}}
        pairs = [(row["prompt"], e["prompt"])] + [(row[r], e[r]) for r in REPLIES] + \
            [(row["prompt"] + row[r], e["prompt"] + e[r]) for r in REPLIES]
        if all(exported.encode(text).ids == ids for text, ids in pairs):
            rows.append({**row, "line": t["line"]})
        else:
            left_out.append(t["line"])
    return rows, left_out


def prompt_room(triplets, max_new_tokens):
    """The --max_new_tokens the triplets were sampled with, which cuts the trainer's prompts: a reply the
    model did not end is exactly that long. Given (max_new_tokens > 0), it must agree with them."""
    cut = {len(t[f"{r}_ids"]) for t in triplets for r in REPLIES if not t[f"{r}_finished"]}
    if len(cut) > 1:
        raise ConfigError(f"the triplets' cut replies have {len(cut)} lengths ({min(cut)} to {max(cut)}): "
                          "sampled with several --max_new_tokens; rerun the triplets stage")
    if max_new_tokens and cut and cut != {max_new_tokens}:
        raise ConfigError(f"--max_new_tokens={max_new_tokens}, but the triplets' cut replies are {cut.pop()} "
                          "tokens long: they were sampled with that")
    if not (max_new_tokens or cut):
        raise ConfigError("every reply of the triplets ended by itself, so their --max_new_tokens is not "
                          "known: give the triplets stage's as --max_new_tokens")
    return max_new_tokens or cut.pop()


def export_triplets(s):
    """--triplets as TRL's rows in --out (written to FILE.tmp, then renamed), and what was left out, said."""
    if not s.out.endswith(".jsonl") or os.path.isdir(s.out):
        raise ConfigError(f"--out={s.out}: with --triplets, give a .jsonl file to write")
    if os.path.exists(s.out) and os.path.samefile(s.out, s.triplets):
        raise ConfigError(f"--out={s.out} is the triplets file itself; give another file")
    checkpoint = s.checkpoint or os.path.join(os.path.dirname(s.triplets), "sft.pt")
    lines = [int(where.rsplit(":", 1)[1]) for where, _ in json_lines(s.triplets)]  # blank lines skipped
    triplets = [{**t, "line": n} for t, n in zip(read_triplets(s.triplets), lines)]  # checked line by line
    max_new_tokens = prompt_room(triplets, s.max_new_tokens)  # from every triplet of the file
    triplets = data.select_triplets(triplets, s.min_judge_gap)  # those the preference stage trains on
    model, tok, _ = load_checkpoint(checkpoint)
    rows, left_out = trl_rows(triplets, tok, model.config.block_size, max_new_tokens)
    os.makedirs(os.path.dirname(s.out) or ".", exist_ok=True)
    with open(s.out + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(s.out + ".tmp", s.out)
    cut = sum(not (row["chosen"].endswith(EOT) and row["rejected"].endswith(EOT)) for row in rows)
    print(f"wrote {len(rows)} of {len(triplets)} triplets to {s.out} (the tokenizer and block size of "
          f"{checkpoint}; prompts cut for max_new_tokens={max_new_tokens}; min_judge_gap={s.min_judge_gap})")
    if left_out:
        named = ", ".join(map(str, left_out[:10])) + (", ..." if len(left_out) > 10 else "")
        print(f"left out {len(left_out)}, whose sampled ids no text encodes to: {s.triplets} lines {named}")
    if cut:
        print(f"{cut} rows have a chosen or rejected reply cut at max_new_tokens (no {EOT}): TRL's "
              f"DPOTrainer appends its eos_token ({EOT}) to them, which our trainer does not score")


# ----------------------------------------------------------------------------------------------------------


def main(argv):
    s = apply_overrides(ExportSettings(), parse_overrides(argv))
    if s.triplets:
        return export_triplets(s)
    s.checkpoint = s.checkpoint or "out/adpo.pt"
    check_export_dir(s.out)
    model, _, ckpt = load_checkpoint(s.checkpoint)
    if not model.config.bias:
        raise CheckpointError(f"{s.checkpoint}: a model without biases (bias=False) is not a GPT-2; "
                              "export needs one trained with bias=True")
    export(model, ckpt["tokenizer_json"], s.out)
    print(f"wrote {', '.join(EXPORT_FILES)} to {s.out}")


if __name__ == "__main__":
    run_main(main)
