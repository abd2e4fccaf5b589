"""`lmedit ui`'s server through its HTTP API, on tiny random models: edits queue, bad input lands beside its field,
a failed edit leaves the model as it was, revert is exact, patches go out and come back as archives.

The app object is driven with Starlette's test client (no browser, no socket); tests/test_ui_browser.py drives
the real page in Chromium on the embedded model.
"""

from __future__ import annotations

import dataclasses
import io
import math
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from starlette.testclient import TestClient

from cli_helpers import assert_one_line_error, run_cli
from lmedit.editors import EDITORS, get_editor, make_config
from lmedit.evaluate.scoring import sum_logprob
from lmedit.errors import InputError
from lmedit.models.arch import get_module
from lmedit.patches import fingerprint
from lmedit.requests import EditRequest
from lmedit.ui import archive
from lmedit.ui.server import create_app
from lmedit.ui.session import Session

STATIC = Path(__file__).resolve().parents[1] / "src" / "lmedit" / "ui" / "static"
# ROME made to move a random model (as tests/test_locate.py does): no weight decay nor KL, a wide clamp, C = I.
FAST = {"layers": "1", "value.steps": "5", "value.lr": "1"}
OTHER = "identity_cov=true\nn_context=1\nvalue.clamp_norm_factor=200\nvalue.weight_decay=0\nvalue.kl_factor=0"
EIFFEL = {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
          "target_true": "Paris", "method": "rome", "settings": FAST, "other_settings": OTHER,
          "probes": ["The Eiffel Tower is in", ""]}
JAPAN = {**EIFFEL, "prompt": "The capital of Japan is", "subject": "Japan", "target_new": "London",
         "target_true": "Tokyo", "probes": []}


def _editable(lm):
    """Scale the random unembedding so an edit can move the tiny model's predictions (as test_locate does)."""
    with torch.no_grad():
        get_module(lm.model, lm.arch.unembed).weight.mul_(30.0)
    return lm


@pytest.fixture
def lm(tiny_model, tmp_cache):
    return _editable(tiny_model("llama"))


@pytest.fixture
def session(lm):
    return Session(lm)


@pytest.fixture
def client(session):
    return TestClient(create_app(session), headers={"X-Lmedit": "1"})


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, weights) -> bool:
    return all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def _p(lm, prompt: str, target: str) -> float:
    return math.exp(sum_logprob(lm.model, lm.tokenizer, [(prompt, target)])[0])


