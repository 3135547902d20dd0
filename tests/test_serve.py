"""The annotator over HTTP: real requests to a Ray Serve app on the local cluster.

Serve starts once for the module with one app that requires a token (a second app without one
would cost another replica start; the no-token case of check_token is a plain unit test).
Small limits (max_pairs 8, max_body_bytes 4096) make the 4xx paths cheap.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from conftest import REPO, free_port
from tiny_models import synthetic_pairs

TOKEN = "s3cret-token-for-tests"
MAX_PAIRS = 8
MAX_BODY = 4096
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def annotator_dir(tiny_encoder, tmp_path_factory) -> Path:
    from cwpo_ray.annotator import new_annotator, save_annotator
    from cwpo_ray.models import resolve_model

    annotator = new_annotator(resolve_model(str(tiny_encoder)), max_length=32)  # short: long pairs get cut
    annotator.meta.metrics = {"accuracy": 0.5}
    return save_annotator(annotator, tmp_path_factory.mktemp("annotator"))


@pytest.fixture(scope="module")
def server(ray_cluster, annotator_dir):
    """Base URL of the app, deployed once through the recipe's start() as `cwpo serve` does it."""
    from ray import serve

    from cwpo_ray.recipes.serve import Config, start

    small = dict(max_pairs=MAX_PAIRS, max_body_bytes=MAX_BODY, num_cpus=0.25, batch_wait_timeout_s=0.05)
    os.environ["CWPO_API_TOKEN"] = TOKEN  # read when the app is built and handed to the replica
    try:
        yield start(Config(annotator=str(annotator_dir), port=free_port(), **small))
    finally:
        del os.environ["CWPO_API_TOKEN"]
        serve.shutdown()


def as_request(rows: list[dict]) -> list[dict]:
    return [{"id": r["id"], "prompt": r["prompt"], "response_a": r["chosen"], "response_b": r["rejected"]}
            for r in rows]


def expected_labels(annotator_dir, pairs: list[dict]) -> dict:
    from cwpo_ray.annotator import load_annotator

    return load_annotator(annotator_dir).label_pairs(
        [p["prompt"] for p in pairs], [p["response_a"] for p in pairs], [p["response_b"] for p in pairs])


def post(url: str, payload=None, *, data=None, headers=AUTH) -> requests.Response:
    return requests.post(f"{url}/v1/annotate", json=payload, data=data, headers=headers, timeout=60)


def get(url: str, path: str) -> requests.Response:
    return requests.get(f"{url}{path}", headers=AUTH, timeout=30)


# ----------------------------------------------------------------------------- scores


def test_scores_equal_annotator_label_pairs(server, annotator_dir):
    pairs = as_request(synthetic_pairs(5, seed=3))
    pairs.append({"prompt": "Tell me a long story. " * 20, "response_a": "yes", "response_b": "no"})  # cut
    r = post(server, {"pairs": pairs})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    want = expected_labels(annotator_dir, pairs)
    # One request's pairs form one batch, in order: the very same label_pairs call, bit for bit.
    for key in ("reward_a", "reward_b", "preferred", "confidence", "truncated"):
        assert [g[key] for g in got] == want[key], key
    assert [g["id"] for g in got[:5]] == [p["id"] for p in pairs[:5]]
    assert got[5]["truncated"] is True and got[5]["id"]  # absent id: generated


def test_single_pair_and_bare_list_forms(server, annotator_dir):
    from cwpo_ray.sources import pair_id

    pair = {"prompt": "Tell me about bees.", "response_a": "bees are great.", "response_b": "bees are bad."}
    single = post(server, pair).json()["results"]
    listed = post(server, [pair]).json()["results"]
    want = expected_labels(annotator_dir, [pair])
    assert single == listed
    assert single[0]["reward_a"] == want["reward_a"][0] and single[0]["confidence"] == want["confidence"][0]
    assert single[0]["id"] == pair_id(pair["prompt"], pair["response_a"], pair["response_b"])


