"""A small, self-contained GPT in the style of nanoGPT, plus a tiny training loop.

The model follows Andrej Karpathy's nanoGPT ``model.py`` closely -- same module
structure and attribute names -- so parameter paths read exactly as they do there
(``transformer.wte``, ``transformer.h.0.attn.c_attn``, ``lm_head``, ...).  That makes
it a realistic, familiar subject for a memory/parameter profiler: the numbers it
reports can be checked against a model many people already know.

The training loop feeds random tokens, because what matters here is the shape of the
computation (parameters, activations, gradients, optimizer state), not what the model
learns.  Run it directly::

    python examples/nanogpt.py                  # GPT-2-small-like, 2 x 256 tokens, 4 steps
    python examples/nanogpt.py --untied         # separate input/output embeddings
    python examples/nanogpt.py --n_layer 2 --n_embd 64 --n_head 2 --vocab_size 100 \\
        --block_size 32 --seq-len 16 --steps 2  # tiny, for a quick look

The module is importable without side effects: everything that trains lives in
``main()``, and the model classes are at module level so they can be built from a
tiny ``GPTConfig`` elsewhere.
"""

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

# ----------------------------------------------------------------------------- model


@dataclass
class GPTConfig:
    """Hyperparameters of the model.

    The defaults are GPT-2 small's depth and width (12 layers, 12 heads, 768 wide)
    with a 32k vocabulary and a 512-token context: big enough that embeddings and
    optimizer state are a visible share of memory, small enough to train on a CPU.
    """

    vocab_size: int = 32000
    block_size: int = 512
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2; False is a bit faster
    tie_weights: bool = True  # share the token embedding with the output projection


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's own cannot switch the bias off alone)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused query/key/value projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        # key, query, value projections for all heads, in one matrix multiply
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # regularization
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # batch size, sequence length, embedding width (n_embd)

        # query, key, values for all heads, with the head moved forward to be a batch dim
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

        # causal attention: (B, nh, T, hs) x (B, nh, hs, T) -> (B, nh, T, T) -> (B, nh, T, hs).
        # The fused kernel never materializes the T x T attention matrix where it can avoid it,
        # which is the single biggest activation-memory saving in a transformer.
        # attn_dropout is kept as a module (as in nanoGPT) but its rate is applied inside the kernel.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side

        # output projection
        y = self.resid_dropout(self.c_proj(y))
        return y


