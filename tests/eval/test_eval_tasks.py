import collections
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eval_helpers import COUNTERS, char4_tokens, whitespace_tokens
from hcpolicy.eval import BUILTIN_TASKS, TASKS, Task, tolerance
from hcpolicy.eval import _words
from hcpolicy.eval.haystack import Haystack, Insert

NIAH = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")


def test_registry_names_every_builtin_lazily():
    assert set(BUILTIN_TASKS) == {
        "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "drift",
    }  # fmt: skip
    for name in BUILTIN_TASKS:
        cls = TASKS.get(name)
        assert issubclass(cls, Task) and cls.name == name


def test_samples_are_deterministic(task):
    a = task.samples(seed=3, count=3, context_tokens=700, count_tokens=whitespace_tokens)
    b = task.samples(seed=3, count=3, context_tokens=700, count_tokens=whitespace_tokens)
    assert a == b
    assert len({s.full_text() for s in a}) == 3  # samples of one seed differ from each other
    other = task.samples(seed=4, count=1, context_tokens=700, count_tokens=whitespace_tokens)
    assert other[0].full_text() != a[0].full_text()
    # sample i does not depend on how many are asked for
    assert task.samples(seed=3, count=1, context_tokens=700, count_tokens=whitespace_tokens)[0] == a[0]


def test_a_seed_asks_the_same_question_at_every_length(task):
    short, long = (task.samples(5, 1, n, whitespace_tokens)[0] for n in (400, 3000))
    assert short.answers == long.answers and short.question == long.question
    assert len(long.context) > 4 * len(short.context)


@pytest.mark.parametrize("counter", sorted(COUNTERS))
@pytest.mark.parametrize("target", [300, 1000, 2500, 8000])
def test_prompt_length_is_within_tolerance(task, counter, target):
    count = COUNTERS[counter]
    for sample in task.samples(seed=1, count=2, context_tokens=target, count_tokens=count):
        tokens = count(sample.full_text())
        assert abs(tokens - target) <= tolerance(target), (tokens, target)
        assert sample.metadata["prompt_tokens"] == tokens and sample.metadata["target_tokens"] == target


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(BUILTIN_TASKS), target=st.integers(250, 5000), seed=st.integers(0, 10**6),
    counter=st.sampled_from(sorted(COUNTERS)),
)  # fmt: skip
def test_any_length_and_seed_fits(name, target, seed, counter):
    sample = TASKS.get(name)().samples(seed, 1, target, COUNTERS[counter])[0]
    assert abs(COUNTERS[counter](sample.full_text()) - target) <= tolerance(target)


def test_too_short_a_context_names_the_minimum(task):
    with pytest.raises(ValueError, match=r"too small for task .* at least (\d+) tokens") as info:
        task.samples(0, 1, 20, whitespace_tokens)
    minimum = int(re.search(r"at least (\d+)", str(info.value)).group(1))
    task.samples(0, 1, minimum, whitespace_tokens)  # the stated minimum works


def test_full_text_joins_context_question_and_prefix(task):
    s = task.samples(0, 1, 500, char4_tokens)[0]
    assert s.full_text() == f"{s.context}\n\n{s.question}\n{s.answer_prefix}"
    assert s.context + s.query_text() == s.full_text()
    assert not s.answer_prefix.endswith(" ")


@pytest.mark.parametrize("name", NIAH + ("drift",))
def test_needles_hold_the_answers_and_filler_has_no_digits(name):
    for s in TASKS.get(name)().samples(7, 4, 1200, whitespace_tokens):
        spans = s.metadata["needle_spans"]
        needles = [s.context[a:b] for a, b in spans]
        assert all(n.endswith(".") and "magic number" in n for n in needles)
        for answer in s.answers:
            assert sum(answer in n for n in needles) == 1
        hay = s.context
        for a, b in sorted(spans, reverse=True):
            hay = hay[:a] + hay[b:]
        assert not re.search(r"\d", hay)  # a number in the answer can only come from a needle


def test_niah_single_needle_names_the_asked_key():
    for s in TASKS.get("niah_single")().samples(0, 5, 800, whitespace_tokens):
        (key,) = s.metadata["keys"]
        assert f"The special magic number for {key} is {s.answers[0]}." in s.context
        assert key in s.question and key in s.answer_prefix
        assert 5 <= len(s.answers[0]) <= 7


def test_niah_multikey_has_distractors_with_other_keys():
    for s in TASKS.get("niah_multikey")(num_keys=4).samples(0, 5, 800, whitespace_tokens):
        keys, values = s.metadata["keys"], s.metadata["values"]
        assert len(set(keys)) == 4 and s.answers == (values[0],)
        for k, v in zip(keys, values):
            assert f"The special magic number for {k} is {v}." in s.context
        assert keys[0] in s.question and not any(k in s.question for k in keys[1:])


