from learner.responses import added_words, agrees


def test_added_words_are_what_the_correction_brings():
    q = "What is the capital of Quessany?"
    c = "No, that's not right. The capital of Quessany is Dalvorne."
    assert added_words(q, c) == {"dalvorne"}


def test_consistency_filter_keeps_answers_that_carry_the_fact():
    q = "Who discovered the element brightium?"
    c = "Wrong. Brightium was discovered by Mirela Voskuhl."
    assert agrees("It was Mirela Voskuhl who found it.", q, c)
    assert agrees("Voskuhl discovered it.", q, c)  # half of {mirela, voskuhl}
    assert not agrees("Brightium was discovered by Marie Curie.", q, c)
    assert agrees("anything", q, "Who discovered the element brightium?")  # nothing added