class MLP(nn.Module):
    """The position-wise feed-forward block: widen 4x, GELU, project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)
        x = self.gelu(x)
        x = self.c_proj(x)
        x = self.dropout(x)
        return x


class Block(nn.Module):
    """One pre-norm transformer layer: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """A decoder-only transformer language model, laid out as in nanoGPT."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config

        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # Weight tying (Press & Wolf, 2017): the input embedding and the output projection
            # are the same vocab_size x n_embd matrix. It usually helps quality a little and
            # saves a whole copy of the largest tensor in the model -- its weights, its
            # gradient and its two AdamW moments. Both module paths now name one Parameter,
            # so anything that counts parameters must count it once, not twice.
            self.transformer.wte.weight = self.lm_head.weight

        # init all weights
        self.apply(self._init_weights)
        # apply special scaled init to the residual projections, per the GPT-2 paper: each
        # block adds two outputs to the residual stream, so shrinking them by sqrt(2 * n_layer)
        # keeps the stream's variance from growing with depth
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Return the number of parameters in the model.

        ``self.parameters()`` yields a tied tensor once, so a shared embedding is counted
        once. For the non-embedding count the position embeddings are subtracted; the token
        embeddings are kept, as in nanoGPT, because with tying they are also the weights of
        the final layer.
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 initialization: N(0, 0.02) for Linear and Embedding weights, zero biases."""
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(logits, loss)`` for token ids ``idx`` of shape (batch, time).

        Logits cover every position, shape (batch, time, vocab_size). The loss is the
        cross-entropy over the full sequence when ``targets`` (same shape as ``idx``) are
        given, else None.
        """
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size, (
            f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        )
        pos = torch.arange(0, t, dtype=torch.long, device=device)  # shape (t)

        # forward the GPT model itself
        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss


# -------------------------------------------------------------------------- training


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def count_unique_params(model: nn.Module) -> int:
    """Count parameter elements, each distinct tensor once (a tied weight is one tensor)."""
    unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(p.numel() for p in unique.values())


def _int_at_least(minimum: int):
    """argparse type for sizes (at least 1: zero is always a typo) and --steps (0 allowed)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options: model shape, then how to train it."""
    defaults = GPTConfig()
    p = argparse.ArgumentParser(
        description="Train a nanoGPT-style model on random tokens for a few steps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = p.add_argument_group("model")
    model.add_argument("--n_layer", type=_positive_int, default=defaults.n_layer)
    model.add_argument("--n_head", type=_positive_int, default=defaults.n_head)
    model.add_argument("--n_embd", type=_positive_int, default=defaults.n_embd)
    model.add_argument("--vocab_size", type=_positive_int, default=defaults.vocab_size)
    model.add_argument("--block_size", type=_positive_int, default=defaults.block_size)
    model.add_argument("--untied", action="store_true", help="separate input embedding and output projection")
    model.add_argument("--no-bias", action="store_true", help="no biases in Linear and LayerNorm layers")
    model.add_argument("--dropout", type=float, default=defaults.dropout)

    train = p.add_argument_group("training")
    train.add_argument("--batch-size", type=_positive_int, default=2)
    train.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per sequence; at most --block_size")
    train.add_argument("--steps", type=_non_negative_int, default=4)
    train.add_argument("--device", default="auto", help="'auto' picks cuda when available, else cpu")
    train.add_argument(
        "--dtype",
        choices=["auto", *_DTYPES],
        default="auto",
        help="compute precision; 'auto' is fp16 mixed precision on CUDA, fp32 on CPU",
    )
    train.add_argument("--lr", type=float, default=3e-4)
    train.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, build the model and run a few optimizer steps, printing the loss."""
    parser = build_parser()
    args = parser.parse_args(argv)

    # Check arguments up front so a mistake is one clear line, not a traceback mid-model.
    if args.seq_len > args.block_size:
        parser.error(f"--seq-len ({args.seq_len}) must be <= --block_size ({args.block_size})")
    if args.n_embd % args.n_head != 0:
        parser.error(f"--n_embd ({args.n_embd}) must be divisible by --n_head ({args.n_head})")
    if not 0.0 <= args.dropout < 1.0:
        parser.error("--dropout must be in [0, 1)")

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but CUDA is not available")
    device_type = device.type

    dtype_name = args.dtype
    if dtype_name == "auto":
        dtype_name = "fp16" if device_type == "cuda" else "fp32"
    if dtype_name == "fp16" and device_type == "cpu":
        print(
            "warning: fp16 autocast on CPU is extremely slow (not when planned on fake tensors, "
            "python -m profiler --fake); consider --dtype bf16 or fp32",
            file=sys.stderr,
        )
    amp_dtype = _DTYPES[dtype_name]

    torch.manual_seed(args.seed)
    config = GPTConfig(
        vocab_size=args.vocab_size,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        dropout=args.dropout,
        bias=not args.no_bias,
        tie_weights=not args.untied,
    )
    model = GPT(config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=False)

    # Mixed precision: parameters stay fp32, matmuls run in the low-precision dtype.
    # fp16 has a narrow exponent range, so its gradients need loss scaling; bf16 does not.
    if dtype_name == "fp32":
        autocast = contextlib.nullcontext
    else:

        def autocast() -> contextlib.AbstractContextManager:
            return torch.autocast(device_type=device_type, dtype=amp_dtype)

    scaler = torch.amp.GradScaler(device_type) if dtype_name == "fp16" else None

    n_params = count_unique_params(model)
    print(
        f"nanogpt: device={device} dtype={dtype_name} params={n_params:,} "
        f"({'tied' if config.tie_weights else 'untied'}) batch={args.batch_size}x{args.seq_len} "
        f"layers={config.n_layer} heads={config.n_head} n_embd={config.n_embd} steps={args.steps}"
    )

    def sync() -> None:
        # CUDA runs asynchronously: wait for queued work so the timings are real.
        if device_type == "cuda":
            torch.cuda.synchronize(device)

    for step in range(args.steps):
        # Random tokens; targets are the inputs shifted left by one (next-token prediction).
        data = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
        x, y = data[:, :-1], data[:, 1:]

        sync()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            # Keep only the loss: holding the (batch, seq, vocab) logits until the next step's
            # forward returns would keep one more logits tensor alive through backward.
            loss = model(x, y)[1]
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        sync()
        dt = time.perf_counter() - t0
        print(f"step {step}: loss {loss.item():.4f}, {dt:.2f} s")

    return 0


if __name__ == "__main__":
    main()
