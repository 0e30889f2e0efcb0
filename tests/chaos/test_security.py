"""Security checks (normal suite): TLS with a certificate made here, token auth, per-connection
limits with their specific error codes, and no pickle anywhere. See SECURITY.md."""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import ssl
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from device_app.client import EdgeClient
from device_app.errors import EdgeConnectionError, EdgeError
from edge_server.daemon import EdgeConfig, EdgeServer
from shared.errors import ConfigError
from shared.protocol import ClientConnection, Hello, ServerConnection, encode
from shared.relay_plan import RelayPlan
from tests.chaos.helpers import REPO, TOKEN, EdgeProcess, self_signed_cert

SHORT = RelayPlan(4, 2, "ddim", 5.0)


# --------------------------------------------------------------------------- TLS


def test_wss_with_a_self_signed_certificate_and_plain_clients_refused(tiny_family_dir, device_bundle, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    trusting = ssl.create_default_context(cafile=str(cert))
    with EdgeProcess(tiny_family_dir, tmp_path, "--tls-cert", str(cert), "--tls-key", str(key)) as edge:
        wss = f"wss://127.0.0.1:{edge.port}"

        async def main():
            async with EdgeClient.connect(wss, device_bundle, token=TOKEN, ssl=trusting) as client:
                result = await client.generate("over tls", seed=1, pinned=SHORT, timeout=60)
            failures = {}
            for name, url, context in (
                ("plain ws:// to a wss server", edge.url, None),
                ("wss:// without trusting the certificate", wss, ssl.create_default_context()),
            ):
                started = time.monotonic()
                with pytest.raises(EdgeConnectionError) as info:
                    await EdgeClient.open(url, device_bundle, token=TOKEN, ssl=context, open_timeout=10)
                failures[name] = (info.value, time.monotonic() - started)
            return result, failures

        result, failures = asyncio.run(main())
        assert result.image.shape == (32, 32, 3)
        for name, (error, seconds) in failures.items():
            assert error.code in {"connect_failed", "connection_lost"}, (name, error)
            assert seconds < 10.5, (name, seconds)
        assert "CERTIFICATE_VERIFY_FAILED" in str(failures["wss:// without trusting the certificate"][0])
        assert edge.alive()
        print("\n[security] TLS: " + "; ".join(f"{n}: {e.code} in {s:.2f} s" for n, (e, s) in failures.items()))


def test_tls_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="go together"):
        EdgeConfig(tls_cert=str(tmp_path / "c")).ssl_context()
    with pytest.raises(ConfigError, match="cannot load TLS"):
        EdgeConfig(tls_cert=str(tmp_path / "c"), tls_key=str(tmp_path / "k")).ssl_context()


# --------------------------------------------------------------------------- token


def test_token_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("shared.protocol.connection.hmac.compare_digest", spy)
    for given, accepted in ((TOKEN, True), (TOKEN[:-1], False), (TOKEN + "x", False), (None, False)):
        server = ServerConnection(family_id="tiny", token=TOKEN)
        events = server.receive_text(encode(Hello(versions=(1,), family_id="tiny", client="t", token=given)), 0.0)
        assert (server.state == "open") is accepted
        if not accepted:
            assert events[0].error.code == "unauthorized" and server.close.code == 1008
    # Every check went through hmac.compare_digest, on bytes, against the configured token.
    assert len(calls) == 4 and all(b == TOKEN.encode() and isinstance(a, bytes) for a, b in calls)


