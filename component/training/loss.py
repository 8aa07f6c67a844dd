"""A lean causal-LM loss: the output head runs only where there is a label.

In SFT most positions (system and user text, padding) carry no label, yet the
standard loss projects every position onto the whole vocabulary and keeps those
fp32 logits for the backward pass. Here the model runs with an empty
`logits_to_keep`, so its own head computes nothing; the decoder's last hidden
state is taken with a forward hook; the positions whose *shifted* label is set
are selected; and the head and cross-entropy run on those rows only:
- a plain `nn.Linear` head (full, LoRA and QLoRA runs, whose head is not
  adapted or quantized): one fused step that returns the loss and computes the
  gradients of the hidden rows and of the head in the same call, so no logits
  outlive it and nothing is recomputed in backward. It walks the logits in
  chunks of rows (one pass) or in blocks of the vocabulary (a buffer of a few
  MB, and a second pass where the head's weight gradient is wanted), as
  `fused_plan` decides;
- any other head (an adapted or quantized one): chunks of about
  `LOGITS_CHUNK_ELEMENTS` logits, each checkpointed, so its logits are
  recomputed in the backward pass instead of kept.
The loss is the summed cross-entropy divided by `num_items_in_batch` when the
Trainer gives it (its token count over the accumulated batch and devices), else
by this batch's label count: the same normalisation as transformers' loss.

The trainer uses it through transformers' `compute_loss_func` hook (`LeanLoss`).
The forward still goes through the (DDP-, peft-) wrapped model, so gradient
checkpointing, DDP and peft behave as usual. What the lean path must know about
a model is data: `ModelTypeInfo.lean_loss`, and config keys that change logits
after the head (softcapping is applied here; other scalings fall back).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from component.data.collator import LABEL_ROWS
from component.data.template import IGNORE_INDEX
from component.model.model_types import model_type_info

LOGITS_CHUNK_ELEMENTS = 1 << 24
"""Logits computed at once (rows x vocabulary, or rows x a vocabulary block off the CPU): 64 MB in fp32."""
CPU_BLOCK_ELEMENTS = 1 << 18
"""Logits of one vocabulary block on the CPU (rows x columns): 1 MB in fp32, about one core's L2 cache."""
MIN_BLOCK_COLUMNS = 128
"""The narrowest vocabulary block, however many rows: narrower ones cost more in calls than they save."""
MIN_CHUNK_ROWS = 128
"""Fewer rows than this per row chunk, and the weight gradient's traffic (once per chunk) outweighs a second pass."""
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


def _module_class(module: nn.Module) -> type:
    """The module's own class: FSDP2 swaps it for `FSDP<Name>(FSDPModule, <Name>)` in place."""
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(module, FSDPModule):
            return type(module).__bases__[-1]
    return type(module)


def _plain_linear(head: nn.Module) -> bool:
    weight = getattr(head, "weight", None)
    # type() not isinstance(): quantized linears subclass nn.Linear; ZeRO-3 leaves empty placeholders.
    # An FSDP2 head counts: its weight is the gathered one until backward (accelerate keeps the head's
    # group gathered after forward). The chunked path would call the head module a second time, and
    # FSDP would then free the final norm's gathered weight before the norm's backward reads it.
    return _module_class(head) is nn.Linear and weight is not None and weight.numel() > 0


def _softcapped(logits: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    return logits if not softcap else torch.tanh(logits / softcap) * softcap


def _softcap_in_place(logits: torch.Tensor, softcap: Optional[float]):
    """fp32 logits softcapped (their buffer becomes the tanh), and the tanh for the softcap's slope; None without one."""
    if not softcap:
        return logits, None
    tanh = logits.div_(softcap).tanh_()
    return tanh * softcap, tanh


def _row_chunks(hidden, weight, bias, targets, softcap, rows, need):
    """Chunks of `rows` rows over the whole vocabulary, in one pass: per chunk, the loss and every gradient.

    Each chunk's logits are turned into the softmax in place, so one (rows x
    vocabulary) fp32 buffer is live per chunk (logsumexp and exp would each
    make another). The weight's gradient is read and written once per chunk.
    """
    need_h, need_w, need_b = need
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
    grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start : start + rows], targets[start : start + rows]
        logits, tanh = _softcap_in_place(F.linear(h, weight, bias).float(), softcap)
        index = torch.arange(t.shape[0], device=t.device)
        picked = logits[index, t]
        top = logits.amax(dim=-1)
        probs = logits.sub_(top[:, None]).exp_()  # in place: exp(logit - max)
        norm = probs.sum(dim=-1)
        total += (top + norm.log() - picked).sum()  # logsumexp - target logit
        if not any(need):
            del logits, probs, tanh
            continue
        grad = probs.div_(norm[:, None])  # the softmax, still in the same buffer
        grad[index, t] -= 1.0
        if softcap:
            grad *= 1.0 - tanh * tanh
        grad = grad.to(hidden.dtype)
        if need_h:
            grad_h[start : start + rows] = grad @ weight
        if need_w and h.dtype == grad_w.dtype:
            grad_w.addmm_(grad.t(), h)  # in place: no (vocab x hidden) temporary per chunk
        elif need_w:
            grad_w += (grad.t() @ h).float()
        if need_b:
            grad_b += grad.float().sum(0)
        del logits, probs, grad, tanh  # before the next chunk's logits exist: one chunk live at a time
    return total, grad_h, grad_w, grad_b, None


