"""`server.api_key` protects the OpenAI routes; health stays open for probes."""

from __future__ import annotations

import openai
import pytest

from tests.integration.conftest import Server, start_server, stop_server


def test_api_key_is_required_when_configured(server: Server, tmp_path):
    gw = start_server(tmp_path / "keyed", env={
        "SDLOOP_ENGINE__URL": server.state()["engine_url"], "SDLOOP_SERVER__API_KEY": "s3cret"})
    try:
        wrong = openai.OpenAI(base_url=gw.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}])
        right = openai.OpenAI(base_url=gw.url + "/v1", api_key="s3cret", max_retries=0)
        reply = right.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.id.startswith("chatcmpl-")
        assert gw.request("GET", "/healthz")[0] == 200
    finally:
        stop_server(gw)