def test_missing_wrong_and_empty_tokens_are_refused(tiny_family, device_bundle, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        EdgeConfig(token_file=str(tmp_path / "empty")).token()

    async def main():
        server = EdgeServer.with_batching_engine(tiny_family, EdgeConfig(port=0, token_file=str(token_file)))
        port = await server.start()
        url = f"ws://127.0.0.1:{port}"
        try:
            refused = {}
            for name, token in (("missing", None), ("wrong", "not-the-token"), ("prefix", TOKEN[:4])):
                with pytest.raises(EdgeConnectionError) as info:
                    await EdgeClient.open(url, device_bundle, token=token)
                refused[name] = info.value.code
            with pytest.raises(EdgeError) as info:  # an empty token never leaves the device
                await EdgeClient.open(url, device_bundle, token="")
            refused["empty (client side)"] = f"{info.value.code} local={info.value.local}"
            # ... and a hand-made hello with one is a protocol error that closes the connection.
            async with connect(url, compression=None) as ws:
                hello = json.loads(ClientConnection(family_id=tiny_family.family_id, token="x").data_to_send()[0])
                await ws.send(json.dumps({**hello, "token": ""}))
                answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
                refused["empty (raw hello)"] = answer["code"]
            async with EdgeClient.connect(url, device_bundle, token=TOKEN) as client:
                result = await client.generate("allowed", seed=1, pinned=SHORT, timeout=60)
            return refused, result
        finally:
            await server.stop()

    refused, result = asyncio.run(main())
    assert refused == {"missing": "unauthorized", "wrong": "unauthorized", "prefix": "unauthorized",
                       "empty (client side)": "bad_message local=True", "empty (raw hello)": "bad_message"}
    assert result.image.shape == (32, 32, 3)


# --------------------------------------------------------------------------- resource limits


def test_limits_answer_specific_codes_and_others_keep_being_served(tiny_family, device_bundle, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    limits = {"max_prompt_chars": 40, "max_steps": 100, "allowed_sizes": [[32, 32]], "max_in_flight": 2,
              "requests_per_minute": 6.0, "burst": 3}
    config = EdgeConfig(port=0, token_file=str(token_file), limits=limits)
    long = {"num_inference_steps": 100, "split": 100, "sampler": "ddim", "guidance_scale": 5.0, "decode_on": "device"}

    async def main():
        server = EdgeServer.with_batching_engine(tiny_family, config)
        port = await server.start()
        url = f"ws://127.0.0.1:{port}"
        try:
            # A hand-made client: the device client would refuse to send these (checked below).
            async with connect(url, compression=None, max_size=2**24) as ws:
                conn = ClientConnection(family_id=tiny_family.family_id, token=TOKEN)
                await ws.send(conn.data_to_send()[0])
                await ws.recv()  # welcome

                async def answer(frame: dict) -> dict:
                    await ws.send(json.dumps({"type": "generate", "preference": 0.5, **frame}))
                    while True:
                        raw = await asyncio.wait_for(ws.recv(), 30)
                        reply = json.loads(raw) if isinstance(raw, str) else {"type": "binary"}
                        if reply.get("request_id") == frame["request_id"] and reply["type"] in ("error", "handoff"):
                            return reply

                codes = {
                    "prompt too long": await answer({"request_id": "a", "prompt": "x" * 41}),
                    "too many steps": await answer({"request_id": "b", "prompt": "p", "steps": 101}),
                    "size not allowed": await answer({"request_id": "c", "prompt": "p", "height": 64, "width": 64}),
                }
                for rid in ("d", "e"):  # two long requests fill max_in_flight (and spend 2 of 3 tokens)
                    await ws.send(json.dumps({"type": "generate", "request_id": rid, "prompt": "p", "pinned": long}))
                codes["third in flight"] = await answer({"request_id": "f", "prompt": "p"})

                # Meanwhile another device is served normally.
                async with EdgeClient.connect(url, device_bundle, token=TOKEN) as other:
                    served = await other.generate("someone else", seed=2, pinned=SHORT, timeout=60)

                for rid in ("d", "e"):
                    await ws.send(json.dumps({"type": "cancel", "request_id": rid}))
                await asyncio.sleep(0.5)
                ok = await answer({"request_id": "g", "prompt": "p", "pinned": {**long, "num_inference_steps": 2,
                                                                                 "split": 1}})
                codes["rate limited"] = await answer({"request_id": "h", "prompt": "p"})
            # The device client refuses out-of-limit requests before sending them.
            async with EdgeClient.connect(url, device_bundle, token=TOKEN) as polite:
                with pytest.raises(EdgeError) as info:
                    await polite.generate("x" * 41)
                local = info.value
            return codes, ok, served, local
        finally:
            await server.stop()

    codes, ok, served, local = asyncio.run(main())
    assert codes["prompt too long"]["code"] == "invalid_request" and codes["prompt too long"]["field"] == "prompt"
    assert codes["too many steps"]["code"] == "invalid_request" and codes["too many steps"]["field"] == "steps"
    assert codes["size not allowed"]["code"] == "invalid_request" and codes["size not allowed"]["field"] == "height"
    assert codes["third in flight"]["code"] == "too_many_in_flight"
    assert codes["rate limited"]["code"] == "rate_limited" and codes["rate limited"]["retry_after_s"] > 0
    assert ok["type"] == "handoff"  # the third token: this one ran
    assert served.image.shape == (32, 32, 3)
    assert local.code == "invalid_request" and local.local
    print("\n[security] limits: " + ", ".join(f"{k} -> {v['code']}" for k, v in codes.items()))


# --------------------------------------------------------------------------- no pickle


_UNSAFE = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|shelve|marshal)\b"), "imports a pickle module"),
    (re.compile(r"\bpickle\.(loads?|Unpickler)\b"), "unpickles"),
    (re.compile(r"\bjoblib\.load\b"), "joblib.load unpickles"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle=True"),
    (re.compile(r"weights_only\s*=\s*False"), "torch.load weights_only=False"),
]


def test_no_pickle_anywhere_and_every_torch_load_is_weights_only():
    offenders = []
    files = [p for top in ("shared", "edge_server", "device_app", "export", "bench", "tests")
             for p in (REPO / top).rglob("*.py") if p.resolve() != Path(__file__).resolve()]
    assert len(files) > 40
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, why in _UNSAFE:
                if pattern.search(code):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {why}")
        for match in re.finditer(r"\btorch\.load\(", text):  # the call, up to its closing parenthesis
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            if not re.search(r"weights_only\s*=\s*True", text[match.start() : end + 1]):
                line = text.count("\n", 0, match.start()) + 1
                offenders.append(f"{path.relative_to(REPO)}:{line}: torch.load without weights_only=True")
    assert not offenders, "\n".join(offenders)
