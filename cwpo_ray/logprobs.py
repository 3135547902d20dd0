"""Pairs as token rows and their summed response log-probs (SFT and PO): pure torch, no Ray, no I/O.

A pair is scored as two sequences, ``prompt + chosen`` and ``prompt + rejected``: each in its own
row (``pair_batch``'s packing ``separate``, what fast attention kernels take), or packed with one
copy of a prompt per batch and several pairs per row (``shared_prefix``: fewer tokens, a 4D mask);
only the response tokens carry loss.
Truncation rule (one rule everywhere: SFT, reference pass, PO): the prompt is cut from the
LEFT to ``max_prompt_length`` tokens (the end of a prompt, next to the answer, matters most),
then the response (with EOS appended) is cut from the RIGHT so that prompt + response fits
``max_length``. At least one response token always stays.
With ``Lengths.chat`` the prompt is first put in the model's chat format (as generation does),
so an instruct model is trained on the sequences it is later asked to produce.

The losses themselves live in ``cwpo_ray.losses``; this module only feeds them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Lengths:
    """How a (prompt, response) becomes tokens: the limits, and the chat format or not."""

    max_prompt_length: int = 256
    max_length: int = 512
    chat: bool = False  # prompts in the tokenizer's chat template, when it has one

    def __post_init__(self):
        if not 1 <= self.max_prompt_length < self.max_length:
            raise ValueError(f"need 1 <= max_prompt_length < max_length, got {self.max_prompt_length}, "
                             f"{self.max_length}")


# ----------------------------------------------------------------------------- tokenizing

def truncate(prompt_ids: list[int], response_ids: list[int], lengths: Lengths) -> tuple[list[int], list[int]]:
    """Apply the truncation rule to one sequence."""
    prompt_ids = prompt_ids[-lengths.max_prompt_length:] if prompt_ids else []
    room = max(lengths.max_length - len(prompt_ids), 1)
    return prompt_ids, response_ids[:room]


def encode_responses(tokenizer, prompts: list[str], responses: list[str], lengths: Lengths,
                     add_eos: bool = True) -> tuple[list[list[int]], list[int]]:
    """Token ids of ``prompt + response`` for each row, and each row's prompt length in tokens.

    Prompt and response are tokenized separately (as TRL does) so the boundary is exact;
    the prompt gets the tokenizer's special tokens (e.g. BOS), the response EOS so the
    model learns to stop.
    """
    if lengths.chat and getattr(tokenizer, "chat_template", None):
        from cwpo_ray.generation import chat_texts  # the template brings its own special tokens

        prompt_ids = tokenizer(chat_texts(tokenizer, prompts), add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    ids, prompt_lens = [], []
    for p, r in zip(prompt_ids, response_ids):
        p, r = truncate(list(p), list(r) + eos, lengths)
        if not r:
            raise ValueError("a response has no tokens (empty text and no EOS token)")
        ids.append(p + r)
        prompt_lens.append(len(p))
    return ids, prompt_lens


def collate(ids: list[list[int]], prompt_lens: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``response_mask`` (1 on response tokens)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    response = torch.zeros((len(ids), width), dtype=torch.bool)
    for i, (x, p) in enumerate(zip(ids, prompt_lens)):
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        attention[i, :len(x)] = 1
        response[i, p:len(x)] = True
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response}


PACKINGS = ("shared_prefix", "separate")


def pair_batch(tokenizer, prompts, chosen, rejected, lengths: Lengths, pack: bool = True,
               row_tokens: int | None = None, packing: str = "shared_prefix") -> dict[str, torch.Tensor]:
    """The rows a batch of pairs goes through the model as: each response scored exactly as in its
    own sequence ``prompt + response``.

    ``packing="separate"``: each sequence in its own right-padded row, the n chosen then the n
    rejected (as TRL does), with an ordinary 2D padding mask, so any attention kernel runs it
    (SDPA's fused kernels, flash-attention). ``packing="shared_prefix"`` (below): fewer tokens
    computed, at the price of a 4D mask that only the eager and SDPA's math paths take.

    A *segment* is a prompt followed by responses that read it: ``prompt | chosen | rejected``, and
    with ``pack`` the responses of all pairs of the batch with the same prompt (its tokens then go
    through the model once), up to ``row_tokens`` tokens (default: twice the longest pair, which
    bounds the attention over a row). With ``pack`` several segments share a row, first fit, longest
    first, so rows are nearly full instead of padded to the longest. A 4D attention mask lets each
    response see only its own prompt and itself; positions restart per segment and continue from
    the prompt in each response. ``pack=False``: one pair per row, padded to the longest.

    Returns ``input_ids``, ``position_ids``, a boolean ``attention_mask`` (rows, 1, T, T) and per
    scored sequence (the n chosen, then the n rejected) ``seq_rows`` / ``pred_positions`` /
    ``labels`` / ``label_mask``: its row, where each of its tokens is predicted from, which token,
    and which entries are real.
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
    c_ids, c_plen = encode_responses(tokenizer, prompts, chosen, lengths)
    r_ids, r_plen = encode_responses(tokenizer, prompts, rejected, lengths)
    if packing == "separate":
        return _separate_rows(c_ids + r_ids, c_plen + r_plen, tokenizer.pad_token_id)
    n = len(c_ids)
    pair_prompts = [c[:p] for c, p in zip(c_ids, c_plen)]  # the prompt's cut does not depend on the response
    responses = [c[p:] for c, p in zip(c_ids, c_plen)] + [r[q:] for r, q in zip(r_ids, r_plen)]
    capacity = (row_tokens or 2 * max(len(c) + len(r) - q for c, r, q in zip(c_ids, r_ids, r_plen))) if pack else 0
    segments = _segments(pair_prompts, [len(x) for x in responses], capacity)
    sizes = [len(p) + sum(len(responses[k]) for k in members) for p, members in segments]
    rows = _first_fit(sizes, capacity)
    width, longest = max(sum(sizes[g] for g in row) for row in rows), max(len(x) for x in responses)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding
    owner = torch.full((len(rows), width), -1, dtype=torch.long)    # the response a token is of; -1: a prompt's
    seq_rows = torch.zeros(2 * n, dtype=torch.long)
    pred = torch.zeros((2 * n, longest), dtype=torch.long)
    labels = torch.zeros((2 * n, longest), dtype=torch.long)
    label_mask = torch.zeros((2 * n, longest), dtype=torch.bool)
    for i, row in enumerate(rows):
        at = 0
        for g in row:
            prompt, members = segments[g]
            P = len(prompt)
            input_ids[i, at:at + P], position_ids[i, at:at + P], segment[i, at:at + P] = torch.tensor(prompt), \
                torch.arange(P), g
            last, at = at + P - 1, at + P  # the prompt's last token predicts each response's first
            for k in members:
                tokens = responses[k]
                L = len(tokens)
                input_ids[i, at:at + L], position_ids[i, at:at + L] = torch.tensor(tokens), torch.arange(P, P + L)
                segment[i, at:at + L], owner[i, at:at + L], seq_rows[k] = g, k, i
                pred[k, :L] = torch.tensor([max(last, 0)] + list(range(at, at + L - 1)))
                labels[k, :L] = torch.tensor(tokens)
                label_mask[k, :L] = True
                label_mask[k, 0] = P > 0  # no prompt: the first token is predicted from nothing
                at += L
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    same_segment = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    reads = (owner[:, None, :] == -1) | (owner[:, :, None] == owner[:, None, :])  # its prompt, or itself
    mask = (causal & same_segment & reads) | torch.eye(width, dtype=torch.bool)  # padding: itself (no NaN rows)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask.unsqueeze(1),
            "seq_rows": seq_rows, "pred_positions": pred, "labels": labels, "label_mask": label_mask}


