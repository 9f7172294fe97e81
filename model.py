"""
A small GPT-2, written out in plain PyTorch, with GPT-2's parameter names (transformer.wte,
transformer.h.0.attn.c_attn, ..., lm_head): every tensor maps one to one onto a GPT-2 checkpoint.

- forward(idx, targets) -> (logits, loss): the training path, causal attention over a (B, T) batch;
- generate(...): the sampling path, prompts of different lengths in one batch, with a preallocated KV cache;
- GPT.from_gpt2(folder, ...): a pretrained GPT-2 in the Hugging Face layout. The block is GPT-2's exactly
  (tanh GELU, LayerNorm eps 1e-5, biases, 1/sqrt(head size) attention scale, tied lm_head).
"""

import dataclasses
import inspect
import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 256  # longest sequence the position table covers
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2


class KVCache:
    """Keys and values of every layer, preallocated for the whole generation: (L, B, nh, max_len, hs).
    One fixed shape at every step is what lets the decode step be compiled or captured as a CUDA graph."""

    def __init__(self, config, batch_size, max_len):
        self.shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = self.v = None  # allocated at the first update, in the keys' dtype (bf16 under autocast)
        self.pos = 0  # how many positions are filled

    def update(self, layer, k, v):
        """Store this step's k, v (B, nh, T, hs) at positions pos..pos+T-1; return the layer's whole cache
        (B, nh, max_len, hs), whose positions not filled yet hold zeros that the attention mask hides."""
        if self.k is None:
            self.k, self.v = k.new_zeros(self.shape), v.new_zeros(self.shape)
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer], self.v[layer]


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, attn_mask=None, kv_cache=None, layer=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, S, hs), S = the cache's length
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:  # training path: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:  # sampling path: attn_mask (B, 1, T, S) hides left padding as well as the future
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's gelu
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings, as GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_gpt2(cls, folder, block_size, vocab, dropout=0.0):
        """Our GPT with the weights of the GPT-2 in folder (config.json, model.safetensors, tokenizer.json):
        GPT-2's function on GPT-2's tokens. vocab (our token -> id) says which embedding row each id takes."""
        from safetensors.torch import load_file
        config, gpt2_ids = read_gpt2_config(folder, block_size)
        ours = sorted(vocab, key=vocab.get)
        assert [vocab[t] for t in ours] == list(range(len(ours))), "token ids must be 0 .. len(vocab) - 1"
        rows = torch.tensor([gpt2_ids.get(token, -1) for token in ours])  # GPT-2's row of each of our ids
        model = cls(dataclasses.replace(config, vocab_size=len(ours), dropout=dropout))
        tensors = load_file(os.path.join(folder, "model.safetensors"))
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}  # saved with or without it
        with torch.no_grad():
            for name, p in model.state_dict().items():
                if name == "lm_head.weight":
                    continue  # the same tensor as wte
                w = tensors[name.removeprefix("transformer.")]
                if name.endswith(CONV1D):
                    w = w.t()  # Conv1D stores (in, out); nn.Linear holds (out, in)
                elif name == "transformer.wpe.weight":
                    w = w[:block_size]  # only the first block_size positions
                elif name == "transformer.wte.weight":
                    # GPT-2's row of the same token; a token GPT-2 lacks (our special tokens) starts at the
                    # mean row, an average token, neither favoured nor ruled out
                    w = torch.where((rows >= 0)[:, None], w[rows.clamp(min=0)], w.mean(0))
                p.copy_(w)
        return model

    def get_num_params(self, non_embedding=True):
        """The number of parameters, without the position table by default (as nanoGPT counts)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None):
        """idx (B, T) -> logits (B, T, vocab) at every position, and the mean cross-entropy over the targets
        that are not -1 when targets are given (else None)."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} tokens, block_size is {self.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        # right padding is harmless here: causal attention never lets a real token see the padding after it
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # weight decay on matrices (Linear weights, embeddings), none on biases and LayerNorm gains
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = (str(device_type).startswith("cuda")
                 and "fused" in inspect.signature(torch.optim.AdamW).parameters)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def estimate_mfu(self, tokens_per_iter, dt, device_name=None):
        """Model flops utilization: achieved flops over the GPU's bf16 dense peak (PaLM appendix B estimate).
        None when the device is not in PEAK_FLOPS (a CPU, say)."""
        peak = peak_flops(device_name)
        if peak is None or dt <= 0:
            return None
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * self.get_num_params() + 12 * L * H * Q * T
        return flops_per_token * tokens_per_iter / dt / peak

    def _forward_sampling(self, idx, positions, attn_mask, kv_cache=None, last_only=False):
        """Sampling path: explicit positions (B, T) and mask (B, 1, T, S) -> logits (B, T, vocab), or with
        last_only only the last position's (B, 1, vocab), all that sampling needs."""
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        for i, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, kv_cache, i)
        if last_only:  # the output layer over a whole prompt is the prefill's largest tensor
            x = x[:, -1:, :]
        return self.lm_head(self.transformer.ln_f(x))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None,
                 use_cache=True, pad_token=0, generator=None):
        """Up to max_new_tokens ids sampled after each prompt of idx (a (B, T) tensor, or B id lists of any
        lengths), as B lists."""
        prompts = idx.tolist() if torch.is_tensor(idx) else [list(p) for p in idx]
        assert all(len(p) > 0 for p in prompts), "every prompt needs at least one token"
        device = self.lm_head.weight.device
        B = len(prompts)
        P = max(len(p) for p in prompts)
        total = P + max_new_tokens
        assert total <= self.config.block_size, (
            f"prompt of {P} + {max_new_tokens} new tokens exceeds block_size {self.config.block_size}")
        # short prompts are left-padded, and the padding is masked out of attention and out of the position
        # count, so each row is sampled exactly as if it were alone
        tokens = torch.full((B, total), pad_token, dtype=torch.long, device=device)
        valid = torch.zeros((B, total), dtype=torch.bool, device=device)  # False at the left padding
        for b, p in enumerate(prompts):
            tokens[b, P - len(p):P] = torch.tensor(p, dtype=torch.long)
            valid[b, P - len(p):] = True
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # each row's real tokens count from 0
        causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
        # key j is visible to query i when j <= i and j is not padding; every query also sees itself, so a
        # padding row never has all keys masked (a fully masked softmax gives NaN, and NaN * 0 is still NaN)
        mask = (causal[None] & valid[:, None, :]) | torch.eye(total, dtype=torch.bool, device=device)[None]
        mask = mask[:, None]  # (B, 1, total, total)

        kv_cache = KVCache(self.config, B, total) if use_cache else None
        finished = [False] * B
        out = [[] for _ in range(B)]
        for t in range(P, total):
            if use_cache:
                start = 0 if kv_cache.pos == 0 else t - 1  # first step: the whole prompt; then one token
                logits = self._forward_sampling(tokens[:, start:t], positions[:, start:t],
                                                mask[:, :, start:t, :], kv_cache, last_only=True)
                kv_cache.pos = t
            else:  # the whole sequence again, every step: slow, and the reference the cache must match
                logits = self._forward_sampling(tokens[:, :t], positions[:, :t], mask[:, :, :t, :t],
                                                last_only=True)
            logits = logits[:, -1, :].float()  # (B, vocab)
            next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            tokens[:, t] = next_token
            for b, token in enumerate(next_token.tolist()):  # one transfer per step, not one per row
                if not finished[b]:  # a row stops once it samples stop_token; the others go on
                    out[b].append(token)
                    finished[b] = token == stop_token
            if all(finished):
                break
        return out


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, vocab). temperature 0 means argmax (no division by zero)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # top_k over the vocabulary keeps everything
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest set whose mass reaches top_p
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