def _block_logits(hidden, weight, bias, softcap, start, columns):
    """fp32 logits of vocabulary entries [start, start + columns) for every row, softcapped; and the tanh, if any."""
    z = F.linear(hidden, weight[start : start + columns], None if bias is None else bias[start : start + columns])
    return _softcap_in_place(z.float(), softcap)


def _block_logit_grad(hidden, weight, bias, targets, softcap, stats, start, columns):
    """d(summed cross-entropy)/d(logits before the softcap) for one vocabulary block: softmax, minus 1 at the target."""
    lse, slope = stats
    z, tanh = _block_logits(hidden, weight, bias, softcap, start, columns)
    grad = z.sub_(lse[:, None]).exp_()  # in place: the softmax
    if softcap:
        grad.mul_(1.0 - tanh * tanh)
    # Minus the softcap's slope at each row's target, where it falls in this block (elsewhere minus 0):
    # a scatter, so no device sync to find those rows.
    local = targets - start
    inside = (local >= 0) & (local < grad.shape[1])
    grad.scatter_add_(1, local.clamp(0, grad.shape[1] - 1)[:, None], (slope * inside).neg_()[:, None])
    return grad


def _vocab_blocks(hidden, weight, bias, targets, softcap, columns, need):
    """Blocks of `columns` vocabulary entries over every row: a (rows x columns) buffer, whatever the vocabulary.

    A first pass gives each row's log-sum-exp (a running max and sum). With
    the hidden rows' gradient alone (a frozen head: LoRA, QLoRA; or a tied
    head whose weight gradient is deferred), that same pass also sums it,
    rescaled as the max moves, so one pass is all. With the weight's or the
    bias's gradient, a second pass recomputes each block's logits and writes
    its rows of the gradient once. Returns the loss, the three gradients, and
    `(lse, slope)`: what `DeferredWeightGrad` needs to make the weight's later.
    """
    need_h, need_w, need_b = need
    rows, device, vocab = hidden.shape[0], hidden.device, weight.shape[0]
    one_pass = need_h and not (need_w or need_b)
    same = hidden.dtype == torch.float32

    def add_times_weight(acc, grad, start):  # acc += (rows x block) @ (block x hidden), inputs in the model's dtype
        block = weight[start : start + columns]
        return acc.addmm_(grad, block) if same else acc.add_((grad.to(hidden.dtype) @ block).float())

    top = torch.full((rows,), float("-inf"), device=device)
    norm = torch.zeros(rows, device=device)
    acc = torch.zeros(hidden.shape, dtype=torch.float32, device=device) if one_pass else None
    for start in range(0, vocab, columns):
        z, tanh = _block_logits(hidden, weight, bias, softcap, start, columns)
        new_top = torch.maximum(top, z.amax(dim=-1))
        rescale = (top - new_top).exp_()
        e = z.sub_(new_top[:, None]).exp_()  # in place: exp(logit - running max)
        norm.mul_(rescale).add_(e.sum(dim=-1))
        if one_pass:
            if softcap:
                e.mul_(1.0 - tanh * tanh)
            add_times_weight(acc.mul_(rescale[:, None]), e, start)
        top = new_top
        del z, tanh, e
    lse = top + norm.log()
    # The target's logit, and the derivative of the softcap there (1 without one).
    target_rows = weight[targets].float()  # (rows x hidden): each row's target embedding, gathered once
    target_z = (hidden.float() * target_rows).sum(dim=-1)
    if bias is not None:
        target_z = target_z + bias[targets].float()
    slope = torch.ones_like(target_z)
    if softcap:
        target_tanh = torch.tanh(target_z / softcap)
        target_z, slope = target_tanh * softcap, 1.0 - target_tanh * target_tanh
    total, stats = (lse - target_z).sum(), (lse, slope)
    if one_pass:
        grad_h = acc.div_(norm[:, None]).sub_(slope[:, None] * target_rows)
        return total, grad_h.to(hidden.dtype), None, None, stats
    if not any(need):
        return total, None, None, None, stats
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=device) if need_h else None
    grad_w = torch.empty_like(weight, dtype=torch.float32) if need_w else None
    grad_b = torch.empty_like(bias, dtype=torch.float32) if need_b else None
    for start in range(0, vocab, columns):
        grad = _block_logit_grad(hidden, weight, bias, targets, softcap, stats, start, columns)
        if need_h:
            add_times_weight(grad_h, grad, start)
        if need_w and same:
            torch.mm(grad.t(), hidden, out=grad_w[start : start + columns])
        elif need_w:
            grad_w[start : start + columns] = grad.to(hidden.dtype).t() @ hidden
        if need_b:
            grad_b[start : start + columns] = grad.sum(dim=0)
        del grad
    return total, None if grad_h is None else grad_h.to(hidden.dtype), grad_w, grad_b, stats