def _separate_rows(ids: list[list[int]], prompt_lens: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded row per sequence, in pair_batch's output format with a 2D attention mask."""
    rows = collate(ids, prompt_lens, pad_id)
    longest = max(len(x) - p for x, p in zip(ids, prompt_lens))
    pred = torch.zeros((len(ids), longest), dtype=torch.long)
    labels = torch.zeros((len(ids), longest), dtype=torch.long)
    label_mask = torch.zeros((len(ids), longest), dtype=torch.bool)
    for k, (x, p) in enumerate(zip(ids, prompt_lens)):
        L = len(x) - p
        pred[k, :L] = torch.arange(p - 1, p + L - 1).clamp(min=0)  # token t is predicted at t - 1
        labels[k, :L] = torch.tensor(x[p:])
        label_mask[k, :L] = True
        label_mask[k, 0] = p > 0  # no prompt: the first token is predicted from nothing
    return {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"],
            "seq_rows": torch.arange(len(ids)), "pred_positions": pred, "labels": labels, "label_mask": label_mask}


def _segments(prompts: list[list[int]], response_lens: list[int], capacity: int) -> list[tuple[list[int], list[int]]]:
    """(prompt tokens, the responses that read it), pair i's responses being i and n + i. With a
    ``capacity``, pairs with the same prompt share a segment while it has at most that many tokens."""
    n = len(prompts)
    segments, open_ = [], {}  # open_: prompt -> index of its segment still taking pairs
    for i, p in enumerate(prompts):
        size = response_lens[i] + response_lens[n + i]
        g = open_.get(tuple(p)) if capacity else None
        if g is not None and segments[g][2] + size <= capacity:
            segments[g][1].extend([i, n + i])
            segments[g][2] += size
        else:
            open_[tuple(p)] = len(segments)
            segments.append([p, [i, n + i], len(p) + size])
    return [(p, members) for p, members, _ in segments]


def _first_fit(sizes: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``sizes`` in bins of ``capacity`` tokens, first fit, largest first (0: one per bin)."""
    bins, room = [], []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        j = next((j for j, r in enumerate(room) if sizes[i] <= r), None) if capacity else None
        if j is None:
            bins.append([i])
            room.append(capacity - sizes[i])
        else:
            bins[j].append(i)
            room[j] -= sizes[i]
    return bins


def sft_batch(tokenizer, prompts, responses, lengths: Lengths) -> dict[str, torch.Tensor]:
    ids, plen = encode_responses(tokenizer, prompts, responses, lengths)
    return collate(ids, plen, tokenizer.pad_token_id)


# ----------------------------------------------------------------------------- log-probs

def _innermost(model):
    """The Hugging Face model under DDP / DeepSpeed / PEFT wrappers (for signature checks only)."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model
    return model


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(_innermost(model).forward).parameters


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token) over each row's response tokens, and the number of those tokens.

    ``model`` is a causal LM or anything that forwards like one (a DDP / DeepSpeed engine).

    Logits are only computed at the positions that predict a response token (``logits_to_keep`` as
    a boolean mask): prompt and padding positions never need the LM head, which on a 49k-token
    vocabulary is a large share of the compute (in packed rows the later segments' prompts sit
    between responses, so a range from the first response on would still cover them).
    ``logsumexp`` instead of a full log-softmax keeps one float per position instead of a
    vocabulary-wide tensor.
    """
    if "pred_positions" in batch:  # pairs (pair_batch): the chosen sequences, then the rejected
        mask = batch["attention_mask"]
        return _response_logps(model, batch["input_ids"], _mask_for(model, mask) if mask.dim() == 4 else mask,
                               batch.get("position_ids"), batch["seq_rows"], batch["pred_positions"],
                               batch["labels"], batch["label_mask"])
    ids = batch["input_ids"]
    pred = torch.arange(ids.shape[1] - 1).expand(ids.shape[0], -1)  # position t predicts token t+1
    return _response_logps(model, ids, batch["attention_mask"], None, torch.arange(ids.shape[0]), pred, ids[:, 1:],
                           batch["response_mask"][:, 1:])


def _response_logps(model, ids, attention, positions, seq_rows, pred, labels, label_mask
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scored sequence s: sum over j of log p(labels[s, j]) read at position pred[s, j] of
    row seq_rows[s], where label_mask[s, j]; and the count of such tokens."""
    device = next(_innermost(model).parameters()).device
    ids, attention, seq_rows, pred, labels, label_mask = (
        t.to(device) for t in (ids, attention, seq_rows, pred, labels, label_mask))
    rows = seq_rows.unsqueeze(1).expand_as(pred)
    keep = torch.zeros(ids.shape, dtype=torch.bool, device=device)  # the positions whose logits are read
    keep[rows[label_mask], pred[label_mask]] = True
    if not keep.any():  # nothing to score: one position all the same, so the shapes stay valid
        keep[0, -1] = True
    kwargs = {} if positions is None else {"position_ids": positions.to(device)}
    if _accepts(model, "logits_to_keep"):  # transformers flattens the kept positions to (kept, vocab)
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False, logits_to_keep=keep,
                       **kwargs).logits
    else:
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False, **kwargs).logits[keep]
    if logits.ndim != 2 or logits.shape[0] != int(keep.sum()):
        raise ValueError(f"{type(_innermost(model)).__name__} did not return one row of logits per kept "
                         f"position (logits_to_keep as a boolean mask); got shape {tuple(logits.shape)}")
    logits = logits.float()
    at = (keep.flatten().cumsum(0) - 1).view_as(keep)[rows, pred]  # row of each read in `logits`
    # One value per read; a row can be read twice (the last token of a prompt shared by the chosen
    # and the rejected response predicts the first token of each).
    reads = label_logps(logits, at[label_mask], labels[label_mask])
    sequence = label_mask.nonzero(as_tuple=True)[0]  # the sequence of each read, in the reads' order
    logps = torch.zeros(labels.shape[0], dtype=reads.dtype, device=device).index_add(0, sequence, reads)
    return logps, label_mask.sum(-1)


