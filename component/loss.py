"""A lean causal-LM loss: the output head runs only where there is a label.

In SFT most positions (system and user text, padding) carry no label, yet the
standard loss projects every position onto the whole vocabulary and keeps those
fp32 logits for the backward pass. Here the model runs with an empty
`logits_to_keep`, so its own head computes nothing; the decoder's last hidden
state is taken with a forward hook; the positions whose *shifted* label is set
are selected; and the head and cross-entropy run on those rows only, in chunks
of about `LOGITS_CHUNK_ELEMENTS` logits:
- a plain `nn.Linear` head (full, LoRA and QLoRA runs, whose head is not
  adapted or quantized): one fused step that returns the loss and computes the
  gradients of the hidden rows and of the head in the same pass, so no chunk's
  logits outlive that chunk and nothing is recomputed;
- any other head (an adapted or quantized one): each chunk checkpointed, so its
  logits are recomputed in the backward pass instead of kept.
The loss is the summed cross-entropy divided by `num_items_in_batch` when the
Trainer gives it (its token count over the accumulated batch and devices), else
by this batch's label count: the same normalisation as transformers' loss.

The forward still goes through the (DDP-, peft-) wrapped model, so gradient
checkpointing, DDP and peft behave as usual. What the lean path must know about
a model is data: `ModelTypeInfo.lean_loss`, and config keys that change logits
after the head (softcapping is applied here; other scalings fall back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from component.model_types import model_type_info
from component.template import IGNORE_INDEX

LOGITS_CHUNK_ELEMENTS = 1 << 24
"""Logits computed at once (rows x vocabulary): 64 MB in fp32 whatever the vocabulary."""
SOFTCAP_KEY = "final_logit_softcapping"
"""Config key of the tanh softcap on the final logits (Gemma 2/3): applied here."""
UNSUPPORTED_LOGIT_KEYS = ("logit_scale", "logits_scaling", "output_multiplier_scale", "lm_head_multiplier")
"""Config keys that rescale logits or head inputs inside the model's forward; when set, the standard loss is used."""


@dataclass
class HeadParts:
    """Where the lean loss takes the hidden states from and which head it applies."""

    decoder: nn.Module
    head: nn.Module
    softcap: Optional[float]


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / peft wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def find_head_parts(model: nn.Module) -> Optional[HeadParts]:
    """The decoder and the output head of a causal LM, or None where the lean loss must not be used."""
    lm = unwrap(model)
    config = getattr(lm, "config", None)
    if config is None or not model_type_info(getattr(config, "model_type", "")).lean_loss:
        return None
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in UNSUPPORTED_LOGIT_KEYS):
        return None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if head is None or decoder is None or decoder is lm:
        return None
    return HeadParts(decoder, head, getattr(config, SOFTCAP_KEY, None))


def _plain_linear(head: nn.Module) -> bool:
    weight = getattr(head, "weight", None)
    # type() not isinstance(): quantized linears subclass nn.Linear; ZeRO-3 leaves empty placeholders.
    return type(head) is nn.Linear and weight is not None and weight.numel() > 0


