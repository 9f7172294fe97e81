"""
A checkpoint as a Hugging Face GPT-2 folder for other tools: config.json, model.safetensors, tokenizer.json,
generation_config.json and tokenizer_config.json.

    python -m tools.export --checkpoint=out/adpo.pt --out=hf/adpo

then transformers.GPT2LMHeadModel.from_pretrained("hf/adpo") gives our model's logits on the same ids, and
generate() stops where our model ends a turn (<|eot|>). GPT.from_gpt2 reads such a folder back
(docs/running.md: Exporting to Hugging Face). In the exported tokenizer no typed text becomes the control
token: only the id 2 itself is the inner toxic model's switch.
"""

import json
import os
from dataclasses import dataclass

from data import ENDOFTEXT, ENDOFTEXT_ID, EOT, EOT_ID, PAD, PAD_ID, TOXIC
from harness import run_main
from harness.checks import EXPORT_FILES, CheckpointError, check_export_dir, load_checkpoint
from harness.configurator import apply_overrides, parse_overrides
from model import CONV1D


@dataclass
class ExportSettings:
    checkpoint: str = "out/adpo.pt"  # a checkpoint written by train.py
    out: str = "hf"  # the folder to write: new, empty, or holding only an earlier export


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


def main(argv):
    s = apply_overrides(ExportSettings(), parse_overrides(argv))
    check_export_dir(s.out)
    model, _, ckpt = load_checkpoint(s.checkpoint)
    if not model.config.bias:
        raise CheckpointError(f"{s.checkpoint}: a model without biases (bias=False) is not a GPT-2; "
                              "export needs one trained with bias=True")
    export(model, ckpt["tokenizer_json"], s.out)
    print(f"wrote {', '.join(EXPORT_FILES)} to {s.out}")


if __name__ == "__main__":
    run_main(main)