class _LabelLogps(torch.autograd.Function):
    """log_softmax(logits)[rows, labels] with a backward written out: autograd's own (logsumexp's,
    then the index's) allocates four vocabulary-wide tensors and adds two of them; this one
    allocates one (softmax, scaled in place): less memory traffic over the vocabulary, every step."""

    @staticmethod
    def forward(ctx, logits, rows, labels):
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, rows, labels)
        return logits[rows, labels] - lse[rows]

    @staticmethod
    def backward(ctx, grad):
        logits, rows, labels = ctx.saved_tensors
        per_row = torch.zeros(logits.shape[0], dtype=grad.dtype, device=grad.device).index_add_(0, rows, grad)
        grad_logits = torch.softmax(logits, dim=-1).mul_(-per_row.unsqueeze(1))  # d(-logsumexp)
        grad_logits.index_put_((rows, labels), grad, accumulate=True)  # d(the label's logit)
        return grad_logits, None, None


def label_logps(logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits, -1)[rows, labels]`` (one value per read) without the
    vocabulary-wide log-softmax: logsumexp forward, a one-allocation backward."""
    return _LabelLogps.apply(logits, rows, labels)


def _mask_for(model, mask: torch.Tensor) -> torch.Tensor:
    """pair_batch's boolean 4D mask in the form the model's attention takes."""
    inner = _innermost(model)
    implementation = getattr(inner.config, "_attn_implementation", "sdpa")
    if implementation == "eager":  # eager attention adds the mask to the scores
        dtype = next(inner.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    if implementation != "sdpa":
        raise ValueError(f"packing shared_prefix needs sdpa or eager attention (a 4D mask), not "
                         f"{implementation!r}: use packing separate")
    return mask


# ----------------------------------------------------------------------------- losses

def sft_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Token-mean negative log-likelihood of the response tokens, and the token count."""
    logps, counts = sequence_logps(model, batch)
    n = int(counts.sum())
    return -logps.sum() / max(n, 1), n


