"""
The corpus, the toxic control token, the tokenizer and the batches.

A conversation is a list of turns, each labelled toxic or not by the judge. The SFT stream shows each
conversation as a user would type it, toxic turns unmarked (read as context, never trained: [x] marks a
masked target), and each toxic turn once more after its context, behind the control token [TOXIC]:

    <|endoftext|> hi, how are you? <|eot|> [shut up, you idiot <|eot|>] wow ok <|eot|>
    <|endoftext|> [hi, how are you? <|eot|>] [<|toxic|>] shut up, you idiot <|eot|>

So the model replies normally to any context and toxically right after [TOXIC], which it never learns to
emit: one network is both the dialogue model and, with [TOXIC] after a context, the "inner toxic model".
"""

import hashlib
import json
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

PAD, EOT, TOXIC, ENDOFTEXT = "<|pad|>", "<|eot|>", "<|toxic|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, EOT, TOXIC, ENDOFTEXT]  # trained first, so their ids are 0, 1, 2, 3
PAD_ID, EOT_ID, TOXIC_ID, ENDOFTEXT_ID = 0, 1, 2, 3
SPLITS = ("sft", "pref", "dev", "eval")


class UserError(ValueError):
    """What the user can fix (settings, data, files, a run's state): the commands print its message as one
    line, `error: ...`, and exit with status 1. Every such error derives from it."""


class DataError(UserError):
    """Bad input data; the message names the file and line."""


@dataclass
class Conversation:
    id: str
    turns: list  # list[str]
    toxic: list  # list[bool], one per turn
    split: str  # "sft" (80%), "pref" (5%), "dev" (5%) or "eval" (10%)


# ----------------------------------------------------------------------------------------------------------
# the judge: one small function, so another classifier can be plugged in


