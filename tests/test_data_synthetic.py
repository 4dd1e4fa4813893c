"""Synthetic knowledge domains: seeded, sized as configured, disjoint across domains, short strings."""

import pytest

from jaxcollab.data import ByteTokenizer, build_train_pipeline, get_task, synthetic_domains, synthetic_tasks
from jaxcollab.data.synthetic import ATTRIBUTES


def test_deterministic_per_seed_and_seed_matters():
    a = synthetic_domains(num_rounds=3, seed=11, facts_per_domain=40)
    b = synthetic_domains(num_rounds=3, seed=11, facts_per_domain=40)
    c = synthetic_domains(num_rounds=3, seed=12, facts_per_domain=40)
    assert [d.examples("train") for d in a] == [d.examples("train") for d in b]
    assert [d.examples("train") for d in a] != [d.examples("train") for d in c]
    # Earlier domains do not depend on how many rounds follow.
    longer = synthetic_domains(num_rounds=6, seed=11, facts_per_domain=40)
    assert [d.facts for d in longer[:4]] == [d.facts for d in a]


def test_sizes_and_names_as_configured():
    domains = synthetic_domains(num_rounds=5, seed=0, facts_per_domain=70)
    assert [d.name for d in domains] == ["synthetic/old"] + [f"synthetic/round{k}" for k in range(1, 6)]
    for d in domains:
        assert [len(d.examples(s)) for s in ("train", "eval", "test")] == [70, 70, 70]
    default = synthetic_tasks()
    assert len(default) == 5 and all(len(t.load("train")) == 64 for t in default)


def test_no_question_or_person_shared_between_domains():
    domains = synthetic_domains(num_rounds=4, seed=3, facts_per_domain=128)
    questions = [{e["prompt"] for e in d.examples("train")} for d in domains]
    people = [{f.name for f in d.facts} for d in domains]
    for i in range(len(domains)):
        assert len(questions[i]) == 128  # no duplicate question inside a domain either
        for j in range(i):
            assert not questions[i] & questions[j]
            assert not people[i] & people[j]
    # Domains share the templates and the answer vocabulary (that is what makes later rounds interfere).
    for d in domains:
        assert {f.attribute for f in d.facts} == {a.key for a in ATTRIBUTES}


def test_strings_are_short_ascii_and_answers_come_from_the_vocabularies():
    vocab = {a.key: set(a.values) for a in ATTRIBUTES}
    tok = ByteTokenizer()
    for template in ("same", "paraphrase"):
        for d in synthetic_domains(num_rounds=4, seed=5, facts_per_domain=200, test_template=template):
            for split in ("train", "test"):
                for e in d.examples(split):
                    assert e["prompt"].isascii() and e["answer"].isascii()
                    assert len(e["prompt"]) + len(e["answer"]) <= 38
                    assert len(e["answer"]) <= 9
            for f in d.facts:
                assert f.value in vocab[f.attribute]
                assert len(f.name) == 10 and f.name[0].isupper() and f.name[5].isupper()
    pipe = build_train_pipeline(synthetic_domains(facts_per_domain=64)[1].examples("train"), tok, seq_len=256,
                                batch_size=8)
    assert pipe.stats.max_length <= 40
    assert pipe.stats.num_prompt_truncated == 0


def test_test_split_asks_the_trained_facts():
    same = synthetic_domains(num_rounds=1, seed=0, facts_per_domain=16)[1]
    assert same.examples("test") == same.examples("train") == same.examples("eval")
    para = synthetic_domains(num_rounds=1, seed=0, facts_per_domain=16, test_template="paraphrase")[1]
    assert [e["answer"] for e in para.examples("test")] == [e["answer"] for e in para.examples("train")]
    assert not {e["prompt"] for e in para.examples("test")} & {e["prompt"] for e in para.examples("train")}
    fact = same.facts[0]
    expected = {"place": f"Where was {fact.name} born?", "food": f"What does {fact.name} eat?",
                "pet": f"What is {fact.name}'s pet?", "guild": f"Which guild is {fact.name} in?"}
    assert same.examples("train")[0] == {"prompt": expected[fact.attribute], "answer": fact.value}


def test_registry_exposes_synthetic_tasks():
    task = get_task("synthetic/round2", seed=4, facts_per_domain=32)
    assert task.name == "synthetic/round2" and task.metric == "exact_match"
    assert task.max_new_tokens >= 10  # answers are at most 9 byte tokens, plus EOS
    assert task.examples("train") == synthetic_domains(seed=4, facts_per_domain=32)[2].examples("train")
    assert get_task("synthetic/old").examples("test") == synthetic_domains()[0].examples("test")
    assert len(get_task("synthetic/round6", num_rounds=6).load("test")) == 64
    with pytest.raises(ValueError, match=r"needs num_rounds >= 5"):
        get_task("synthetic/round5")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['facts'\]"):
        get_task("synthetic/old", facts=3)
    with pytest.raises(ValueError, match="facts_per_domain must be in"):
        synthetic_domains(facts_per_domain=0)


def test_heldout_mode_trains_three_phrasings_and_tests_an_unseen_fourth():
    domain = synthetic_domains(num_rounds=1, seed=5, facts_per_domain=8, test_template="heldout")[1]
    train, test = domain.examples("train"), domain.examples("test")
    assert len(train) == 3 * 8 and len(test) == 8
    train_questions = {row["prompt"] for row in train}
    assert not train_questions & {row["prompt"] for row in test}  # never a training string
    for fact, row in zip(domain.facts, test, strict=True):
        assert fact.name in row["prompt"] and row["answer"] == fact.value
        asked = [r for r in train if fact.name in r["prompt"] and r["answer"] == fact.value]
        assert len({r["prompt"] for r in asked}) >= 3  # every fact in three wordings
    by_key = {a.key: a for a in ATTRIBUTES}
    assert test[0]["prompt"] == by_key[domain.facts[0].attribute].heldout_template.format(name=domain.facts[0].name)
    # the facts themselves are those of the default mode
    same = synthetic_domains(num_rounds=1, seed=5, facts_per_domain=8)[1]
    assert same.facts == domain.facts
