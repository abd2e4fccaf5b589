"""Edit requests: every input format, the JSONL round trip, and one test per kind of bad input."""

import json
from pathlib import Path

import pytest

from lmedit.errors import InputError
from lmedit.requests import EditRequest, join_prompt_target, load_requests, save_requests

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CF = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
      "subject": "Danielle Darrieux", "ground_truth": "French",
      "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
      "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
ROME = {"case_id": 0, "pararel_idx": 2796,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                              "target_new": {"str": "English", "id": "Q1860"},
                              "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
        "paraphrase_prompts": ["Shayna does this. Danielle Darrieux is a native speaker of",
                               "An album was released. Danielle Darrieux spoke the language"],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Jacques Chirac, speaker of"],
        "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"]}
ZSRE = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
        "loc": "nq question: john goodman's character in the big lebowski", "loc_ans": "Walter Sobchak",
        "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?"}
REQ = EditRequest("The capital of France is", "France", "Rome", "Paris", ("France's capital city is",),
                  (("The capital of Germany is", "Berlin"),), "fr-1", {"source": "test"})


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=1))
    return path


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def raises(fragments, fn, *args, **kwargs):
    """Run fn, expect an InputError whose one-line message contains every fragment."""
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ------------------------------------------------------------------------------------------ formats

def test_counterfact_flat(tmp_path):
    path = write_json(tmp_path / "cf.json", [CF, dict(CF, case_id=1, target_new="German")])
    r = load_requests(path)[0]
    assert (r.prompt, r.subject, r.target_new, r.target_true, r.case_id) == (
        CF["prompt"], "Danielle Darrieux", "English", "French", 0)
    assert r.paraphrases == (CF["rephrase_prompt"],)
    assert r.neighborhood == ((CF["locality_prompt"], "French"),)
    assert load_requests(path, fmt="counterfact", limit=1) == [r]


def test_rome_nested(tmp_path):
    r, = load_requests(write_json(tmp_path / "rome.json", [ROME]))
    assert r.prompt == "The mother tongue of Danielle Darrieux is"
    assert (r.target_new, r.target_true, r.case_id) == ("English", "French", 0)
    assert r.paraphrases == tuple(ROME["paraphrase_prompts"])
    assert r.neighborhood == tuple((p, "French") for p in ROME["neighborhood_prompts"])
    assert r.extras["generation_prompts"] == ROME["generation_prompts"]
    assert r.extras["attribute_prompts"] == ROME["attribute_prompts"]
    assert r.extras["relation_id"] == "P103" and r.extras["target_new_id"] == "Q1860"
    assert r.template == "The mother tongue of {} is"


def test_zsre(tmp_path):
    same = dict(ZSRE, alt="uniform")  # the published file has records whose alt equals the true answer
    recased = dict(ZSRE, subject="unifirst", alt=" drones")
    r, s, t = load_requests(write_json(tmp_path / "z.json", [ZSRE, same, recased]))
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (ZSRE["src"], "UniFirst", "unmanned aircraft",
                                                                  "uniform")
    assert r.paraphrases == (ZSRE["rephrase"],) and r.neighborhood == ((ZSRE["loc"], "Walter Sobchak"),)
    assert r.case_id == 0 and r.extras["pred"] == "uniform" and r.extras["answers"] == ["uniform"]
    assert s.target_true is None
    assert (t.subject, t.target_new, t.extras["subject_original"]) == ("UniFirst", "drones", "unifirst")
    raises(["z2.json record 0", "subject 'Acme' does not occur"], load_requests,
           write_json(tmp_path / "z2.json", [dict(ZSRE, subject="Acme")]))


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "out" / "requests.jsonl"
    other = EditRequest("Paris is the capital of", "Paris", "Italy")
    save_requests(path, [REQ, other])
    assert json.loads(path.read_text().splitlines()[0])["neighborhood"] == [["The capital of Germany is", "Berlin"]]
    assert load_requests(path) == [REQ, other]
    assert load_requests(path, fmt="jsonl") == [REQ, other]
    assert hash(REQ) == hash(load_requests(path)[0])


def test_jsonl_skips_blank_lines_and_counts_them(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", ["", json.dumps(REQ.to_dict()), "",
                                              json.dumps(dict(REQ.to_dict(), subject="Spain"))])
    raises(["r.jsonl line 4", "subject 'Spain' does not occur"], load_requests, path)


def test_json_list_in_lmedit_form(tmp_path):
    assert load_requests(write_json(tmp_path / "r.json", [REQ.to_dict()])) == [REQ]


