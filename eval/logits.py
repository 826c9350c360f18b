"""Next-token scores of a forward without holding its whole [B, L, vocab] logits at once.

A window of 16K tokens of a model with a 262k vocabulary (Gemma 3) has 17 GB of float32
logits; the harness needs only each prediction's NLL and argmax. `predictions(model, ids,
first)` runs the forward with the model's output layer deferred (the forward returns the final
hidden states; the layer is then applied to slices of CHUNK positions), whenever the logits
would exceed LARGE_LOGITS bytes, and returns the NLL and argmax of every prediction from
position `first` on. Under every protocol the forward may return fewer positions than it was
given (the prefill protocol returns them from its context's last position on,
cabattn.protocol): the caller's `first` must be among them.

Deferring is checked once per model against the model's own forward on a few tokens: a model
whose forward does more after its output layer than a final logit soft-cap
(`config.final_logit_softcapping`, Gemma 2) fails the check and is scored with its whole
logits, as before.
"""
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

LARGE_LOGITS = 2**30  # bytes of float32 logits above which the output layer is deferred
CHUNK = 1024  # positions per slice of the output layer
_CHECKED = weakref.WeakKeyDictionary()  # model -> whether deferring gives its own logits


@dataclass
class Predictions:
    """nll float64 [B, n] and argmax int64 [B, n] of the predictions from position `first` on
    (entry j: the prediction at position first + j, of token first + j + 1)."""
    nll: torch.Tensor
    argmax: torch.Tensor
    first: int


def _head(model):
    """(attribute name, module) of the model's output layer."""
    head = model.get_output_embeddings()
    name = next(name for name, module in model.named_children() if module is head)
    return name, head


@contextmanager
def deferred_head(model):
    """Within it, the model's forward returns its final hidden states where it returned logits;
    yields apply(hidden) -> logits, the output layer and the final soft-cap."""
    name, head = _head(model)
    cap = getattr(model.config, "final_logit_softcapping", None)
    setattr(model, name, torch.nn.Identity())
    if cap is not None:
        model.config.final_logit_softcapping = None
    try:
        def apply(hidden):
            logits = head(hidden)
            return logits if cap is None else cap * torch.tanh(logits / cap)
        yield apply
    finally:
        setattr(model, name, head)
        if cap is not None:
            model.config.final_logit_softcapping = cap


def can_defer(model) -> bool:
    """Whether the deferred output layer gives the model's own logits (checked once per model,
    on eight tokens; call it under the model's own attention)."""
    if model not in _CHECKED:
        device = next(model.parameters()).device
        ids = torch.arange(8, device=device)[None] % model.config.vocab_size
        with torch.no_grad():
            own = model(ids).logits
            with deferred_head(model) as apply:
                again = apply(model(ids).logits)
        _CHECKED[model] = bool(torch.allclose(own, again, rtol=1e-5, atol=1e-5))
    return _CHECKED[model]


def predictions(model, ids: torch.Tensor, first=None, defer: bool = False,
                **forward_kwargs) -> Predictions:
    """The NLL and argmax of every prediction of a forward over ids [B, L] from position
    `first` on (None: from the first position the forward returned), with the position the
    first of them is at (Predictions.first). forward_kwargs: e.g. context_length, passed to
    the forward. defer: the
    output layer may be deferred (can_defer(model), asked before a protocol replaced the
    model's attention); it is when the logits would be large."""
    batch, length = ids.shape
    large = batch * length * model.config.vocab_size * 4 > LARGE_LOGITS
    if not (large and defer):
        return _scores(lambda x: x, model(ids, **forward_kwargs).logits, ids, first)
    with deferred_head(model) as apply:
        hidden = model(ids, **forward_kwargs).logits
    return _scores(apply, hidden, ids, first)


def _scores(apply, out: torch.Tensor, ids: torch.Tensor, first) -> Predictions:
    """Predictions of positions first .. L - 2 from a forward's output `out` (logits, or hidden
    states that `apply` turns into logits) covering positions L - out.shape[1] .. L - 1."""
    length = ids.shape[1]
    offset = length - out.shape[1]  # the position of out[:, 0]
    first = offset if first is None else first
    if first < offset:
        raise ValueError(f"the forward returned predictions from position {offset} on; "
                         f"position {first} was asked for")
    nll, argmax = [], []
    for start in range(first, length - 1, CHUNK):
        end = min(start + CHUNK, length - 1)
        logits = apply(out[:, start - offset:end - offset]).float()
        nll.append(torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), ids[:, start + 1:end + 1], reduction="none").double())
        argmax.append(logits.argmax(-1))
    return Predictions(torch.cat(nll, 1), torch.cat(argmax, 1), first)
