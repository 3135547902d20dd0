"""Property tests: arbitrary input never crashes the loaders or the losses; it is a row, a quarantine
reason, or a clear ValueError."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cwpo_ray.losses import bt_loss, confidence, preference_loss
from cwpo_ray.sources import (NORMALIZERS, Pair, Unjudged, a_is_chosen, pair_id, raw_json, split_hh, split_of)

text = st.one_of(st.text(), st.text(min_size=2000, max_size=5000), st.just(""), st.just("   "),
                 st.sampled_from(["\n\nAssistant:", "\n\nHuman:", "Assistant: hi", "\ud800", "🙂", "\x00"]))
value = st.one_of(text, st.none(), st.integers(), st.floats(allow_nan=True), st.booleans(),
                  st.lists(st.text(), max_size=3), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", 7]),
                                           "content": value}), max_size=4)
rows = st.dictionaries(
    st.sampled_from(["id", "prompt", "chosen", "rejected", "response_a", "response_b", "human_choice", "info",
                     "summaries", "choice", "prompt_id", "__invalid_json__"]),
    st.one_of(value, messages), max_size=8)


def check_result(result):
    assert isinstance(result, (Pair, Unjudged, str))
    if isinstance(result, str):
        assert result  # a quarantine reason is never empty
    else:
        assert all(isinstance(v, str) for v in result)
        assert result[1].strip()  # the prompt is never blank


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=rows)
def test_every_normalizer_returns_a_pair_or_a_reason(row):
    for normalize in NORMALIZERS.values():
        check_result(normalize(row))
    assert isinstance(raw_json(row), str)


@settings(max_examples=300, deadline=None)
@given(chosen=text, rejected=text)
def test_hh_split_never_crashes(chosen, rejected):
    result = split_hh(chosen, rejected)
    if not isinstance(result, str):
        prompt, c, r = result
        assert chosen.startswith(prompt) and rejected.startswith(prompt)


@settings(max_examples=200, deadline=None)
@given(pid=st.text(), seed=st.integers(0, 2**31), fraction=st.floats(0.01, 0.99))
def test_split_and_position_are_deterministic(pid, seed, fraction):
    assert split_of(pid, seed, fraction) == split_of(pid, seed, fraction)
    assert a_is_chosen(pid, seed) == a_is_chosen(pid, seed)


@settings(max_examples=200, deadline=None)
@given(p=st.text(), a=st.text(), b=st.text())
def test_pair_id_ignores_response_order(p, a, b):
    assert pair_id(p, a, b) == pair_id(p, b, a)


# log-probs as a model produces them (|x| up to 1e6), plus the non-finite values a bug could produce
floats = st.one_of(st.floats(-1e6, 1e6, width=32), st.sampled_from([float("nan"), float("inf"), float("-inf")]))


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.tuples(floats, floats, floats, floats, st.floats(0, 10)), min_size=1, max_size=6),
       loss_type=st.sampled_from(["dpo", "ipo", "rdpo"]))
def test_losses_are_finite_or_raise_clearly(values, loss_type):
    pc, pr, rc, rr, w = (torch.tensor(col, dtype=torch.float32) for col in zip(*values))
    lengths = torch.ones_like(pc)
    finite = all(math.isfinite(v) for row in values for v in row[:4])
    try:
        loss, per = preference_loss(pc, pr, rc, rr, loss_type=loss_type, weights=w,
                                    chosen_lengths=lengths, rejected_lengths=lengths)
    except ValueError as e:
        assert not finite and "NaN or infinite" in str(e)
        return
    assert finite
    assert torch.isfinite(loss) and torch.isfinite(per).all()


@settings(max_examples=200, deadline=None)
@given(a=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=8))
def test_confidence_in_unit_interval(a):
    ra = torch.tensor(a, dtype=torch.float64)
    rb = ra.flip(0)
    c = confidence(ra, rb)
    assert ((c >= 0) & (c <= 1)).all()
    assert torch.isfinite(bt_loss(ra, rb))
