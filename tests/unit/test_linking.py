from feedback.linking import content_text, context_hash, find_followup, reply_hash


def test_reply_hash_ignores_whitespace_differences():
    assert reply_hash("  Paris is\n the capital.  ") == reply_hash("Paris is the capital.")
    assert reply_hash("Paris") != reply_hash("paris")


def test_content_parts_hash_like_plain_text():
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    assert content_text(parts) == "Hello\nworld"
    assert context_hash([{"role": "user", "content": parts}]) == context_hash(
        [{"role": "user", "content": "Hello world"}])


def test_followup_found_only_after_an_assistant_reply():
    convo = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " A "},
             {"role": "user", "content": "No, B."}]
    ctx, rep, text = find_followup(convo)
    assert text == "No, B." and rep == reply_hash("A")
    assert ctx == context_hash([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])
    assert find_followup(convo[:1]) is None
    assert find_followup(convo[:2]) is None
    assert find_followup([*convo[:1], {"role": "assistant", "content": ""}, convo[2]]) is None
