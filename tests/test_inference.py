"""Chat with a run: the OpenAI-compatible client (portal/inference.py) and the local chat
servers (portal/serving.py), against the real ``llamafactory-cli api`` serving the adapter that
the session's ``trained`` run produced on the tiny model.

One server start costs 10-30 s on a small CPU machine, so the module shares servers: the
tests of the first part run in file order on one LocalChatServers. The tiny model answers
gibberish: the tests check that text arrives, not what it says.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import free_port

from portal.inference import InferenceError, astream_chat, chat, list_models, stream_chat
from portal.serving import SERVER_LOG, START_MARKER, ChatServerError, LocalChatServers

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

QUESTION = [{"role": "user", "content": "Give three tips for staying healthy."}]


def group_gone(pgid: int, within: float = 10.0) -> bool:
    """True once no process of the group is left (what "no orphan" means here)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def eventually(condition, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


def no_records(servers) -> bool:
    return list(servers.state_dir.glob("run-*.json")) == []


def twin_of(run, tmp_path: Path, run_id: int):
    """Another run row-shaped object on the same adapter, with its own run folder: a second
    run to chat with, without training one more."""
    run_dir = tmp_path / f"twin-{run_id}"
    run_dir.mkdir()
    return run.model_copy(update={"id": run_id, "name": f"twin_{run_id}", "run_dir": str(run_dir)})


def starts_logged(run) -> int:
    return (Path(run.run_dir) / SERVER_LOG).read_text(encoding="utf-8").count(START_MARKER)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    servers = LocalChatServers(tmp_path_factory.mktemp("chat-state"), max_servers=2, idle_seconds=600)
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module")
def served(trained, servers):
    """The trained run's server, asked for by two users at the same moment."""
    run = trained["run"]
    starts_before = starts_logged(run) if (Path(run.run_dir) / SERVER_LOG).exists() else 0
    results, errors = [], []
    barrier = threading.Barrier(2)

    def ask():
        barrier.wait()
        try:
            results.append(servers.ensure(run))
        except Exception as err:  # noqa: BLE001 -- reported by the test below
            errors.append(err)

    began = time.monotonic()
    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - began
    assert not errors, errors
    print(f"\nchat server start (two concurrent ensure calls): {seconds:.1f} s")
    return {"run": run, "endpoints": results, "starts": starts_logged(run) - starts_before, "start_seconds": seconds}


# ---- one server, shared ------------------------------------------------------------------
def test_two_users_at_once_start_one_server(served, servers):
    first, second = served["endpoints"]
    assert first == second
    assert served["starts"] == 1
    assert [info.run_id for info in servers.running()] == [served["run"].id]
    assert first.model_name == f"run-{served['run'].id}" and first.base_url.startswith("http://127.0.0.1:")
    assert first.api_key and first.api_key not in repr(first)


def test_list_models_shows_the_run(served):
    endpoint = served["endpoints"][0]
    assert list_models(endpoint.base_url, api_key=endpoint.api_key) == [endpoint.model_name]


def test_streamed_multi_turn_chat(served):
    endpoint = served["endpoints"][0]
    began = time.monotonic()
    first_token_at = None
    deltas = []
    for delta in stream_chat(endpoint.base_url, endpoint.model_name, QUESTION, temperature=0.7, top_p=0.9,
                             max_tokens=24, api_key=endpoint.api_key, timeout=60):
        first_token_at = first_token_at or time.monotonic() - began
        deltas.append(delta)
    assert deltas and all(isinstance(d, str) and d for d in deltas)
    answer = "".join(deltas)
    conversation = QUESTION + [{"role": "assistant", "content": answer},
                               {"role": "user", "content": "And one more?"}]
    second = list(stream_chat(endpoint.base_url, endpoint.model_name, conversation, temperature=0.7, top_p=0.9,
                              max_tokens=24, api_key=endpoint.api_key, timeout=60))
    assert second and "".join(second)
    print(f"\ntime to first token (CPU, tiny model): {first_token_at * 1000:.0f} ms")


def test_a_finished_answer_leaves_its_connection_for_the_next_message(served):
    """The client reads on past [DONE] to the body's end, so the connection goes back to the pool:
    the next message reuses it instead of opening a new one (sync client, then the gateway's async one)."""
    from portal.inference import aclose_http

    endpoint = served["endpoints"][0]
    port = int(endpoint.base_url.split(":")[2].split("/")[0])

    def open_to_server() -> set[int]:
        return {c.laddr.port for c in psutil.Process().net_connections(kind="tcp")
                if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED}

    def answer() -> str:
        return "".join(stream_chat(endpoint.base_url, endpoint.model_name, QUESTION, max_tokens=4,
                                   api_key=endpoint.api_key))

    assert answer()
    kept = open_to_server()
    assert kept, "the finished answer's connection was closed"
    assert answer() and open_to_server() == kept

    async def answers_async() -> tuple[set[int], set[int]]:
        seen = []
        for _ in range(2):
            assert "".join([p async for p in astream_chat(endpoint.base_url, endpoint.model_name, QUESTION,
                                                          max_tokens=4, api_key=endpoint.api_key)])
            seen.append(open_to_server())
        await aclose_http()
        return seen[0], seen[1]

    first, second = asyncio.run(answers_async())
    assert len(first - kept) == 1 and second == first


def test_plain_chat_and_reuse(served, servers):
    run, endpoint = served["run"], served["endpoints"][0]
    pid = servers.info(run.id).pid
    answer = chat(endpoint.base_url, endpoint.model_name, QUESTION, temperature=0, top_p=1.0, max_tokens=16,
                  api_key=endpoint.api_key)
    assert isinstance(answer, str) and answer
    assert servers.ensure(run) == endpoint
    assert servers.info(run.id).pid == pid
    streamed = list(servers.stream_chat(run, QUESTION, max_tokens=8))
    assert streamed and servers.info(run.id).pid == pid and servers.info(run.id).busy == 0


def test_server_wants_the_portals_key_and_errors_never_show_it(served):
    endpoint = served["endpoints"][0]
    with pytest.raises(InferenceError, match="refused the portal's credentials") as err:
        list_models(endpoint.base_url, api_key="not-the-key")
    with pytest.raises(InferenceError, match="refused the portal's credentials"):
        chat(endpoint.base_url, endpoint.model_name, QUESTION, api_key=None)
    assert endpoint.api_key not in str(err.value)


def test_llamafactory_answers_any_model_name(served):
    """LLaMA-Factory's API server serves its one model under whatever name is asked (vLLM
    answers 404); the portal must map names to runs itself (the /v1 gateway). The 404
    wording is checked against vLLM's reply below."""
    endpoint = served["endpoints"][0]
    assert chat(endpoint.base_url, "no-such-model", QUESTION, max_tokens=4, api_key=endpoint.api_key)


def test_server_killed_mid_answer_then_the_next_message_works(served, servers):
    run, endpoint = served["run"], served["endpoints"][0]
    leader = psutil.Process(servers.info(run.id).pid)
    (server_process,) = leader.children()  # llamafactory-cli under the launcher's job wrapper
    answer = servers.stream_chat(run, QUESTION, temperature=0, top_p=1.0, max_tokens=4000, timeout=60)
    with pytest.raises(InferenceError, match="stopped in the middle|not running"):
        next(answer)
        server_process.kill()  # as the OOM killer would
        for _ in answer:
            pass
    with pytest.raises(InferenceError, match="not running"):
        list_models(endpoint.base_url, api_key=endpoint.api_key)

    began = time.monotonic()
    fresh = servers.ensure(run)  # the broken answer made it suspect: asked, found dead, cleaned up, started anew
    restart_seconds = time.monotonic() - began
    assert group_gone(leader.pid)
    assert servers.info(run.id).pid != leader.pid
    assert "".join(servers.stream_chat(run, QUESTION, max_tokens=8))
    assert list_models(fresh.base_url, api_key=fresh.api_key) == [f"run-{run.id}"]
    print(f"\nchat server restart: {restart_seconds:.1f} s")

    # killed between two messages, while the portal still trusts it without asking (it answered
    # a moment ago): the next message fails to connect before any text, and is retried once on a new server
    leader = psutil.Process(servers.info(run.id).pid)
    leader.children()[0].kill()
    assert eventually(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                      for p in leader.children()), within=10)
    assert "".join(servers.stream_chat(run, QUESTION, max_tokens=8))
    assert servers.info(run.id).pid != leader.pid