DTYPES = ("float32", "bfloat16")  # --dtype: the precision the matmuls and attention compute in


def default_dtype(device):
    """bfloat16 on CUDA (twice float32's speed or more on every GPU since Ampere), float32 elsewhere."""
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def autocast(device, dtype="float32"):
    """--dtype's context: with "bfloat16", autocast runs the matmuls and attention in bfloat16 on any device
    (CUDA, CPU, MPS) while the weights, the optimizer and the log-probs stay float32 (adpo.token_logps and
    the loss cast); with "float32", nothing; empty: the device's default."""
    dtype = dtype or default_dtype(device)
    assert dtype in DTYPES, f"dtype {dtype!r}: one of {', '.join(DTYPES)}"
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype))


def compile_model(model, batch_shape, device, dtype="float32"):
    """torch.compile(model) for training, or the model as it is, with a one-line warning, when compiling
    fails (no compiler, an unsupported GPU, an old torch)."""
    try:
        compiled = torch.compile(model)
        # compilation happens at the first call: one forward and backward in --dtype, as training runs
        idx = torch.zeros(batch_shape, dtype=torch.long, device=device)
        with autocast(device, dtype):
            _, loss = compiled(idx, idx)
        loss.backward()
    except Exception as e:  # noqa: BLE001 -- whatever the compiler's failure, training goes on eager
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        print(f"warning: torch.compile failed ({type(e).__name__}: {reason}); training without it")
        compiled = model
    model.zero_grad(set_to_none=True)  # the example's gradients are no training step
    return compiled


# bf16 dense peak flops, for MFU; the device name is torch.cuda.get_device_name()
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10": 125e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device_name=None):
    """bf16 dense peak flops of device_name (default: this GPU); None for a device not in PEAK_FLOPS."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, flops in PEAK_FLOPS.items():
        if key in device_name:
            return flops
    return None


# ----------------------------------------------------------------------------------------------------------
# a pretrained GPT-2 in the Hugging Face layout (checks.check_gpt2_folder validates a folder first)

# GPT-2's Conv1D weights, stored (in, out)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_gpt2_config(folder, block_size):
    """(GPTConfig of the GPT-2 in folder with block_size positions, GPT-2's token -> id)."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    config = GPTConfig(block_size=block_size, vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"],
                       n_head=cfg["n_head"], n_embd=cfg["n_embd"], bias=True)
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}  # GPT-2's <|endoftext|>: in both
    return config, {**spec["model"]["vocab"], **added}
