"""Chat time to first token: through the portal's /v1 gateway vs straight to the run's own server.

usage: .venv/bin/python bench/bench_chat_ttft.py [--pairs 20] [--warmup 3] [--max-tokens 8] ...

One tiny demo run is trained for real (RunService + the local launcher, a few steps), then the
web app is built with `create_app(services, supervise=False)` in auth mode none and served by
uvicorn in a thread of this process on a free loopback port: this process is the portal. The
clients run in a process of their own (this script with --clients), as they do when a portal is
deployed: a client sharing the portal's process would share its GIL, which no real client does
(and the server of the direct side has a process of its own too). Both sides are the `openai`
client there (one client each, made once, so both keep their connections alive), streaming the
same request (stream=True, the same messages, temperature, top_p and max_tokens):

  (a) portal: OpenAI(base_url=<portal>/v1) with model `run-<id>` -- the security and token
      layers, the gateway's checks, ChatService.stream (the run's row, the adapter check), the
      portal's own HTTP client to the server and the re-encoded SSE stream all count;
  (b) direct: OpenAI(base_url=<the run's server>/v1, api_key=<its key>) -- the Endpoint from
      `services.chat.local_servers.ensure(run)`: the same `llamafactory-cli api` process.

Time to first token: from the create() call to the first chunk whose delta has non-empty
content. Each answer is read to its end before the next request (an abandoned stream would
keep the server generating during the next measurement). The first chat through the portal
starts the run's server; it is timed on its own (the "cold" first token) and not counted. Then
--warmup untimed requests per side, then --pairs pairs that alternate which side goes first.
Budget: median(portal) / median(direct) <= 1.10. With --parts a third side, an ideal proxy (one
more HTTP hop doing nothing else), joins the rounds, and timestamps in the portal split its
share of the first token into parts (bench/_chat_parts.py). Afterwards, in this process, the same number
of answers through ChatService.stream_run (no HTTP on the portal's side): what the web layer
adds. The chat servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

NAME = "chat_ttft"
BUDGET_RATIO = 1.10
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Give three tips for staying healthy."}]


def one_chat(client, model: str, max_tokens: int, temperature: float) -> dict[str, Any]:
    """One streamed answer: seconds to the first non-empty content delta and to the end."""
    t0_ns = time.perf_counter_ns()
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True, max_tokens=max_tokens,
                                            temperature=temperature, top_p=0.9)
    accepted_ns = time.perf_counter_ns()  # create() returns with the response's headers: HTTP 200
    first = None
    pieces: list[str] = []
    for chunk in stream:
        for choice in chunk.choices or []:
            text = choice.delta.content if choice.delta else None
            if text:
                if first is None:
                    first = time.perf_counter() - t0
                    first_ns = time.perf_counter_ns()
                pieces.append(text)
    total = time.perf_counter() - t0
    if first is None:
        raise RuntimeError(f"{model}: the answer had no content ({len(pieces)} pieces)")
    return {"ttft_s": first, "total_s": total, "pieces": len(pieces), "chars": len("".join(pieces)),
            "t0_ns": t0_ns, "accepted_ns": accepted_ns, "first_ns": first_ns}  # one clock across processes (--parts)


def one_service_chat(chat, user, run_id: int, max_tokens: int, temperature: float) -> dict[str, Any]:
    """The same answer through ChatService.stream_run in this process: no HTTP on the portal's
    side, so portal - service is what the web layer (middleware, gateway, SSE) adds."""
    t0 = time.perf_counter()
    first = None
    pieces = 0
    for piece in chat.stream_run(user, run_id, MESSAGES, max_tokens=max_tokens, temperature=temperature, top_p=0.9):
        if piece and first is None:
            first = time.perf_counter() - t0
        pieces += 1
    total = time.perf_counter() - t0
    if first is None:
        raise RuntimeError(f"run-{run_id}: the answer had no content")
    return {"ttft_s": first, "total_s": total, "pieces": pieces}


def run_clients(opts, sides: dict[str, tuple[str, str, str]]) -> dict[str, list[dict[str, Any]]]:
    """The measured requests, from a process of their own (this script with --clients); each side
    is (base URL, model, API key), passed in the environment: a key never goes on a command line."""
    import json
    import subprocess

    env = dict(os.environ, BENCH_SIDES=json.dumps(sides))
    cmd = [sys.executable, __file__, "--clients", "--pairs", str(opts.pairs * opts.sets), "--warmup", str(opts.warmup),
           "--max-tokens", str(opts.max_tokens), "--temperature", str(opts.temperature)]
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=900, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def clients_main(opts) -> None:
    """--clients: one `openai` client per side, the warm-up, then --pairs rounds, each side once
    per round, the side that goes first rotating; the figures as JSON on stdout."""
    import json

    from openai import OpenAI

    sides = {name: (OpenAI(base_url=url, api_key=key, max_retries=0), model)
             for name, (url, model, key) in json.loads(os.environ["BENCH_SIDES"]).items()}
    names = list(sides)
    for _ in range(opts.warmup):
        for client, model in sides.values():
            one_chat(client, model, opts.max_tokens, opts.temperature)
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for i in range(opts.pairs):
        for name in names[i % len(names):] + names[:i % len(names)]:
            out[name].append(one_chat(*sides[name], opts.max_tokens, opts.temperature))
        print(f"[{time.strftime('%H:%M:%S')}] round {i + 1}/{opts.pairs}: first token "
              + ", ".join(f"{name} {out[name][-1]['ttft_s'] * 1000:.1f} ms" for name in names),
              file=sys.stderr, flush=True)  # stdout carries the figures
    print(json.dumps(out))


def ms(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] * 1000 for r in rows]


def summary(values: list[float]) -> dict[str, float]:
    return {"median": C.median(values), "p95": C.percentile(values, 95), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=20, help="portal/direct pairs in a set (default 20)")
    p.add_argument("--sets", type=int, default=5,
                   help="sets of --pairs pairs, one after the other (default 5); the budget is held by the median of "
                        "the sets' ratios, each ratio printed")
    p.add_argument("--warmup", type=int, default=3, help="untimed requests per side after the server start (3)")
    p.add_argument("--max-tokens", type=int, default=8, help="max_tokens of each answer (default 8)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="of each answer (default 0: greedy, so every answer's first piece takes the same decoding "
                        "steps; with sampling the number of tokens before the first word varies, and with it the TTFT)")
    p.add_argument("--epochs", type=float, default=1.0, help="training of the demo run (default 1)")
    p.add_argument("--max-samples", type=int, default=16)
    p.add_argument("--cutoff-len", type=int, default=64)
    p.add_argument("--timeout", type=float, default=300, help="the training, s")
    p.add_argument("--keep", action="store_true", help="keep the temp data root")
    p.add_argument("--parts", action="store_true",
                   help="also an ideal proxy as a third side, and where the portal's milliseconds go (_chat_parts.py)")
    p.add_argument("--clients", action="store_true", help=argparse.SUPPRESS)  # the clients' own process
    opts = p.parse_args(argv)
    if opts.clients:
        clients_main(opts)
        return {}

    from openai import OpenAI

    from portal.web import create_app

    started = time.monotonic()
    C.log(f"{NAME}: {opts.sets} sets of {opts.pairs} pairs (+{opts.warmup} warm-up per side), "
          f"max_tokens {opts.max_tokens}, temperature {opts.temperature:g}")
    # one server, never stopped for idleness during the benchmark
    with C.bench_env("chat", keep=opts.keep, chat_max_servers=1, chat_idle_seconds=3600.0) as env:
        services = env["services"]
        runs = services.runs
        try:
            user = runs.ensure_user("bench")
            args = C.demo_args(env["demo_config"], num_train_epochs=float(opts.epochs), max_samples=opts.max_samples,
                               cutoff_len=opts.cutoff_len)
            t0 = time.monotonic()
            run = runs.submit_args(user, args, name=f"bench_chat_{time.strftime('%H%M%S')}", source="bench")
            run = runs.wait(user, run.id, timeout=opts.timeout, interval=0.2)
            if run.status.value != "succeeded":
                raise RuntimeError(f"run {run.id} {run.status.value}: {run.status_reason}\n"
                                   + runs.logs(user, run.id)[-3000:])
            train_s = time.monotonic() - t0
            C.log(f"demo run {run.id} trained ({run.finetuning_type}, {train_s:.1f} s)")
            model = f"run-{run.id}"

            app = create_app(services, supervise=False)  # auth mode none: the local admin may chat with any run
            if opts.parts:
                import _chat_parts as P

                portal_marks, ideal_marks = P.Marks(), P.Marks()
                P.mark_upstream(portal_marks)
                app = portal_marks.wrap(app)
            with C.Served(app) as served, contextlib.ExitStack() as stack:
                via_portal = OpenAI(base_url=served.url + "/v1", api_key="unused-on-loopback", max_retries=0)
                listed = [m.id for m in via_portal.models.list().data]
                if model not in listed:
                    raise RuntimeError(f"GET /v1/models does not list {model}: {listed}")

                # the first chat starts the run's server (llamafactory-cli api on the CPU)
                cold = one_chat(via_portal, model, opts.max_tokens, opts.temperature)
                C.log(f"first chat through the portal (starts the run's server): first token after "
                      f"{cold['ttft_s']:.2f} s, answer done after {cold['total_s']:.2f} s")
                info = services.chat.local_servers.info(run.id)
                endpoint = services.chat.local_servers.ensure(run)  # the running one: its URL, name and key

                sides = {"portal": (served.url + "/v1", model, "unused-on-loopback"),
                         "direct": (endpoint.base_url, endpoint.model_name, endpoint.api_key or "none")}
                if opts.parts:
                    ideal = stack.enter_context(C.Served(ideal_marks.wrap(P.ideal_proxy(endpoint.base_url))))
                    sides["ideal"] = (ideal.url + "/v1", endpoint.model_name, endpoint.api_key or "none")
                with C.CpuMeter(job_pid=info.pid) as cpu:  # the server's CPU apart from other processes'
                    measured = run_clients(opts, sides)
                portal, direct = measured["portal"], measured["direct"]
                C.log("in this process: the same answers through ChatService.stream_run")
                for _ in range(opts.warmup):
                    one_service_chat(services.chat, user, run.id, opts.max_tokens, opts.temperature)
                service = [one_service_chat(services.chat, user, run.id, opts.max_tokens, opts.temperature) for _ in range(opts.pairs)]
                if services.chat.local_servers.info(run.id).pid != info.pid:
                    raise RuntimeError("the run's server was restarted during the benchmark: figures are mixed")
        finally:
            services.chat.close()
        C.log("chat servers stopped")

    p_ttft, d_ttft = summary(ms(portal, "ttft_s")), summary(ms(direct, "ttft_s"))
    s_ttft = summary(ms(service, "ttft_s"))
    p_total, d_total = summary(ms(portal, "total_s")), summary(ms(direct, "total_s"))
    pooled_ratio = p_ttft["median"] / d_ttft["median"] if d_ttft["median"] else float("nan")
    set_ratios = [C.median(ms(portal[i:i + opts.pairs], "ttft_s")) / C.median(ms(direct[i:i + opts.pairs], "ttft_s"))
                  for i in range(0, len(portal), opts.pairs)]
    ratio = C.median(set_ratios)
    pair_ratios = [a["ttft_s"] / b["ttft_s"] for a, b in zip(portal, direct)]
    added = [(a["ttft_s"] - b["ttft_s"]) * 1000 for a, b in zip(portal, direct)]
    ok = ratio <= BUDGET_RATIO
    others_cores = cpu.others_cpu_s / cpu.wall_s if cpu.wall_s else float("nan")
    total = time.monotonic() - started

    print()
    print(f"== {NAME}: time to first token, openai client -> portal /v1 vs -> the run's server, "
          f"{opts.sets} sets of {opts.pairs} pairs, temperature {opts.temperature:g} ==")
    print(f"  first chat (starts the run's server): first token after {cold['ttft_s']:.2f} s "
          f"(answer done {cold['total_s']:.2f} s)")
    print(f"  portal first token (ms): median {p_ttft['median']:.1f}, p95 {p_ttft['p95']:.1f}, "
          f"min {p_ttft['min']:.1f}, max {p_ttft['max']:.1f}")
    print(f"  direct first token (ms): median {d_ttft['median']:.1f}, p95 {d_ttft['p95']:.1f}, "
          f"min {d_ttft['min']:.1f}, max {d_ttft['max']:.1f}")
    print(f"  service layer alone (ChatService.stream_run, no HTTP) first token (ms): median {s_ttft['median']:.1f}, "
          f"p95 {s_ttft['p95']:.1f}: the web layer adds {p_ttft['median'] - s_ttft['median']:+.1f} ms, the service "
          f"layer {s_ttft['median'] - d_ttft['median']:+.1f} ms (medians)")
    print(f"  whole answer ({opts.max_tokens} tokens max, ms): median portal {p_total['median']:.1f}, "
          f"direct {d_total['median']:.1f}")
    print(f"  added by the portal per first token: median {C.median(added):+.1f} ms; "
          f"median of the per-pair ratios {C.median(pair_ratios):.3f}")
    print(f"  CPU during the pairs ({cpu.wall_s:.1f} s): the portal {cpu.self_cpu_s:.2f} s, the clients' process "
          f"{cpu.children_cpu_s:.2f} s, "
          f"the run's server {cpu.job_cpu_s:.2f} s; other processes took {others_cores:.2f} cores "
          f"(load average {cpu.load_before:.1f} -> {cpu.load_after:.1f})")
    breakdown: dict[str, Any] = {}
    if opts.parts:
        i_ttft = summary(ms(measured["ideal"], "ttft_s"))
        print(f"  ideal proxy first token (ms, --parts): median {i_ttft['median']:.1f}, p95 {i_ttft['p95']:.1f}, "
              f"min {i_ttft['min']:.1f}, max {i_ttft['max']:.1f}")
        breakdown = {"ideal_ttft_ms": i_ttft,
                     "portal_parts_ms": P.parts(portal, portal_marks, P.PORTAL_STEPS),
                     "ideal_parts_ms": P.parts(measured["ideal"], ideal_marks, P.IDEAL_STEPS)}
        breakdown["direct_parts_ms"] = P.client_parts(direct)
        for side in ("direct", "portal", "ideal"):
            print(f"  {side}: where the first token's time goes (median, min; ms)")
            for label, values in breakdown[f"{side}_parts_ms"].items():
                if values:
                    print(f"    {label:75s} {C.median(values):7.2f} {min(values):7.2f}")
    print(f"  median(portal)/median(direct) of each set of {opts.pairs} pairs: "
          + ", ".join(f"{r:.3f}" for r in set_ratios)
          + f"; over {opts.sets} sets: {sum(r > BUDGET_RATIO for r in set_ratios)} over {BUDGET_RATIO}; "
          f"all {len(portal)} pairs pooled: {pooled_ratio:.3f}")
    print(C.budget_line(f"ratio median(portal)/median(direct) TTFT, median of {opts.sets} sets", f"{ratio:.3f}",
                        f"<= {BUDGET_RATIO}", ok))
    print(f"  (wall time of this benchmark: {total:.0f} s, of which training {train_s:.0f} s)")

    result = {
        "params": vars(opts), "run_id": run.id, "train_s": train_s,
        "first_chat_ttft_s": cold["ttft_s"], "first_chat_total_s": cold["total_s"],
        "portal": portal, "direct": direct, "service": service, "service_ttft_ms": s_ttft,
        "portal_ttft_ms": p_ttft, "direct_ttft_ms": d_ttft, "portal_total_ms": p_total, "direct_total_ms": d_total,
        "ratio": ratio, "set_ratios": set_ratios, "pooled_ratio": pooled_ratio, "budget_ratio": BUDGET_RATIO, "ok": ok,
        "median_pair_ratio": C.median(pair_ratios), "median_added_ms": C.median(added),
        "other_processes_cores": others_cores, "pairs_wall_s": cpu.wall_s, **cpu.as_dict(), "wall_s": total,
        **breakdown,
    }
    path = C.write_result(NAME, result)
    print(f"  results: {os.path.relpath(path, C.ROOT)}")
    return result


if __name__ == "__main__":
    main()