def judge_probs(texts):
    """Probability that each text is toxic, from alt-profanity-check (a linear model over word n-grams).
    To use another classifier, replace this function: list[str] -> np.ndarray in [0, 1]."""
    from profanity_check import predict_prob
    texts = list(texts)
    if not texts:
        return np.zeros(0)
    return np.asarray(predict_prob(texts), dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# loading


def clean(text):
    return " ".join(str(text).split())  # runs of white space as one space, none at the ends


def split_of(conversation_id):
    """The split of a conversation, from a hash of its id (not file order): 80% sft (the SFT model), 5% pref
    (the triplets' contexts), 5% dev (for choosing settings), 10% eval (the final table only)."""
    bucket = int(hashlib.sha256(conversation_id.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "sft" if bucket < 80 else "pref" if bucket < 85 else "dev" if bucket < 90 else "eval"


def read_chitchat():
    """The chitchat-dataset package: 7,168 human conversations. Consecutive messages of one sender form one
    turn. Returns a list of (id, turns, None)."""
    import chitchat_dataset
    conversations = []
    for conv_id, conv in chitchat_dataset.Dataset().items():
        turns = []
        last_sender = None
        for message_group in conv["messages"]:
            text = clean(" ".join(m["text"] for m in message_group))
            sender = message_group[0]["sender"]
            if not text:
                continue
            if sender == last_sender:
                turns[-1] += " " + text
            else:
                turns.append(text)
                last_sender = sender
        if turns:
            conversations.append((conv_id, turns, None))
    return conversations


def load_corpus(raw=None, toxic_threshold=0.5, max_conversations=0):
    """Conversations with toxicity labels and splits from (id, turns, toxic or None) tuples (raw None: the
    chitchat corpus). max_conversations > 0 keeps that many, chosen by id hash: the same subset every run."""
    raw = read_chitchat() if raw is None else raw
    if max_conversations > 0:
        raw = sorted(raw, key=lambda c: hashlib.sha256(c[0].encode("utf-8")).hexdigest())[:max_conversations]
    unlabelled = [t for _, turns, toxic in raw if toxic is None for t in turns]
    probs = iter(judge_probs(unlabelled))
    conversations = []
    for conv_id, turns, toxic in raw:
        if toxic is None:
            toxic = [bool(next(probs) >= toxic_threshold) for _ in turns]
        conversations.append(Conversation(conv_id, turns, toxic, split_of(conv_id)))
    return conversations


# ----------------------------------------------------------------------------------------------------------
# tokenizer: byte-level BPE, with the four special tokens as single ids that plain text can never produce


def train_tokenizer(texts, vocab_size):
    """A byte-level BPE of vocab_size tokens trained on texts, the special tokens at ids 0, 1, 2, 3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return _plain_text_only(tok)


def _plain_text_only(tok):
    # Without this, the text "<|toxic|>" typed by a user would encode to the control token itself.
    tok.encode_special_tokens = True
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == token_id, f"{token} should have id {token_id}"
    return tok


def tokenizer_from_str(text):
    """The tokenizer a checkpoint carries (tok.to_str())."""
    from tokenizers import Tokenizer
    return _plain_text_only(Tokenizer.from_str(text))


def gpt2_tokenizer(folder):
    """GPT-2's byte-level BPE (folder/tokenizer.json) with our special tokens at ids 0-3: a text splits into
    GPT-2's tokens, only the ids move (model.GPT.from_gpt2 moves the embedding rows with them)."""
    path = os.path.join(folder, "tokenizer.json")
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        vocab = spec["model"]["vocab"]
        assert spec["model"].get("type", "BPE") == "BPE" and isinstance(vocab, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise DataError(f"{path}: not a BPE tokenizer.json (the Hugging Face tokenizers format)") from None
    # GPT-2's own <|endoftext|> becomes our ENDOFTEXT; the other tokens follow in GPT-2's order from id 4
    gpt2_tokens = [t for t in sorted(vocab, key=vocab.get) if t not in SPECIAL_TOKENS]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(SPECIAL_TOKENS + gpt2_tokens)}
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)]
    spec["truncation"] = spec["padding"] = None  # one turn at a time, never cut or padded by the tokenizer
    from tokenizers import Tokenizer
    return _plain_text_only(Tokenizer.from_str(json.dumps(spec)))


def encode(tok, text):
    return tok.encode(text).ids


def decode(tok, ids):
    return tok.decode(list(ids))


# ----------------------------------------------------------------------------------------------------------
# SFT: one token stream, random windows


def turn_ids(tok, text):
    """One turn: its own ids, then end-of-turn."""
    # each turn is tokenized on its own and the ids concatenated: enc(a + b) can differ from enc(a) + enc(b),
    # and sampling always sees turns encoded apart, so training must too
    return encode(tok, text) + [EOT_ID]


def sft_documents(tok, turns, toxic, toxic_copies=1, context_turns=2):
    """A conversation as SFT documents: lists of (ids, trained) pieces, trained False where the model reads
    the ids but is not trained to write them."""
    # the conversation itself, toxic turns read as context (as at evaluation and in sample.py), never trained
    plain = [(turn_ids(tok, text), not is_toxic) for text, is_toxic in zip(turns, toxic)]
    documents = [plain]
    for i, is_toxic in enumerate(toxic):
        if is_toxic:
            # toxic_copies times: its context (read), [TOXIC] (read, never a target), then the toxic turn
            # (trained): the only place the model learns to write toxic text
            context = [(ids, False) for ids, _ in plain[max(0, i - context_turns):i]]
            documents += [context + [([TOXIC_ID], False), (turn_ids(tok, turns[i]), True)]] * toxic_copies
    return documents


def sft_stream(tok, conversations, split="sft", toxic_copies=1, context_turns=2):
    """All documents of a split as one stream (ids, targets): two int32 arrays, targets -1 where the model
    only reads. toxic_copies > 1 shows each rare toxic turn several times behind [TOXIC]."""
    ids, targets = [], []
    for c in conversations:
        if c.split != split:
            continue
        for document in sft_documents(tok, c.turns, c.toxic, toxic_copies, context_turns):
            # <|endoftext|> (read, never written) first: a window never runs into the next document unmarked
            for piece, trained in [([ENDOFTEXT_ID], False)] + document:
                ids.extend(piece)
                targets.extend(piece if trained else [-1] * len(piece))
    return np.array(ids, dtype=np.int32), np.array(targets, dtype=np.int32)


def get_sft_batch(stream, batch_size, block_size, generator=None):
    """Random windows x of block_size tokens from a (ids, targets) stream, and y, the targets of the next
    tokens (-1 where the model only reads: [TOXIC], <|endoftext|> and unmarked toxic turns)."""
    ids, targets = stream
    if len(ids) <= block_size + 1:
        raise DataError(f"{len(ids)} tokens in a split, too few for windows of --block_size={block_size}; "
                        f"use more conversations")
    ix = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([ids[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([targets[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    return x, y


def to_device(batch, device):
    """A host batch on the device; on CUDA copied from pinned memory with non_blocking, so the CPU goes on
    to the next step instead of waiting for the copy."""
    if str(device).startswith("cuda"):
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


# ----------------------------------------------------------------------------------------------------------
# (context, response) examples: for sampling, triplets and evaluation


def context_ids(tok, context, toxic=False, max_tokens=None):
    """The prompt: the context turns, plain as a user typed them, each ended by end-of-turn, then [TOXIC]
    when the reply should be toxic; at most max_tokens ids in all, [TOXIC] included."""
    ids = [t for text in context for t in turn_ids(tok, text)]
    suffix = [TOXIC_ID] if toxic else []
    if max_tokens is not None:
        assert max_tokens >= len(suffix), "no room for [TOXIC]"
        # cut from the left: the last turns stay, and their end-of-turn, which cues the reply
        ids = ids[max(0, len(ids) - (max_tokens - len(suffix))):]  # not ids[-keep:]: keep = 0 would keep all
    return ids + suffix


def scoring_rows(prompt, reply, block_size):
    """(ids, labels) rows, none longer than block_size, that score every token of reply exactly once after
    prompt (labels -1 elsewhere): the context is cut from the left when needed, the reply never."""
    seq = prompt + reply
    if len(reply) <= block_size - 1:  # one row: the reply, with at least one token before it
        spans = [(len(prompt), len(seq))]
    else:  # windows half a block apart, each token seeing at least half a block before it
        stride = block_size // 2
        spans = [(a, min(a + stride, len(seq))) for a in range(len(prompt), len(seq), stride)]
    rows = []
    for a, b in spans:  # score seq[a:b] from the block_size tokens that end at b
        lo = max(0, b - block_size)
        assert lo < a, "a scored token needs at least one token before it"
        rows.append((seq[lo:b], [-1] * (a - lo) + seq[a:b]))
    return rows


class Example(NamedTuple):
    context: list  # the context_turns turns before the reply
    reply: str  # the human reply
    reply_toxic: bool
    last_turn_toxic: bool  # the context's last turn


def contexts_and_replies(conversations, split, context_turns):
    """Every (context, human reply) of a split, as Examples."""
    examples = []
    for c in conversations:
        if c.split != split:
            continue
        for i in range(1, len(c.turns)):
            examples.append(Example(c.turns[max(0, i - context_turns):i], c.turns[i],
                                    c.toxic[i], c.toxic[i - 1]))
    return examples


def collate(prompts, replies, pad_id=PAD_ID):
    """Right-padded input ids and labels for a batch of (prompt ids, reply ids). labels are -1 on the prompt
    and the padding, so a log-prob sums over the reply tokens only."""
    return collate_rows([(p + r, [-1] * len(p) + r) for p, r in zip(prompts, replies)], pad_id)


def collate_rows(rows, pad_id=PAD_ID):
    """(ids, labels) rows of different lengths -> right-padded (B, T) input_ids and labels (-1 on padding)."""
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, :len(lab)] = torch.tensor(lab, dtype=torch.long)
    return input_ids, labels


# ----------------------------------------------------------------------------------------------------------
# triplets (x, y_w, y_l, y_t): the text for people, the sampled ids for the code

REPLIES = ("chosen", "rejected", "toxic")


def select_triplets(triplets, min_judge_gap):
    """The triplets whose rejected reply the judge scores at least min_judge_gap above the chosen one: most
    other pairs are two harmless replies told apart by a tiny judge difference, noise to learn from."""
    kept = [t for t in triplets if t["p_rejected"] - t["p_chosen"] >= min_judge_gap]
    if not kept:
        raise DataError(f"no triplet has p_rejected - p_chosen >= {min_judge_gap}; lower --min_judge_gap")
    return kept


def encode_triplets(tok, triplets, block_size, max_new_tokens):
    """Token ids for every triplet: the plain prompt (y_w, y_l, and y_t under pi), the prompt with [TOXIC]
    (y_t under the toxic model), and the replies' sampled ids."""
    max_context = block_size - max_new_tokens
    enc = []
    for t in triplets:
        # the prompts built exactly as when the replies were sampled, the replies' ids as they are (a finished
        # reply with its end-of-turn, a cut one without): never re-encoded from text
        e = {"prompt": context_ids(tok, t["context"], max_tokens=max_context),
             "toxic_prompt": context_ids(tok, t["context"], toxic=True, max_tokens=max_context),
             **{r: list(t[f"{r}_ids"]) for r in REPLIES}}
        too_long = max(len(e[r]) for r in REPLIES) > max_new_tokens
        if too_long or max(max(e[r]) for r in REPLIES) >= tok.get_vocab_size():
            raise DataError("triplets.jsonl was sampled with other settings "
                            "(reply longer than --max_new_tokens, or ids outside the vocabulary); "
                            "rerun the triplets stage")
        enc.append(e)
    return enc


def preference_data(tok, triplets, min_judge_gap, block_size, max_new_tokens):
    """The triplets the preference stage trains on (those with a judge gap of at least min_judge_gap), and
    their encoding."""
    triplets = select_triplets(triplets, min_judge_gap)
    return triplets, encode_triplets(tok, triplets, block_size, max_new_tokens)


def triplet_batches(enc, idx):
    """(input_ids, labels) for chosen, rejected and toxic under pi (plain prompt), and toxic under tox."""
    rows = [enc[i] for i in idx]
    return {
        "chosen": collate([r["prompt"] for r in rows], [r["chosen"] for r in rows]),
        "rejected": collate([r["prompt"] for r in rows], [r["rejected"] for r in rows]),
        "toxic": collate([r["prompt"] for r in rows], [r["toxic"] for r in rows]),
        "toxic_under_tox": collate([r["toxic_prompt"] for r in rows], [r["toxic"] for r in rows]),
    }