def test_base_model_server_answers_without_the_adapter(served, servers, tmp_path):
    """Side by side on one machine: the run's base model alone, in its own server, shared by
    every run on that model and template."""
    run = served["run"]
    run_pid = servers.info(run.id).pid
    base = servers.ensure(run, base=True)
    keys = sorted(info.key for info in servers.running())
    assert len(keys) == 2 and keys[1] == f"run-{run.id}" and keys[0].startswith("base-")
    args = yaml.safe_load((servers.state_dir / keys[0] / "args.yaml").read_text(encoding="utf-8"))
    assert "adapter_name_or_path" not in args and args["model_name_or_path"] == run.model_name_or_path
    assert "".join(servers.stream_chat(run, QUESTION, base=True, max_tokens=8))
    assert servers.info(run.id).pid == run_pid  # the run's own server is untouched
    twin = twin_of(run, tmp_path, run.id + 2000)
    assert servers.ensure(twin, base=True) == base  # same base model and template: the same server
    assert len(servers.running()) == 2


def test_least_recently_used_server_makes_room(served, servers, tmp_path):
    run = served["run"]
    old_pid = servers.info(run.id).pid
    servers.max_servers = 1
    twin = twin_of(run, tmp_path, run.id + 1000)
    endpoint = servers.ensure(twin)
    assert [info.run_id for info in servers.running()] == [twin.id]
    assert group_gone(old_pid)
    assert list_models(endpoint.base_url, api_key=endpoint.api_key) == [f"run-{twin.id}"]
    assert (Path(twin.run_dir) / "chat-server" / "args.yaml").is_file()