def test_concurrent_requests_are_batched_together(server, annotator_dir):
    pairs = as_request(synthetic_pairs(16, seed=4))
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda p: post(server, p), pairs))
    assert all(r.status_code == 200 for r in responses)
    got = [r.json()["results"][0] for r in responses]
    want = expected_labels(annotator_dir, pairs)
    # Other batch companions change padding widths, hence float rounding only.
    assert [g["id"] for g in got] == [p["id"] for p in pairs]
    assert [g["reward_a"] for g in got] == pytest.approx(want["reward_a"], abs=1e-5)
    assert [g["reward_b"] for g in got] == pytest.approx(want["reward_b"], abs=1e-5)
    stats = get(server, "/v1/info").json()["replica_stats"]
    assert stats["most_requests_in_batch"] > 1, stats


# ----------------------------------------------------------------------------- metadata


def test_health_info_and_openapi(server):
    assert get(server, "/v1/health").json() == {"status": "ok"}
    info = get(server, "/v1/info").json()
    meta = info["annotator"]
    assert meta["pooling"] == "first" and meta["max_length"] == 32 and meta["metrics"] == {"accuracy": 0.5}
    assert meta["backbone"]
    assert info["limits"]["max_pairs"] == MAX_PAIRS and info["auth"] is True
    schema = get(server, "/openapi.json").json()
    assert "/v1/annotate" in schema["paths"] and "PairIn" in schema["components"]["schemas"]
    body = schema["paths"]["/v1/annotate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert len(body["oneOf"]) == 3


# ----------------------------------------------------------------------------- bad input

GOOD = {"prompt": "p", "response_a": "a", "response_b": "b"}
BAD_BODIES = [
    ("missing field", {"pairs": [{"prompt": "p", "response_a": "a"}]}, 422, "pairs[0].response_b"),
    ("wrong type", {**GOOD, "prompt": 7}, 422, "prompt"),
    ("wrong type in list", {"pairs": [GOOD, {**GOOD, "response_a": ["x"]}]}, 422, "pairs[1].response_a"),
    ("id not a string", {"pairs": [{**GOOD, "id": 5}]}, 422, "pairs[0].id"),
    ("empty string", {**GOOD, "response_b": ""}, 422, "response_b"),
    ("whitespace only", [{**GOOD, "prompt": "  \n"}], 422, "pairs[0].prompt"),
    ("lone surrogate", {**GOOD, "prompt": "\ud800"}, 422, "prompt"),
    ("unknown key", {**GOOD, "respnse_a": "x"}, 422, "respnse_a"),
    ("pairs not a list", {"pairs": "p"}, 422, "pairs"),
    ("no pairs", {"pairs": []}, 422, "pairs"),
    ("too many pairs", {"pairs": [GOOD] * (MAX_PAIRS + 1)}, 422, "pairs"),
    ("not an object", 42, 422, "body"),
    ("null", None, 422, "body"),
]


@pytest.mark.parametrize("case,payload,status,field", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_input_names_the_field(server, case, payload, status, field):
    r = post(server, data=json.dumps(payload), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and r.json()["error"]


@pytest.mark.parametrize("raw", [b"{", b"{'prompt': 1}", b"\xff\xfe\xfa", b"[" * 2000 + b"]" * 2000])
def test_invalid_json_is_400(server, raw):
    r = post(server, data=raw, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body", r.text


def test_oversized_body_is_413_declared_or_chunked(server):
    big = json.dumps({**GOOD, "prompt": "x" * MAX_BODY}).encode()
    r = post(server, data=big, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"
    chunked = post(server, data=iter([big[:1000], big[1000:]]), headers={**AUTH, "content-type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["field"] == "body"


def test_wrong_method_and_path_are_json_4xx(server):
    r = get(server, "/v1/annotate")
    assert r.status_code == 405 and "error" in r.json()
    r = get(server, "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def _mutations(rng: random.Random) -> list:
    values = [None, 0, -1, 1.5, True, "", " ", "x", [], {}, ["x"], {"a": 1}, "\u0000", "🙂" * 3]
    out = []
    for _ in range(40):
        body = dict(rng.choice([GOOD, {"pairs": [GOOD]}]))
        key = rng.choice(["prompt", "response_a", "response_b", "id", "pairs", "other"])
        if rng.random() < 0.3:
            body.pop(rng.choice(list(body)), None)
        else:
            body[key] = rng.choice(values)
        out.append(body)
    return out


def test_fuzzed_bodies_never_get_5xx(server):
    for body in _mutations(random.Random(0)):
        r = post(server, data=json.dumps(body), headers={**AUTH, "content-type": "application/json"})
        assert r.status_code < 500, (body, r.text)
        if r.status_code != 200:
            assert r.json()["field"], (body, r.text)


# ----------------------------------------------------------------------------- auth


def test_token_is_enforced(server):
    url = server
    assert requests.get(f"{url}/v1/health", timeout=30).status_code == 200  # open by design (probes)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic " + TOKEN}):
        r = post(url, GOOD, headers=headers)
        assert r.status_code == 401 and r.json()["field"] == "Authorization", (headers, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert requests.get(f"{url}/v1/info", timeout=30).status_code == 401
    assert requests.get(f"{url}/openapi.json", timeout=30).status_code == 401
    # Checked before the body is read: a bad body without a token is still a 401.
    assert post(url, data=b"{", headers={}).status_code == 401
    assert post(url, GOOD, headers=AUTH).status_code == 200
    assert post(url, GOOD, headers={"Authorization": f"bearer  {TOKEN} "}).status_code == 200  # scheme is case-blind


def test_no_token_configured_means_open():
    from cwpo_ray.serving import ApiError, check_token

    check_token(None, None)
    check_token("", "Bearer anything")
    with pytest.raises(ApiError):
        check_token("t\u00e9", "Bearer t")  # non-ASCII tokens compare as bytes, no TypeError


# ----------------------------------------------------------------------------- config and builder


def test_serve_config_yaml_is_valid_and_builds(annotator_dir):
    from ray.serve.schema import ServeDeploySchema

    from cwpo_ray.serving import build_app

    config = yaml.safe_load((REPO / "cluster" / "serve_annotator.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    app = schema.applications[0]
    assert app.import_path == "cwpo_ray.serving:build_app"
    assert config["http_options"]["host"] == "127.0.0.1"
    build_app({**app.args, "annotator": str(annotator_dir)})  # the YAML's args are all valid settings


def test_builder_args_are_typed_and_checked(annotator_dir):
    from cwpo_ray.config import ConfigError
    from cwpo_ray.serving import build_app, deployment_options, settings_from_args

    s = settings_from_args({"annotator": str(annotator_dir), "max_batch_size": "8", "max_replicas": "3"})
    assert s.max_batch_size == 8 and s.ongoing_limit() == 16
    assert deployment_options(s)["autoscaling_config"]["max_replicas"] == 3
    with pytest.raises(ConfigError, match="max_batch_sz"):
        build_app({"annotator": str(annotator_dir), "max_batch_sz": 8})
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        build_app({"annotator": str(annotator_dir), "max_batch_size": 32, "max_ongoing_requests": 5})


def test_cli_help_and_bad_flag(capsys):
    from cwpo_ray.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0 and "CWPO_API_TOKEN" in capsys.readouterr().out
    assert main(["serve", "--annotator", str(REPO), "--port", "0"]) == 2


# ----------------------------------------------------------------------------- fuzzing from the schema


def _fuzz(url: str, headers: dict, check, examples: int) -> int:
    """Every operation of the app's own OpenAPI schema, valid and invalid data; returns the calls made."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=AUTH, timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} == {"POST /v1/annotate", "GET /v1/health", "GET /v1/info"}
    calls = 0
    for op in operations:
        # Invalid data needs something to be invalid: the GETs take no parameters.
        for mode in GenerationMode if op.method.upper() == "POST" else [GenerationMode.POSITIVE]:
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def call(case):
                nonlocal calls
                calls += 1
                response = case.call(base_url=url, headers=headers, timeout=60)
                check(op.label, case, response)

            call()
    return calls


def test_schema_fuzz_with_token_never_5xx(server):
    """schemathesis, valid and invalid data: never a 5xx; errors carry a JSON body; 200s match the schema."""
    def check(label, case, response):
        assert response.status_code < 500, (label, case.body, response.text)
        if response.status_code >= 400:
            assert "error" in response.json(), (label, case.body, response.text)
        elif label == "POST /v1/annotate":
            results = response.json()["results"]
            assert results and all(r["preferred"] in ("a", "b") and 0 <= r["confidence"] < 1 for r in results)

    assert _fuzz(server, AUTH, check, examples=25) > 50


def test_schema_fuzz_without_token_is_always_401(server):
    """The same generated requests without the token: nothing but /v1/health answers, and never a 5xx."""
    def check(label, case, response):
        if label == "GET /v1/health":
            assert response.status_code == 200
        else:
            assert response.status_code == 401, (label, case.body, response.text)

    assert _fuzz(server, {"Authorization": ""}, check, examples=10) > 20


# ----------------------------------------------------------------------------- faults (last: restarts the replica)


def _replica_pids() -> set[int]:
    from conftest import pids_running

    return pids_running("ServeReplica", "Annotator")


def test_killed_replica_recovers_and_in_flight_requests_get_a_clean_error(server, annotator_dir):
    import signal
    import threading
    import time

    (pid,) = _replica_pids()
    pairs = as_request(synthetic_pairs(MAX_PAIRS, seed=9))
    want = expected_labels(annotator_dir, pairs)
    outcomes: list[tuple[float, float, int, str]] = []  # (sent, answered, status, body)
    stop = threading.Event()

    def client():
        while not stop.is_set():
            sent = time.monotonic()
            try:
                r = post(server, {"pairs": pairs})
                outcomes.append((sent, time.monotonic(), r.status_code, r.text))
            except requests.RequestException as e:  # a reset connection would be an unclean error
                outcomes.append((sent, time.monotonic(), -1, repr(e)))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(3)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    deadline = killed_at + 180
    while time.monotonic() < deadline and not any(s == 200 and sent > killed_at + 1 for sent, _, s, _ in outcomes):
        time.sleep(0.5)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join(timeout=120)

    done_before = [o for o in outcomes if o[1] < killed_at]
    in_flight = [o for o in outcomes if o[0] < killed_at <= o[1]]
    sent_after = [o for o in outcomes if o[0] >= killed_at]
    assert done_before and all(s == 200 for _, _, s, _ in done_before)
    errors = [(s, text) for _, _, s, text in in_flight + sent_after if s != 200]
    # A request the dead replica held gets a 5xx with a body from Serve's proxy, never a hang or a reset.
    assert all(500 <= s < 600 and text for s, text in errors), errors[:3]
    ok_after = [sent - killed_at for sent, _, s, _ in sent_after if s == 200]
    assert ok_after, "no request sent after the kill succeeded"
    (new_pid,) = _replica_pids()
    assert new_pid != pid
    print(f"reliability: serve, replica {pid} killed, new replica {new_pid}: {len(done_before)} requests answered "
          f"before (all 200); {len(in_flight)} in flight: {sum(s == 200 for _, _, s, _ in in_flight)} x 200; "
          f"{len(sent_after)} sent after: {sum(s == 200 for _, _, s, _ in sent_after)} x 200; errors "
          f"{sorted(s for s, _ in errors)} e.g. {errors[0][1][:60] if errors else ''!r}; first request sent after "
          f"the kill that succeeded was sent {min(ok_after):.1f} s after it")
    got = post(server, {"pairs": pairs}).json()["results"]
    assert [g["reward_a"] for g in got] == want["reward_a"] and [g["preferred"] for g in got] == want["preferred"]