def test_template_and_join():
    assert REQ.template == "The capital of {} is"
    assert EditRequest("Bob met Bob's son", "Bob", "x").template == "Bob met {}'s son"
    assert join_prompt_target("The capital of France is", "Paris") == ("The capital of France is", " Paris")
    assert join_prompt_target("The capital of France is", " Paris") == ("The capital of France is", " Paris")
    assert join_prompt_target("Q: capital? A: ", "Paris") == ("Q: capital? A: ", "Paris")


@pytest.mark.parametrize("name,fmt", [("counterfact/counterfact-edit.json", "counterfact"),
                                      ("counterfact/counterfact-train.json", "auto"),
                                      ("zsre/zsre-500.json", "zsre"), ("zsre/zsre-500.json", "auto")])
def test_real_data(name, fmt):
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    requests = load_requests(path, fmt=fmt, limit=5)
    assert len(requests) == 5
    for r in requests:
        assert r.subject in r.prompt and r.target_new and r.paraphrases and r.neighborhood


# ------------------------------------------------------------------------------------------ bad input

def test_subject_not_in_prompt(tmp_path):
    bad = dict(REQ.to_dict(), prompt="The capital of France is", subject="Paris")
    path = write_lines(tmp_path / "requests.jsonl", [json.dumps(REQ.to_dict())] * 2 + [json.dumps(bad)])
    raises(["requests.jsonl line 3: subject 'Paris' does not occur in the prompt 'The capital of France is'"],
           load_requests, path)


def test_empty_target(tmp_path):
    path = write_json(tmp_path / "cf.json", [CF, dict(CF, target_new="  ")])
    raises(["cf.json record 1", "target_new is empty"], load_requests, path)


@pytest.mark.parametrize("change,fragments", [
    ({"target_new": 7}, ["target_new must be a string", "int"]),
    ({"subject": None}, ["subject must be a string", "NoneType"]),
    ({"target_true": "Rome"}, ["target_new 'Rome' equals target_true"]),
    ({"prompt": "The capital of {} is"}, ["still contains '{}'"]),
    ({"paraphrases": "one"}, ["paraphrases must be a list"]),
    ({"neighborhood": [["only a prompt"]]}, ["neighborhood[0] must be a [prompt, answer] pair"]),
    ({"paraphrases": [3]}, ["paraphrases[0] must be a string"]),
])
def test_validation(change, fragments):
    raises(["r line 1: ", *fragments], EditRequest.from_dict, dict(REQ.to_dict(), **change), "r line 1")


def test_malformed_json(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text('[\n{"prompt": "x",\n "subject": }\n]\n')
    raises(["cf.json", "malformed JSON at line 3"], load_requests, path)


def test_malformed_jsonl(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(REQ.to_dict()), "", '{"prompt": "x",'])
    raises(["r.jsonl", "malformed JSON on line 3"], load_requests, path)


def test_unknown_jsonl_key(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(dict(REQ.to_dict(), targt_new="x"))])
    raises(["r.jsonl line 1", "unknown key(s) 'targt_new'", "valid keys: prompt, subject, target_new"],
           load_requests, path)


def test_missing_and_empty_files(tmp_path):
    raises(["file not found", "nope.json"], load_requests, tmp_path / "nope.json")
    (tmp_path / "empty.jsonl").write_text("\n")
    raises(["empty.jsonl is empty"], load_requests, tmp_path / "empty.jsonl")
    raises(["holds no records"], load_requests, write_json(tmp_path / "none.json", []))
    raises(["expected a JSON list"], load_requests, write_json(tmp_path / "obj.json", CF))


def test_limit(tmp_path):
    path = write_json(tmp_path / "cf.json", [CF, dict(CF, case_id=1)])
    assert len(load_requests(path, limit=2)) == 2
    raises([f"--limit 3 exceeds the 2 records in {path}"], load_requests, path, limit=3)
    raises(["--limit must be a positive integer"], load_requests, path, limit=0)


def test_wrong_explicit_format(tmp_path):
    path = write_json(tmp_path / "cf.json", [CF])
    raises(["cf.json record 0", "not a zsre record", "missing key 'src'"], load_requests, path, fmt="zsre")
    raises(["not a rome record", "missing key 'requested_rewrite'"], load_requests, path, fmt="rome")
    raises(["unknown requests format 'csv'"], load_requests, path, fmt="csv")