def test_niah_multivalue_lists_every_value_of_one_key():
    for s in TASKS.get("niah_multivalue")(num_values=3).samples(0, 5, 800, whitespace_tokens):
        (key,) = s.metadata["keys"]
        assert len(s.answers) == 3
        for v in s.answers:
            assert f"One of the special magic numbers for {key} is {v}." in s.context


def test_niah_multiquery_asks_for_several_keys():
    for s in TASKS.get("niah_multiquery")(num_keys=4, num_queries=3).samples(0, 5, 800, whitespace_tokens):
        keys, values = s.metadata["keys"], s.metadata["values"]
        assert s.answers == tuple(values[:3])
        assert all(k in s.question for k in keys[:3]) and keys[3] not in s.question


def test_vt_answers_are_exactly_the_variables_holding_the_value():
    for s in TASKS.get("vt")(num_chains=3, num_hops=3).samples(2, 5, 1500, whitespace_tokens):
        env: dict[str, str] = {}
        body = s.context.split("\n\n", 1)[1]  # after the header and its example
        for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", body):
            source = rhs.removeprefix("VAR ")
            assert rhs.isdigit() or source in env, "a variable is used before it is assigned"
            env[name] = rhs if rhs.isdigit() else env[source]
        value = re.search(r"value (\d+)", s.question).group(1)
        assert len(env) == 12  # 3 chains x 4 variables
        assert set(s.answers) == {n for n, v in env.items() if v == value}
        assert f"{len(s.answers)} variables" in s.answer_prefix


def test_cwe_answers_are_the_most_frequent_words():
    for target in (300, 2000, 6000):
        s = TASKS.get("cwe")().samples(0, 1, target, char4_tokens)[0]
        words = s.context.split("\n\n", 1)[1].rstrip(".").split(", ")
        counts = collections.Counter(words)
        top = counts.most_common()
        k = len(s.answers)
        assert {w for w, _ in top[:k]} == set(s.answers)
        assert top[k - 1][1] >= 2 * top[k][1]  # no near-ties with the first non-answer word
        assert len(words) == s.metadata["list_words"]


def test_drift_needles_are_spread_over_the_context():
    for s in TASKS.get("drift")().samples(0, 8, 2000, whitespace_tokens):
        depths = s.metadata["ordinal_depths"]
        assert [int(d * 5) for d in depths] == [0, 1, 2, 3, 4]  # the n-th needle in the n-th fifth
        for ordinal, value in zip(_words.ORDINALS, s.answers):
            assert f"The {ordinal} magic number is {value}." in s.context
        positions = [s.context.index(v) for v in s.answers]
        assert positions == sorted(positions)
        assert positions[0] < 0.25 * len(s.context) and positions[-1] > 0.75 * len(s.context)


def test_shuffled_drift_asks_in_another_order_than_the_text():
    shuffled = 0
    for s in TASKS.get("drift")(shuffle=True).samples(0, 8, 2000, whitespace_tokens):
        assert sorted(int(d * 5) for d in s.metadata["ordinal_depths"]) == [0, 1, 2, 3, 4]
        positions = [s.context.index(v) for v in s.answers]
        shuffled += positions != sorted(positions)
    assert shuffled >= 6


def test_task_settings_are_validated():
    with pytest.raises(ValueError, match="num_queries"):
        TASKS.get("niah_multiquery")(num_keys=3, num_queries=4)
    with pytest.raises(ValueError, match="num_needles"):
        TASKS.get("drift")(num_needles=11)
    with pytest.raises(ValueError, match="common_share"):
        TASKS.get("cwe")(common_share=0.95)
    with pytest.raises(ValueError, match="digits"):
        TASKS.get("niah_single")(digits=(7, 5))
    with pytest.raises(ValueError, match="max_new_tokens"):
        TASKS.get("vt")(max_new_tokens=0)


def test_templates_use_known_slots_only():
    known = {"name", "name2", "place", "place2", "noun", "noun2", "adj", "adj2", "verb", "time", "weather"}
    for template in _words.TEMPLATES:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
        assert fields <= known, template


def test_haystack_is_varied_prose_and_grows_by_appending():
    hay = Haystack(11)
    first = hay.sentences(400)
    assert Haystack(11).sentences(50) == first[:50]
    assert len(set(first)) > 390 and len({s.split()[0] for s in first}) > 30
    doc = hay.document(20, [Insert(0.0, "TOP."), Insert(1.0, "END."), Insert(0.5, "MID.")], header="Head.")
    assert doc.text.startswith("Head.\n\nTOP. ") and doc.text.endswith("END.")
    assert [doc.text[a:b] for a, b in doc.spans] == ["TOP.", "END.", "MID."]
    with pytest.raises(ValueError, match="depth"):
        Insert(1.5, "x")