def test_stop_all_leaves_nothing(served, servers):
    pids = [info.pid for info in servers.running()]
    assert pids
    servers.stop_all()
    assert servers.running() == []
    assert all(group_gone(pid) for pid in pids)
    assert no_records(servers)
    with pytest.raises(ChatServerError, match="shutting down"):
        servers.ensure(served["run"])


# ---- lifecycle on separate managers ------------------------------------------------------
def test_idle_server_is_stopped(trained, tmp_path):
    servers = LocalChatServers(tmp_path / "state", idle_seconds=1.5)
    try:
        twin = twin_of(trained["run"], tmp_path, trained["run"].id + 2000)
        servers.ensure(twin)
        pid = servers.info(twin.id).pid
        deadline = time.monotonic() + 20
        while servers.info(twin.id) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert servers.info(twin.id) is None
        assert group_gone(pid)
        assert eventually(lambda: no_records(servers))
    finally:
        servers.stop_all()


def test_servers_of_a_dead_portal_are_stopped_by_the_next(trained, tmp_path):
    """A portal killed with SIGKILL runs no atexit: its servers live on in their own sessions,
    recorded under the state folder with the portal's pid and start time. The next portal
    process stops every server whose portal is gone. Here the record is made to name a
    finished process (starting a second portal to kill costs ~10 s of imports)."""
    twin = twin_of(trained["run"], tmp_path, trained["run"].id + 3000)
    state_dir = tmp_path / "state"
    first = LocalChatServers(state_dir)
    first.ensure(twin)
    pid = first.info(twin.id).pid
    record_file = state_dir / f"run-{twin.id}.json"
    record = json.loads(record_file.read_text())
    gone = subprocess.Popen(["true"])
    gone.wait()
    record["portal"] = {"pid": gone.pid, "create_time": record["portal"]["create_time"]}
    record_file.write_text(json.dumps(record))

    server_process = psutil.Process(pid).children()[0]
    second = LocalChatServers(state_dir)  # the next portal process
    try:
        assert not server_process.is_running()
        first.reap_idle()  # here the test process is the dead portal: it reaps the leader, as init does for a real one
        assert group_gone(pid)
        assert list(state_dir.glob("run-*.json")) == []
    finally:
        second.stop_all()
        first.stop_all()


# ---- refusals and errors without a server ------------------------------------------------
def test_only_succeeded_runs_with_an_adapter_are_served(trained, tmp_path):
    servers = LocalChatServers(tmp_path / "state")
    run = trained["run"]
    try:
        with pytest.raises(ChatServerError, match="status 'failed'"):
            servers.ensure(run.model_copy(update={"status": "failed"}))
        with pytest.raises(ChatServerError, match="adapter .* is missing"):
            servers.ensure(run.model_copy(update={"output_dir": str(tmp_path / "gone")}))
        with pytest.raises(ChatServerError, match="finetuning_type 'full'"):
            servers.ensure(run.model_copy(update={"finetuning_type": "full"}))
        assert servers.running() == []
    finally:
        servers.stop_all()


def test_a_server_that_does_not_answer_in_time_is_stopped(trained, tmp_path):
    servers = LocalChatServers(tmp_path / "state", start_timeout=1.0)
    twin = twin_of(trained["run"], tmp_path, trained["run"].id + 4000)
    try:
        with pytest.raises(ChatServerError, match="did not answer within 1 s(.|\n)*the end of chat-server.log"):
            servers.ensure(twin)
        assert servers.running() == []
        assert eventually(lambda: no_records(servers))
        left = [p for p in psutil.process_iter(["cmdline"]) if str(twin.run_dir) in " ".join(p.info["cmdline"] or [])]
        assert left == []
    finally:
        servers.stop_all()