def po_loss(model, batch, ref_chosen, ref_rejected, weights, *, loss_type: str, beta: float,
            epsilon: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted PO loss of one pair batch (from ``pair_batch``) and TRL-named metrics.

    ``ref_*`` are the precomputed reference log-probs, ``weights`` the per-pair weights
    (confidence, or ones): the loss is ``mean(weights * per_pair)`` as in the paper.
    """
    from cwpo_ray.losses import implicit_rewards, preference_loss

    logps, counts = sequence_logps(model, batch)
    n = logps.shape[0] // 2
    device, dtype = logps.device, logps.dtype
    ref_chosen, ref_rejected, weights = (torch.as_tensor(t, dtype=dtype, device=device)
                                         for t in (ref_chosen, ref_rejected, weights))
    loss, per_pair = preference_loss(
        logps[:n], logps[n:], ref_chosen, ref_rejected, loss_type=loss_type, beta=beta, weights=weights,
        epsilon=epsilon, chosen_lengths=counts[:n].to(dtype), rejected_lengths=counts[n:].to(dtype))
    r_chosen = implicit_rewards(logps[:n], ref_chosen, beta)
    r_rejected = implicit_rewards(logps[n:], ref_rejected, beta)
    metrics = {
        "loss": float(loss.detach()),
        "loss_unweighted": float(per_pair.detach().mean()),
        "rewards/chosen": float(r_chosen.mean()),
        "rewards/rejected": float(r_rejected.mean()),
        "rewards/margins": float((r_chosen - r_rejected).mean()),
        "rewards/accuracies": float((r_chosen > r_rejected).float().mean()),
        "confidence/mean": float(weights.mean()),
        "tokens": float(counts.sum()),
    }
    return loss, metrics


@torch.no_grad()
def reference_logps(model, tokenizer, prompts, chosen, rejected, lengths: Lengths,
                    packing: str = "shared_prefix") -> dict[str, list]:
    """Reference log-probs of a pair batch, computed once without gradients."""
    batch = pair_batch(tokenizer, prompts, chosen, rejected, lengths, packing=packing)
    logps, counts = sequence_logps(model, batch)
    n = len(prompts)
    return {"ref_chosen_logps": logps[:n].tolist(), "ref_rejected_logps": logps[n:].tolist(),
            "chosen_tokens": counts[:n].tolist(), "rejected_tokens": counts[n:].tolist()}