def _wait(client, job_id: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/api/jobs/{job_id}").json()
        if status["state"] in ("done", "failed"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {status}")


def _edit(client, form) -> dict:
    response = client.post("/api/edit", json=form)
    assert response.status_code == 202, response.text
    return _wait(client, response.json()["job"])


# ------------------------------------------------------------------ the page

def test_the_page_is_served_from_the_package_and_fetches_nothing_from_outside(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for path, name in (("/app.js", "app.js"), ("/style.css", "style.css")):
        response = client.get(path)
        assert response.status_code == 200 and response.text == (STATIC / name).read_text()
    assert {p.name for p in STATIC.iterdir()} == {"index.html", "app.js", "style.css"}  # all three served
    for file in STATIC.iterdir():
        text = file.read_text().replace('"http://www.w3.org/2000/svg"', "")  # the SVG namespace: a name, not a fetch
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, file.name


def test_info_lists_every_method_with_this_models_defaults(client, lm):
    info = client.get("/api/info").json()
    assert info["model"] == "tiny-llama" and info["layers"] == 4 and info["stack"] == []
    methods = {m["name"]: m for m in info["methods"]}
    assert set(methods) == set(EDITORS)
    assert all(m["fits"] for m in methods.values())
    assert methods["rome"]["settings"]["layers"] == ",".join(map(str, make_config("rome", lm.name, lm.model).layers))
    assert {"value.steps", "stats_n"} <= set(methods["memit"]["settings"]) and "epochs" in methods["ft"]["settings"]


def test_a_method_that_does_not_fit_is_refused_beside_the_method_field(tiny_model, tmp_cache):
    backpack = tiny_model("backpack-gpt2")  # no KV cache: the locate-then-edit methods cannot run on it
    client = TestClient(create_app(Session(backpack)), headers={"X-Lmedit": "1"})
    methods = {m["name"]: m for m in client.get("/api/info").json()["methods"]}
    assert not methods["rome"]["fits"] and "KV cache" in methods["rome"]["reason"]
    assert methods["ft"]["fits"]
    response = client.post("/api/edit", json={**EIFFEL, "method": "rome"})
    assert response.status_code == 400
    assert list(response.json()["errors"]) == ["method"]
    assert "does not fit" in response.json()["errors"]["method"] and "KV cache" in response.json()["errors"]["method"]


# ------------------------------------------------------------------ an edit, and its revert

def test_an_edit_raises_p_new_and_revert_brings_every_weight_back(client, lm):
    weights = _weights(lm.model)
    before_direct = _p(lm, EIFFEL["prompt"], "Rome")
    status = _edit(client, EIFFEL)
    assert status["state"] == "done", status
    result = status["result"]
    assert [r["prompt"] for r in result["before"]] == [EIFFEL["prompt"], "The Eiffel Tower is in"]  # blank dropped
    before, after = result["before"][0], result["after"][0]
    assert before["p_new"] == pytest.approx(before_direct, rel=1e-6, abs=1e-12)
    assert after["p_new"] > 5 * before["p_new"], (before, after)
    assert after["p_new"] == pytest.approx(_p(lm, EIFFEL["prompt"], "Rome"), rel=1e-6)  # the model now carries it
    assert before["p_true"] is not None and isinstance(after["completion"], str)
    assert "scoring the unedited prompts" in status["log"] and "editing with rome" in status["log"]
    [entry] = client.get("/api/patches").json()["stack"]
    assert entry["top"] and entry["method"] == "rome" and entry["requests"][0]["target_new"] == "Rome"
    assert entry["num_params"] > 0 and entry["meta"]["model"] == "tiny-llama"

    assert client.post(f"/api/patches/{entry['id']}/revert").json()["stack"] == []
    assert _same(lm.model, weights), "revert must restore every weight bit for bit"
    now = client.post("/api/probe", json={"prompts": [EIFFEL["prompt"]], "target_new": "Rome",
                                          "target_true": "Paris"}).json()["rows"][0]
    assert now["p_new"] == pytest.approx(before["p_new"], abs=1e-6)
    assert now["completion"] == before["completion"]


def test_a_prompt_may_hold_braces_for_the_subject(client):
    status = _edit(client, {**EIFFEL, "prompt": "{} is located in the city of"})
    assert status["state"] == "done", status
    assert status["result"]["request"]["prompt"] == EIFFEL["prompt"]


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("change,field,phrase", [
    ({"subject": "Big Ben"}, "subject", "does not occur in the prompt"),
    ({"target_new": "  "}, "target_new", "target_new is empty"),
    ({"target_true": "Rome"}, "target_new", "equals target_true"),
    ({"prompt": ""}, "prompt", "prompt is empty"),
    ({"method": "no-such"}, "method", "unknown method"),
    ({"settings": {**FAST, "layers": "9"}}, "setting:layers", "layer 9 is out of range"),
    ({"settings": {**FAST, "value.steps": "1"}}, "setting:value.steps", "value.steps must be an integer >= 2"),
    ({"settings": {**FAST, "value.lr": "fast"}}, "setting:value.lr", "value.lr"),
    ({"other_settings": "no_such_knob=1"}, "other_settings", "unknown setting 'no_such_knob'"),
    ({"other_settings": "just words"}, "other_settings", "expected key=value"),
    ({"probes": [1, 2]}, "probes", "list of prompts"),
    ({"target_new": 3}, "target_new", "must be text"),
])
def test_bad_input_is_one_message_beside_its_field(client, lm, change, field, phrase):
    weights = _weights(lm.model)
    response = client.post("/api/edit", json={**EIFFEL, **change})
    assert response.status_code == 400, response.text
    errors = response.json()["errors"]
    assert list(errors) == [field], errors
    assert phrase in errors[field] and "\n" not in errors[field] and "Traceback" not in response.text
    assert client.get("/api/info").status_code == 200  # still serving
    assert _same(lm.model, weights) and client.get("/api/patches").json()["stack"] == []


def test_a_body_that_is_not_json_and_an_unknown_job_are_one_line_errors(client):
    response = client.post("/api/edit", content=b"{not json")
    assert response.status_code == 400 and response.json() == {"errors": {"form": "the request body is not JSON"}}
    response = client.get("/api/jobs/99")
    assert response.status_code == 400 and "no edit job 99" in response.json()["errors"]["form"]
    response = client.post("/api/patches/1/revert")
    assert response.status_code == 400 and "no patch is applied" in response.json()["errors"]["form"]


def test_what_only_the_editor_refuses_comes_back_beside_its_field(client, lm):
    """ROME's one-layer rule is checked inside the editor, on the worker: the job fails, the field is named."""
    weights = _weights(lm.model)
    status = _edit(client, {**EIFFEL, "settings": {**FAST, "layers": "1,2"},
                            "other_settings": OTHER + "\nvalue.site=residual"})
    assert status["state"] == "failed"
    assert status["error"]["field"] == "setting:layers" and "exactly one layer" in status["error"]["message"]
    assert _same(lm.model, weights)


# ------------------------------------------------------------------ failures leave the model as it was

def test_a_failed_edit_leaves_the_model_as_it_was_and_the_worker_goes_on(client, lm, monkeypatch):
    import lmedit.locate.core as core

    weights = _weights(lm.model)

    def broken_solver(*args, **kwargs):  # fails after v* was found, in the middle of the real editor
        raise RuntimeError("solver exploded")

    monkeypatch.setattr(core, "equality_constrained", broken_solver)
    status = _edit(client, EIFFEL)
    assert status["state"] == "failed"
    assert status["error"] == {"field": "form", "message": "the edit failed: RuntimeError: solver exploded "
                                                           "(details in the server's log)"}
    assert _same(lm.model, weights) and client.get("/api/patches").json()["stack"] == []
    monkeypatch.undo()
    assert _edit(client, EIFFEL)["state"] == "done"  # the worker survived


def test_a_failure_after_the_patch_is_applied_takes_it_off_again(client, lm, monkeypatch):
    import lmedit.ui.session as session_module

    weights = _weights(lm.model)
    real, calls = session_module.probability_rows, []

    def fails_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # scoring the edited model
            raise RuntimeError("scorer exploded")
        return real(*args, **kwargs)

    monkeypatch.setattr(session_module, "probability_rows", fails_second_time)
    status = _edit(client, EIFFEL)
    assert status["state"] == "failed" and "scorer exploded" in status["error"]["message"]
    assert _same(lm.model, weights) and client.get("/api/patches").json()["stack"] == []


# ------------------------------------------------------------------ two edits at once

def test_two_concurrent_edits_queue_and_both_patches_are_correct(client, session, lm, tiny_model, monkeypatch):
    """Two tabs press Edit at once: the second waits (queued) while the first runs, the runs never overlap, and
    each patch equals what editing by hand one after the other gives (the second made on top of the first)."""
    from tqdm.auto import tqdm

    weights = _weights(lm.model)
    rome, release, runs = get_editor("rome"), threading.Event(), []

    def watched(model, tokenizer, requests, config, **kwargs):
        runs.append(["start", requests[0].target_new, time.monotonic()])
        patch = rome.fn(model, tokenizer, requests, config, **kwargs)
        with tqdm(total=4, desc="v* (watched)") as bar:
            bar.update(2)
            if len(runs) == 1:
                assert release.wait(60), "the test never released the first edit"
        runs.append(["end", requests[0].target_new, time.monotonic()])
        return patch

    monkeypatch.setitem(EDITORS, "rome", dataclasses.replace(rome, fn=watched))
    barrier, jobs = threading.Barrier(2), {}

    def press_edit(form):
        barrier.wait()
        jobs[form["target_new"]] = client.post("/api/edit", json=form).json()["job"]

    tabs = [threading.Thread(target=press_edit, args=(form,)) for form in (EIFFEL, JAPAN)]
    for t in tabs:
        t.start()
    for t in tabs:
        t.join(30)
    first, second = sorted(jobs.values())
    try:
        deadline = time.monotonic() + 30
        def holding() -> bool:
            return any(p["desc"] == "v* (watched)" for p in client.get(f"/api/jobs/{first}").json()["progress"])

        while not holding() and time.monotonic() < deadline:
            time.sleep(0.02)  # the first edit scores the prompts, edits, then holds inside the editor
        running, waiting = client.get(f"/api/jobs/{first}").json(), client.get(f"/api/jobs/{second}").json()
        assert running["state"] == "running" and waiting["state"] == "queued" and waiting["position"] == 1
        assert {"desc": "v* (watched)", "n": 2, "total": 4, "unit": "it"} in running["progress"]  # live progress
        [steps] = [p for p in running["progress"] if p["desc"] == "v* optimisation"]  # the real editor's Adam steps
        assert steps["total"] == 5 and 1 <= steps["n"] <= 5, steps
    finally:
        release.set()
    done = [_wait(client, first), _wait(client, second)]
    assert [d["state"] for d in done] == ["done", "done"], done
    assert [r[0] for r in runs] == ["start", "end", "start", "end"], runs  # one after the other, never overlapping
    assert runs[1][2] <= runs[2][2]

    # By hand, on an identical copy of the model: the first edit, then the second on top of it.
    ref = _editable(tiny_model("llama"))
    order = [d["result"]["request"] for d in done]
    expected, handles = [], []
    for request in order:
        config = make_config("rome", ref.name, ref.model, {**FAST, **dict(l.split("=") for l in OTHER.splitlines())})
        patch = rome.fn(ref.model, ref.tokenizer, [EditRequest.from_dict(request)], config, progress=False,
                        announce=lambda *_: None)
        expected.append(patch)
        handles.append(patch.apply(ref.model))
    stack = client.get("/api/patches").json()["stack"]
    assert [e["requests"][0]["target_new"] for e in stack] == [r["target_new"] for r in order]
    for got, want in zip([e.patch for e in session.stack.entries], expected, strict=True):
        assert list(got.deltas) == list(want.deltas)
        for name in want.deltas:
            torch.testing.assert_close(got.deltas[name].full(), want.deltas[name].full(), rtol=1e-5, atol=1e-8)
        assert got.meta["base_fingerprint"] == want.meta["base_fingerprint"]
    assert fingerprint(lm.model, list(expected[0].deltas)) == fingerprint(ref.model, list(expected[0].deltas))
    for d in done:  # each edit raised its own target
        assert d["result"]["after"][0]["p_new"] > 5 * d["result"]["before"][0]["p_new"]
    for entry in reversed(stack):
        assert client.post(f"/api/patches/{entry['id']}/revert").status_code == 200
    assert _same(lm.model, weights)


# ------------------------------------------------------------------ the patch stack: revert, save, load

def test_only_the_top_patch_is_reverted(client):
    for form in (EIFFEL, JAPAN):
        assert _edit(client, form)["state"] == "done"
    first, second = client.get("/api/patches").json()["stack"]
    assert not first["top"] and second["top"]
    response = client.post(f"/api/patches/{first['id']}/revert")
    assert response.status_code == 400 and "revert those first" in response.json()["errors"]["form"]
    assert len(client.get("/api/patches").json()["stack"]) == 2


def test_a_saved_patch_downloads_as_a_zip_and_loads_back(client, lm, tmp_path):
    weights = _weights(lm.model)
    after = _edit(client, EIFFEL)["result"]["after"][0]["p_new"]
    [entry] = client.get("/api/patches").json()["stack"]
    response = client.get(f"/api/patches/{entry['id']}/archive")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    assert 'filename="patch-1-rome-the-eiffel-tower-paris-rome.zip"' in response.headers["content-disposition"]
    names = zipfile.ZipFile(io.BytesIO(response.content)).namelist()
    assert sorted(names) == ["patch-1-rome-the-eiffel-tower-paris-rome/patch.json",
                             "patch-1-rome-the-eiffel-tower-paris-rome/patch.safetensors"]
    client.post(f"/api/patches/{entry['id']}/revert")
    assert _same(lm.model, weights)

    loaded = client.post("/api/patches", content=response.content, headers={"X-Filename": "my%20patch.zip"})
    assert loaded.status_code == 200, loaded.text
    assert [e["label"] for e in loaded.json()["stack"]] == ["rome: loaded from my patch.zip"]
    assert _p(lm, EIFFEL["prompt"], "Rome") == pytest.approx(after, rel=1e-6)
    again = client.post("/api/patches", content=response.content)  # on top of itself: not the base it was made on
    assert again.status_code == 400 and "different base model" in again.json()["errors"]["upload"]

    # a .tar.gz of the directory, as `tar czf` makes it, loads too
    client.post("/api/patches/2/revert")
    folder = tmp_path / "unzipped"
    zipfile.ZipFile(io.BytesIO(response.content)).extractall(folder)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as t:
        t.add(next(folder.iterdir()), arcname="my-patch")
    assert client.post("/api/patches", content=buffer.getvalue()).status_code == 200
    assert _p(lm, EIFFEL["prompt"], "Rome") == pytest.approx(after, rel=1e-6)


@pytest.mark.parametrize("data,phrase", [
    (b"", "the uploaded file is empty"),
    (b"not an archive at all", "not a .zip or .tar archive"),
    (None, "has no patch.safetensors"),
])
def test_a_bad_upload_is_one_message_beside_the_upload_field(client, lm, data, phrase):
    if data is None:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            z.writestr("p/patch.json", "{}")
        data = buffer.getvalue()
    weights = _weights(lm.model)
    response = client.post("/api/patches", content=data)
    assert response.status_code == 400
    assert list(response.json()["errors"]) == ["upload"] and phrase in response.json()["errors"]["upload"]
    assert _same(lm.model, weights)


def test_unpacking_takes_only_the_patch_files_and_never_an_archive_path(tmp_path, lm):
    saved = archive.pack(_edit_by_hand(lm), "p")
    with zipfile.ZipFile(io.BytesIO(saved)) as z:
        files = {n.rsplit("/", 1)[-1]: z.read(n) for n in z.namelist()}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("../../escaped/patch.json", files["patch.json"])
        z.writestr("/abs/patch.safetensors", files["patch.safetensors"])
        z.writestr("../../escaped/run.sh", "echo hi")
    into = tmp_path / "into"
    into.mkdir()
    patch = archive.unpack(buffer.getvalue(), into)
    assert sorted(p.name for p in into.iterdir()) == ["patch.json", "patch.safetensors"]
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "escaped").exists()
    assert patch.meta["method"] == "rome"
    twice = io.BytesIO()
    with zipfile.ZipFile(twice, "w") as z:
        z.writestr("a/patch.json", files["patch.json"])
        z.writestr("b/patch.json", files["patch.json"])
    with pytest.raises(InputError, match="more than one patch.json"):
        archive.unpack(twice.getvalue(), tmp_path)


def _edit_by_hand(lm):
    config = make_config("rome", lm.name, lm.model, {**FAST, **dict(l.split("=") for l in OTHER.splitlines())})
    request = EditRequest(EIFFEL["prompt"], EIFFEL["subject"], "Rome", "Paris")
    return get_editor("rome").fn(lm.model, lm.tokenizer, [request], config, progress=False, announce=lambda *_: None)


# ------------------------------------------------------------------ who may talk to the server

def test_a_change_needs_the_pages_header(session, lm):
    bare = TestClient(create_app(session))
    assert bare.get("/api/info").status_code == 200
    response = bare.post("/api/edit", json=EIFFEL)  # what another site's page could send: no custom header
    assert response.status_code == 403 and "X-Lmedit" in response.json()["errors"]["form"]
    assert bare.post("/api/patches", content=b"x").status_code == 403
    with pytest.raises(InputError):  # nothing was queued
        session.jobs.get(1)


def test_loopback_only_answers_a_loopback_host(session):
    app = create_app(session, loopback_only=True)
    for host, status in (("127.0.0.1:7860", 200), ("localhost:7860", 200), ("[::1]:7860", 200),
                         ("evil.example:7860", 403), ("192.168.1.5", 403)):
        response = TestClient(app, base_url=f"http://{host}").get("/api/info")
        assert response.status_code == status, (host, response.text)


# ------------------------------------------------------------------ the command

def test_ui_refuses_a_busy_port_in_one_line(monkeypatch, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        code, err = run_cli(monkeypatch, capsys, "ui", "--port", busy.getsockname()[1])
    assert_one_line_error(code, err, "cannot listen on 127.0.0.1", "--port")


def test_ui_refuses_a_missing_patch_before_loading_the_model(monkeypatch, capsys, tmp_path):
    code, err = run_cli(monkeypatch, capsys, "ui", "--patch", tmp_path / "nope", "--port", "0")
    assert_one_line_error(code, err, "patch directory not found", "nope")