def test_a_server_that_dies_while_starting_says_how(trained, tmp_path):
    servers = LocalChatServers(tmp_path / "state")
    twin = twin_of(trained["run"], tmp_path, trained["run"].id + 5000)
    record = servers.state_dir / f"run-{twin.id}.json"

    def kill_when_started():
        deadline = time.monotonic() + 30
        while not record.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(json.loads(record.read_text())["state"]["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    try:
        with pytest.raises(ChatServerError, match="stopped while starting \\(.*killed"):
            servers.ensure(twin)
        assert servers.running() == []
    finally:
        killer.join()
        servers.stop_all()


def test_nothing_listening_reads_not_running():
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(InferenceError, match="the model server is not running"):
        list_models(base_url)
    with pytest.raises(InferenceError, match="the model server is not running"):
        list(stream_chat(base_url, "run-1", QUESTION, api_key="secret-key"))


# ---- vLLM's error replies ----------------------------------------------------------------
# vLLM cannot run here (no GPU); this loopback server answers the way vLLM's OpenAI server
# does for an unknown model and for a prompt over max_model_len (bodies copied from vLLM 0.x),
# so the client's wording for them is checked over real HTTP.
class _VllmLikeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._reply(200, {"object": "list", "data": [{"id": "run-1", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["model"] != "run-1":
            return self._reply(404, {"object": "error", "message": f"The model `{body['model']}` does not exist.",
                                     "type": "NotFoundError", "param": None, "code": 404})
        if body["messages"][-1]["content"] == "slow":
            time.sleep(2)  # the client gave up after 1 s: nothing to answer
            return
        if body["messages"][-1]["content"] == "half":  # two pieces, then the connection drops
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for piece in ("Hel", "lo"):
                chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            self.close_connection = True
            return
        return self._reply(400, {"object": "error", "message": "This model's maximum context length is 512 tokens. "
                                 "However, you requested 900 tokens (644 in the messages, 256 in the completion). "
                                 "Please reduce the length of the messages or completion.",
                                 "type": "BadRequestError", "param": None, "code": 400})


@pytest.fixture(scope="module")
def vllm_like():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _VllmLikeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_unknown_model_reads_not_loaded(vllm_like):
    with pytest.raises(InferenceError, match=r"model 'run-7' is not loaded on this server \(it serves: run-1\)"):
        chat(vllm_like, "run-7", QUESTION)
    with pytest.raises(InferenceError, match="model 'run-7' is not loaded"):
        list(stream_chat(vllm_like, "run-7", QUESTION))


def test_too_long_conversation_says_so(vllm_like):
    with pytest.raises(InferenceError, match="longer than the model's context: clear it or shorten"):
        list(stream_chat(vllm_like, "run-1", QUESTION))


def test_cut_stream_and_timeout(vllm_like):
    answer = stream_chat(vllm_like, "run-1", [{"role": "user", "content": "half"}])
    assert next(answer) == "Hel" and next(answer) == "lo"
    with pytest.raises(InferenceError, match="stopped in the middle of the answer"):
        next(answer)
    with pytest.raises(InferenceError, match="did not answer within 1 s"):
        chat(vllm_like, "run-1", [{"role": "user", "content": "slow"}], timeout=1)


def test_the_async_stream_says_when_the_server_took_the_request_and_reads_the_same_errors(vllm_like):
    """The /v1 gateway streams with astream_chat on its event loop: the same messages as stream_chat,
    and "" first once the server answered 200 (the gateway's cue to send the role before the first token)."""

    def collect(base_url, model, messages, got=None, **kwargs):
        got = [] if got is None else got

        async def read():
            async for piece in astream_chat(base_url, model, messages, **kwargs):
                got.append(piece)

        asyncio.run(read())
        return got

    with pytest.raises(InferenceError, match=r"model 'run-7' is not loaded on this server \(it serves: run-1\)"):
        collect(vllm_like, "run-7", QUESTION)
    with pytest.raises(InferenceError, match="longer than the model's context: clear it or shorten"):
        collect(vllm_like, "run-1", QUESTION)
    got: list[str] = []
    with pytest.raises(InferenceError, match="stopped in the middle of the answer"):
        collect(vllm_like, "run-1", [{"role": "user", "content": "half"}], got)
    assert got == ["", "Hel", "lo"]
    with pytest.raises(InferenceError, match="did not answer within 1 s"):
        collect(vllm_like, "run-1", [{"role": "user", "content": "slow"}], timeout=1)
    with pytest.raises(InferenceError, match="the model server is not running"):
        collect(f"http://127.0.0.1:{free_port()}/v1", "run-1", QUESTION, api_key="secret-key")