@dataclass
class DeferredWeightGrad:
    """The head weight's gradient from one loss, made later: `add_to` adds `scale` x it to a dense buffer.

    It recomputes each vocabulary block's logits from the saved hidden rows and
    log-sum-exps (the cost of `_vocab_blocks`' second pass, moved), so the
    (vocabulary x hidden) gradient need not exist while the decoder's backward runs.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    targets: torch.Tensor
    softcap: Optional[float]
    stats: tuple
    columns: int
    scale: Optional[torch.Tensor] = None
    """The loss's gradient (1 / the label count, ...), known in backward."""

    @torch.no_grad()  # outside autograd's backward: its weight slices must not build a graph
    def add_to(self, out: torch.Tensor) -> None:
        fp32 = out.dtype == self.hidden.dtype == torch.float32
        for start in range(0, self.weight.shape[0], self.columns):
            grad = _block_logit_grad(
                self.hidden, self.weight, self.bias, self.targets, self.softcap, self.stats, start, self.columns
            )
            grad.mul_(self.scale.to(grad.dtype))
            block = out[start : start + self.columns]
            if fp32:
                block.addmm_(grad.t(), self.hidden)
            else:
                block.add_((grad.to(self.hidden.dtype).t() @ self.hidden).to(out.dtype))
            del grad