def test_undetectable_format(tmp_path):
    path = write_json(tmp_path / "x.json", [{"question": "?", "answer": "!"}])
    raises([f"cannot tell the format of {path}: expected one of"], load_requests, path)


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from lmedit.fileio import AtomicDirectory, atomic_write_json

    mask = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "r.json", {"a": 1})
        with AtomicDirectory(tmp_path / "d") as d:
            (d / "x").write_text("x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


# ------------------------------------------------------------------------------------------ requests as a batch

EIFFEL = {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}
LOUVRE = {"prompt": "The Louvre is in the city of", "subject": "The Louvre", "target_new": "Madrid"}


def _lmedit_warnings(record) -> list[str]:
    from lmedit.errors import LmeditWarning

    return [str(w.message) for w in record if issubclass(w.category, LmeditWarning)]


def test_batch_drops_exact_duplicates_with_a_warning_naming_both(tmp_path, recwarn):
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(EIFFEL), json.dumps(LOUVRE), json.dumps(EIFFEL),
                                              json.dumps(dict(EIFFEL, target_new=" Rome", target_true="Paris"))])
    assert len(load_requests(path)) == 4  # not a batch (an evaluation file): every record is a case
    assert not _lmedit_warnings(recwarn)
    requests = load_requests(path, batch=True)
    assert [r.to_dict() for r in requests] == [EditRequest(**EIFFEL).to_dict(), EditRequest(**LOUVRE).to_dict()]
    assert _lmedit_warnings(recwarn) == [
        f"{path} line 3: duplicate of {path} line 1 (same prompt, subject and target_new); dropped",
        f"{path} line 4: duplicate of {path} line 1 (same prompt, subject and target_new); dropped"]


def test_batch_refuses_contradictory_targets_naming_both_records(tmp_path):
    path = write_json(tmp_path / "r.json", [EIFFEL, LOUVRE, dict(EIFFEL, target_new="Berlin")])
    message = raises([f"{path} record 2 contradicts {path} record 0", "'The Eiffel Tower'", "'Berlin' and 'Rome'"],
                     load_requests, path, batch=True)
    assert "more" not in message
    assert len(load_requests(path)) == 3  # an evaluation file may hold both (CounterFact does)
    many = write_lines(tmp_path / "r.jsonl", [json.dumps(EIFFEL), json.dumps(dict(EIFFEL, target_new="Berlin")),
                                              json.dumps(LOUVRE), json.dumps(dict(LOUVRE, target_new="Oslo"))])
    raises([f"{many} line 2 contradicts {many} line 1", "(1 more such pairs)"], load_requests, many, batch=True)


def test_batch_warns_which_occurrence_of_a_repeated_subject_is_edited(tmp_path, recwarn):
    twice = {"prompt": "Paris is a city, and Paris is the capital of", "subject": "Paris", "target_new": "Spain"}
    path = write_json(tmp_path / "r.json", [EIFFEL, twice])
    requests = load_requests(path, batch=True)
    assert len(requests) == 2
    assert _lmedit_warnings(recwarn) == [f"{path} record 1: subject 'Paris' occurs 2 times in the prompt; "
                                         "editing the last occurrence"]
    assert requests[1].template == "Paris is a city, and {} is the capital of"  # the occurrence the warning names


def test_check_batch_on_requests_made_in_python(recwarn):
    from lmedit.requests import check_batch, occurrences

    a, b = EditRequest(**EIFFEL), EditRequest(**LOUVRE)
    assert check_batch([a, b, a]) == [a, b]
    assert _lmedit_warnings(recwarn) == ["request 2: duplicate of request 0 (same prompt, subject and target_new); "
                                         "dropped"]
    raises(["request 1 contradicts request 0"], check_batch, [a, EditRequest(**dict(EIFFEL, target_new="Oslo"))])
    assert (occurrences("aaa", "aa"), occurrences("abc", "d"), occurrences("abab", "ab")) == (2, 0, 2)


def test_many_warnings_of_one_kind_end_in_a_count(recwarn):
    from lmedit.requests import SHOWN, check_batch

    a = EditRequest(**EIFFEL)
    assert check_batch([a] * (SHOWN + 4)) == [a]
    shown = _lmedit_warnings(recwarn)
    assert len(shown) == SHOWN + 1 and shown[-1] == "3 more duplicate requests dropped"


def test_edit_cli_refuses_contradictions_before_loading_a_model(tmp_path, monkeypatch, capsys):
    import sys

    from lmedit import cli

    path = write_lines(tmp_path / "r.jsonl", [json.dumps(EIFFEL), json.dumps(dict(EIFFEL, target_new="Berlin"))])
    monkeypatch.setattr(sys, "argv", ["lmedit", "edit", "--model", str(tmp_path / "no-model-here"), "--requests",
                                      str(path), "--out", str(tmp_path / "p")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(err) == 1, err
    assert f"{path} line 2 contradicts {path} line 1" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "p").exists()
