import pytest

from hcpolicy.eval import TASKS, Sample, ordered_match, string_match

VALUES = ("48213", "90051", "13377", "62004", "75519")


def _sample(answers, task="niah_multivalue"):
    return Sample(
        task=task, context="ctx", question="q?", answer_prefix="The numbers are:", answers=answers, max_new_tokens=8,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        (" 48213, 90051, 13377, 62004 and 75519.", 1.0),
        (" 48213 and 62004.", 0.4),
        (" 75519 62004 13377 90051 48213", 1.0),  # order is not scored
        ("", 0.0),
        (" 482130, 4821, 148213", 0.0),  # inside a longer number or a prefix: no credit
        ("48213.", 0.2),  # punctuation around an answer is fine
    ],
)
def test_string_match(prediction, expected):
    assert string_match(VALUES, prediction) == pytest.approx(expected)


def test_string_match_ignores_case_but_not_word_boundaries():
    words = ("lantern", "quilt")
    assert string_match(words, " LANTERN, Quilt") == 1.0
    assert string_match(words, " lanterns, quilted") == 0.0
    assert string_match(("quiet-lantern",), "it is Quiet-Lantern.") == 1.0


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        (" 48213, 90051, 13377, 62004, 75519.", 1.0),
        (" 90051, 48213, 13377, 62004, 75519.", 0.8),  # one pair swapped
        (" 75519, 62004, 13377, 90051, 48213.", 0.2),  # reversed: one in place at best
        (" 48213, 13377, 62004, 75519.", 0.8),  # one missing
        (" 48213, 11111, 90051, 22222, 13377, 62004, 75519", 1.0),  # other numbers cost nothing
        (" 48213, 90051, 48213, 13377, 62004, 75519", 1.0),  # a repeat counts at its first place
        (" 13377, 62004, 75519, 48213, 90051", 0.6),  # rotated: the longest ordered run is 3
        (" the magic numbers are unknown", 0.0),
    ],
)
def test_ordered_match(prediction, expected):
    assert ordered_match(VALUES, prediction) == pytest.approx(expected)


def test_tasks_score_with_their_metric():
    swapped = " 90051, 48213, 13377, 62004, 75519."
    assert TASKS.get("drift")().score(_sample(VALUES, "drift"), swapped) == pytest.approx(0.8)
    assert TASKS.get("niah_multivalue")().score(_sample(VALUES), swapped) == 1.0
    assert TASKS.get("vt")().score(_sample(("ABCDE", "FGHIJ")), " abcde, FGHIJ") == 1.0
    assert TASKS.get("niah_single")().score(_sample(("4821",)), " 48213") == 0.0


def test_sample_validation():
    with pytest.raises(ValueError, match="answers"):
        _sample(())
    with pytest.raises(ValueError, match="answers"):
        _sample("48213")  # a bare string is not a tuple of answers
    with pytest.raises(ValueError, match="answers"):
        _sample(("48213", " "))
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sample(task="t", context="c", question="q", answer_prefix="a", answers=("x",), max_new_tokens=0)
    with pytest.raises(ValueError, match="question"):
        Sample(task="t", context="c", question="", answer_prefix="a", answers=("x",), max_new_tokens=1)