class _FusedHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T (+ bias)`, its gradients computed in forward.

    `plan` is `(_row_chunks, rows)` or `(_vocab_blocks, columns)` (see `fused_plan`).
    With a `sink` (a `TiedHeadGrad`), backward hands the weight's gradient to
    it instead of to autograd: made, under row chunks; under vocabulary blocks,
    as a `DeferredWeightGrad`, so it is not made until the sink's `flush`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, plan, want_grads, sink=None):
        need = [
            want_grads and ctx.needs_input_grad[0],
            want_grads and ctx.needs_input_grad[1],
            want_grads and bias is not None and ctx.needs_input_grad[2],
        ]
        method, size = plan
        # Vocabulary blocks make the weight's gradient in a second pass anyway: with a sink, that pass is deferred.
        defer = sink is not None and need[1] and method is _vocab_blocks
        need[1] = need[1] and not defer
        total, *grads, stats = method(hidden, weight, bias, targets, softcap, size, tuple(need))
        ctx.deferred = (
            DeferredWeightGrad(hidden.detach(), weight, bias, targets, softcap, stats, size) if defer else None
        )
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.have = tuple(g is not None for g in grads)
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
        if ctx.deferred is not None:
            ctx.deferred.scale = grad_out.detach()
            ctx.sink.add(ctx.deferred)
            ctx.deferred = None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def fused_plan(rows: int, vocab: int, device: torch.device, weight_grad: bool):
    """How the fused head walks the (rows x vocabulary) logits: `(_row_chunks, rows)` or `(_vocab_blocks, columns)`.

    Row chunks take one pass, but re-read and re-write the (vocabulary x hidden)
    weight gradient for every chunk. Vocabulary blocks keep a buffer of a few
    MB whatever the vocabulary, but need a second pass over the logits when the
    weight's gradient is wanted. So: vocabulary blocks without a weight
    gradient (a frozen head, evaluation), or when a row chunk would hold fewer
    than `MIN_CHUNK_ROWS` rows and there is more than one (a 256k vocabulary:
    65 rows); row chunks otherwise.
    """
    chunk_rows = max(1, LOGITS_CHUNK_ELEMENTS // max(vocab, 1))
    if weight_grad and (chunk_rows >= MIN_CHUNK_ROWS or rows <= chunk_rows):
        return _row_chunks, chunk_rows
    budget = CPU_BLOCK_ELEMENTS if device.type == "cpu" else LOGITS_CHUNK_ELEMENTS
    return _vocab_blocks, max(MIN_BLOCK_COLUMNS, budget // max(rows, 1))


def _chunk_loss(head: nn.Module, softcap: Optional[float], hidden: torch.Tensor, targets: torch.Tensor):
    logits = _softcapped(head(hidden).float(), softcap)
    return F.cross_entropy(logits, targets, reduction="sum")


def head_cross_entropy_sum(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    softcap: Optional[float] = None,
    sink: Optional[TiedHeadGrad] = None,
):
    """Summed cross-entropy of the head applied to `hidden` rows (N, H) against `targets` (N,).

    `sink`: where the head weight's gradient goes instead of autograd (plain linear heads only).
    """
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    if _plain_linear(head):
        weight_grad = torch.is_grad_enabled() and (
            head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)
        )
        plan = fused_plan(hidden.shape[0], vocab, hidden.device, weight_grad)
        return _FusedHeadCrossEntropy.apply(
            hidden, head.weight, head.bias, targets, softcap, plan, torch.is_grad_enabled(), sink
        )
    chunk = max(1, LOGITS_CHUNK_ELEMENTS // max(vocab, 1))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, softcap, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, softcap, h, t)
    return total


def labelled_rows(
    hidden: torch.Tensor, labels: torch.Tensor, rows: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden rows (N, H) that predict a label, and those labels (N,): position t predicts labels[t + 1].

    `rows`: those positions t, given by the padding-free collator for its one-row batch (LABEL_ROWS). Gathering
    them reads nothing back from the device; a boolean mask's result has a size the GPU must report to the host.
    """
    targets = labels[:, 1:]
    if rows is not None:
        rows = rows.to(hidden.device)
        return hidden[0].index_select(0, rows), targets[0].index_select(0, rows)
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def without_label_rows(inputs: dict) -> dict:
    """A batch without LABEL_ROWS, which is the loss's and not a model input."""
    return {k: v for k, v in inputs.items() if k != LABEL_ROWS} if LABEL_ROWS in inputs else inputs


def _no_logits(inputs: dict) -> dict:
    """The model's inputs with its head computing nothing and no cache."""
    nothing = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    return {**without_label_rows(inputs), "logits_to_keep": nothing, "use_cache": False}


@contextlib.contextmanager
def hidden_state_hook(parts: HeadParts) -> Iterator[dict]:
    """While open, every forward of the decoder leaves its last hidden state in the yielded dict."""
    captured: dict = {}

    def keep(_module, _args, output):
        captured["hidden"] = output[0]

    handle = parts.decoder.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


def decoder_hidden_states(model: nn.Module, parts: HeadParts, inputs: dict) -> torch.Tensor:
    """Run the (wrapped) model with its head computing nothing; return the decoder's last hidden state."""
    with hidden_state_hook(parts) as captured:
        model(**_no_logits({k: v for k, v in inputs.items() if k != "labels"}))
    return captured["hidden"]


def _normalised(total: torch.Tensor, count: int, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is None:
        return total / max(count, 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def lean_loss_from_hidden(
    hidden, labels, parts: HeadParts, num_items_in_batch=None, sink=None, label_rows=None
) -> torch.Tensor:
    rows, targets = labelled_rows(hidden, labels.to(hidden.device), label_rows)
    weight = getattr(parts.head, "weight", None)
    if weight is not None and weight.is_floating_point() and rows.dtype != weight.dtype:
        # fp32 hidden states under bf16 autocast (lora_fp32_output) and a bf16 head (the frozen base on the CPU):
        # the head runs in its weight's dtype, bf16, as autocast runs it inside the model's own forward.
        rows = rows.to(weight.dtype)
    total = head_cross_entropy_sum(rows, targets, parts.head, parts.softcap, sink=sink)
    return _normalised(total, targets.numel(), num_items_in_batch)


def lean_causal_lm_loss(
    model: nn.Module, parts: HeadParts, inputs: dict, num_items_in_batch=None, sink: Optional[TiedHeadGrad] = None
) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, without full-sequence logits."""
    hidden = decoder_hidden_states(model, parts, inputs)
    return lean_loss_from_hidden(hidden, inputs["labels"], parts, num_items_in_batch, sink, inputs.get(LABEL_ROWS))


class LeanLoss:
    """The lean loss as transformers' `compute_loss_func` (Trainer's public loss hook).

    The trainer runs the model's forward inside `capture()` with `model_inputs(...)`: no logits
    and the decoder's hidden state kept. The hook is then called with the model's outputs and the
    labels Trainer.compute_loss popped. A forward that wants logits never comes here: the trainer
    unsets the hook for it (component/training/trainer.py).
    """

    def __init__(self, parts: HeadParts, sink: Optional[TiedHeadGrad] = None):
        self.parts = parts
        self.sink = sink
        self._captured: Optional[dict] = None

    def model_inputs(self, inputs: dict) -> dict:
        """The batch for the model's forward; the collator's LABEL_ROWS, if any, kept for this loss."""
        if self._captured is not None and LABEL_ROWS in inputs:
            self._captured["label_rows"] = inputs[LABEL_ROWS]
        return _no_logits(inputs)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        with hidden_state_hook(self.parts) as captured:
            self._captured = captured
            try:
                yield
            finally:
                self._captured = None

    def __call__(self, outputs, labels, num_items_in_batch=None) -> torch.Tensor:
        hidden = self._captured.pop("hidden", None) if self._captured is not None else None
        if hidden is None:
            raise RuntimeError("LeanLoss called without a captured forward (run the model inside capture())")
        rows = self._captured.pop("label_rows", None)
        return lean_loss_from_hidden(hidden, labels, self.parts, num_items_in_batch, self.sink, rows)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Give the C allocator's free heap back to the OS (glibc's `malloc_trim`); False where there is none.

    glibc keeps freed blocks under its mmap threshold (up to 32 MB) in its heap.
    Right after the decoder's backward those are its activations: a buffer made
    then comes on top of them unless they are handed back first.
    """
    trim = _malloc_trim()
    return bool(trim is not None and trim(0) is not None)


class TiedHeadGrad:
    """One (vocab x hidden) gradient buffer, not two, for an output head tied to the input embedding.

    Autograd sums a tied weight's two gradients in a buffer of its own: the
    head's (vocab x hidden, computed by the lean loss) waits there while the
    embedding lookup's, dense and as large, is made and added. For a 256k
    vocabulary that second buffer is the peak of the step. Here the embedding
    gives a sparse gradient (its rows only); the lean loss hands the head's
    gradient to `add` in backward instead of to autograd; and `flush` (right
    after backward) adds the two into one buffer: `weight.grad` ends up as
    autograd's sum. Where the head works in vocabulary blocks, what it hands
    over is a `DeferredWeightGrad`, made by `flush` block by block once the
    decoder's backward has freed its activations.

    One process only: DDP all-reduces gradients as autograd finishes them, so
    a gradient added after backward would never be reduced (`usable` says so).
    """

    def __init__(self, weight: nn.Parameter, embedding: nn.Embedding):
        self.weight = weight
        self.embedding = embedding
        self.pending: list = []

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

    def add(self, grad) -> None:
        """The head's gradient: a tensor (row chunks) or a `DeferredWeightGrad` (vocabulary blocks)."""
        self.pending.append(grad)

    def flush(self) -> None:
        """Add the head's gradient to what autograd left in `weight.grad` (the embedding's, sparse, or a sum)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        grad = self.weight.grad.detach() if self.weight.grad is not None else None
        sparse = grad if grad is not None and grad.is_sparse else None
        if grad is None or sparse is not None:
            # A made gradient becomes the buffer; else one is made for the deferred ones.
            made = next((i for i, g in enumerate(pending) if torch.is_tensor(g)), None)
            if made is not None:
                grad = pending.pop(made)
            else:
                if self.weight.device.type == "cpu":
                    release_free_heap()  # 256k vocabulary: 50 MB lower peak RSS (bench/RESULTS.md)
                grad = torch.zeros_like(self.weight)
        for item in pending:
            grad.add_(item) if torch.is_tensor(item) else item.add_to(grad)
        if sparse is not None:
            grad.add_(sparse)  # dense += sparse, in place
        self.weight.grad = grad

    def open(self) -> None:
        """The embedding lookup gives sparse gradients (from here until `close`; the trainer opens it in `train()`)."""
        self.embedding.sparse = True

    def close(self) -> None:
        """Give the embedding back its dense gradient (after training)."""
        self.flush()
        self.embedding.sparse = False