def _softcapped(logits: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    return logits if not softcap else torch.tanh(logits / softcap) * softcap


class _FusedHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T (+ bias)`, gradients computed chunk by chunk in forward.

    Each chunk's logits are turned into the softmax in place, so one (rows x
    vocabulary) fp32 buffer is live per chunk (logsumexp and exp would each make
    another). With a `sink` (a `TiedHeadGrad`), the weight's gradient is handed
    to it in backward instead of to autograd.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk, want_grads, sink=None):
        need_h, need_w = want_grads and ctx.needs_input_grad[0], want_grads and ctx.needs_input_grad[1]
        need_b = want_grads and bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(h, weight, bias).float()
            tanh = None
            if softcap:
                tanh = logits.div_(softcap).tanh_()
                logits = tanh * softcap
            rows = torch.arange(t.shape[0], device=t.device)
            picked = logits[rows, t]
            top = logits.amax(dim=-1)
            probs = logits.sub_(top[:, None]).exp_()  # in place: exp(logit - max)
            norm = probs.sum(dim=-1)
            total += (top + norm.log() - picked).sum()  # logsumexp - target logit
            if not (need_h or need_w or need_b):
                del logits, probs, tanh
                continue
            grad = probs.div_(norm[:, None])  # the softmax, still in the same buffer
            grad[rows, t] -= 1.0
            if softcap:
                grad *= 1.0 - tanh * tanh
            grad = grad.to(hidden.dtype)
            if need_h:
                grad_h[start : start + chunk] = grad @ weight
            if need_w and h.dtype == grad_w.dtype:
                grad_w.addmm_(grad.t(), h)  # in place: no (vocab x hidden) temporary per chunk
            elif need_w:
                grad_w += (grad.t() @ h).float()
            if need_b:
                grad_b += grad.float().sum(0)
            del logits, probs, grad, tanh  # before the next chunk's logits exist: one chunk live at a time
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.have = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.sink = sink
        return total

    @staticmethod
    def backward(ctx, grad_out):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("the lean loss's backward runs once: its gradients are scaled in place")
        ctx.consumed = True
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if have else None for have in ctx.have]
        # In place: the saved buffers are this call's own and die with it, so no (vocab x hidden) copy is made.
        grad_h = grads[0].mul_(grad_out.to(grads[0].dtype)) if grads[0] is not None else None
        grad_w = grads[1].mul_(grad_out).to(ctx.dtypes[0]) if grads[1] is not None else None
        grad_b = grads[2].mul_(grad_out).to(ctx.dtypes[1]) if grads[2] is not None else None
        if ctx.sink is not None and grad_w is not None:
            ctx.sink.add(grad_w)
            grad_w = None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _chunk_loss(head: nn.Module, softcap: Optional[float], hidden: torch.Tensor, targets: torch.Tensor):
    logits = _softcapped(head(hidden).float(), softcap)
    return F.cross_entropy(logits, targets, reduction="sum")


def head_cross_entropy_sum(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    softcap: Optional[float] = None,
    chunk_elements: Optional[int] = None,
    sink: Optional[TiedHeadGrad] = None,
):
    """Summed cross-entropy of the head applied to `hidden` rows (N, H) against `targets` (N,).

    `sink`: where the head weight's gradient goes instead of autograd (plain linear heads only).
    """
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    chunk = max(1, (chunk_elements or LOGITS_CHUNK_ELEMENTS) // max(vocab, 1))
    if _plain_linear(head):
        return _FusedHeadCrossEntropy.apply(
            hidden, head.weight, head.bias, targets, softcap, chunk, torch.is_grad_enabled(), sink
        )
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, softcap, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, softcap, h, t)
    return total


def labelled_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden rows (N, H) that predict a label, and those labels (N,): position t predicts labels[t + 1]."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def decoder_hidden_states(model: nn.Module, parts: HeadParts, inputs: dict) -> torch.Tensor:
    """Run the (wrapped) model with its head computing nothing; return the decoder's last hidden state."""
    captured = {}

    def keep(_module, _args, output):
        captured["hidden"] = output[0]

    handle = parts.decoder.register_forward_hook(keep)
    try:
        nothing = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
        model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=nothing, use_cache=False)
    finally:
        handle.remove()
    return captured["hidden"]


def lean_causal_lm_loss(
    model: nn.Module, parts: HeadParts, inputs: dict, num_items_in_batch=None, sink: Optional[TiedHeadGrad] = None
) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, without full-sequence logits."""
    hidden = decoder_hidden_states(model, parts, inputs)
    rows, targets = labelled_rows(hidden, inputs["labels"].to(hidden.device))
    total = head_cross_entropy_sum(rows, targets, parts.head, parts.softcap, sink=sink)
    if num_items_in_batch is None:
        return total / max(targets.numel(), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class TiedHeadGrad:
    """One (vocab x hidden) gradient buffer, not two, for an output head tied to the input embedding.

    Autograd sums a tied weight's two gradients in a buffer of its own: the
    head's (vocab x hidden, computed by the lean loss) waits there while the
    embedding lookup's, dense and as large, is made and added. For a 256k
    vocabulary that second buffer is the peak of the step. Here the embedding
    gives a sparse gradient (its rows only), the lean loss hands the head's
    gradient to `add` in backward instead of to autograd, and `flush` (right
    after backward) adds the two into that one buffer: `weight.grad` ends up
    exactly as autograd's sum.

    One process only: DDP all-reduces gradients as autograd finishes them, so
    a gradient added after backward would never be reduced (`usable` says so).
    """

    def __init__(self, weight: nn.Parameter, embedding: nn.Embedding):
        self.weight = weight
        self.embedding = embedding
        self.pending: Optional[torch.Tensor] = None

    @staticmethod
    def usable(parts: Optional[HeadParts], model: nn.Module, processes: int) -> Optional[nn.Embedding]:
        """The input embedding to pair with the head, or None where this does not apply."""
        if parts is None or processes != 1 or not _plain_linear(parts.head):
            return None
        lm = unwrap(model)
        embedding = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
        if not isinstance(embedding, nn.Embedding) or embedding.weight is not parts.head.weight:
            return None  # untied: each weight has its own gradient anyway
        return embedding if embedding.weight.requires_grad else None

    def add(self, grad: torch.Tensor) -> None:
        self.pending = grad if self.pending is None else self.pending.add_(grad)

    def flush(self) -> None:
        """Add the head's gradient to what autograd left in `weight.grad` (the embedding's, sparse)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        grad = self.weight.grad
        if grad is None:
            self.weight.grad = pending
        elif grad.is_sparse:
            self.weight.grad = pending.add_(grad)  # dense += sparse, in the head's buffer
        else:
            grad.add_(pending)

    def open(self) -> None:
        """The embedding lookup gives sparse gradients (from here until `close`; the trainer opens it in `train()`)."""
        self.embedding.sparse = True

    def close(self) -> None:
        """Give the embedding back its dense gradient (after training)."""
        self.flush()
        self.embedding.sparse = False
