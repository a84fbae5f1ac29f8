"""With `feedback.redact` on, personal data never reaches the store."""

from __future__ import annotations

import json

from tests.harness.server import Server, start_gateway, wait_for_rows


def test_redaction_switch_keeps_personal_data_out_of_the_store(server: Server, tmp_path):
    with start_gateway(server, tmp_path / "redacting", {"SDLOOP_FEEDBACK__REDACT": "true"}) as gw:
        status, _, body = gw.request("POST", "/v1/chat/completions", {
            "model": "default", "max_tokens": 8,
            "messages": [{"role": "user", "content": "I am ann@example.com, call +1 415 555 0100."}]})
        assert status == 200
        reply = json.loads(body)
        status, _, _ = gw.request("POST", "/v1/feedback", {
            "completion_id": reply["id"], "type": "critique",
            "text": "Card 4111 1111 1111 1111 was charged", "metadata": {"mail": "ann@example.com"}})
        assert status == 201

        rows = wait_for_rows(gw, f"SELECT messages, prompt_token_ids FROM completions "
                                 f"WHERE id = '{reply['id']}'")
        assert rows[0]["messages"][0]["content"] == "I am [EMAIL], call [PHONE]."
        assert rows[0]["prompt_token_ids"] is None  # the ids would spell the address
        fb = gw.sql("SELECT text, metadata FROM feedback")
        assert fb == [{"text": "Card [CARD] was charged", "metadata": {"mail": "[EMAIL]"}}]
        dump = json.dumps(gw.sql("SELECT * FROM completions")) + json.dumps(fb)
        assert "ann@example.com" not in dump and "4111" not in dump
