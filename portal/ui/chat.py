"""Chat tab: talk to one of your finished runs; answers stream in token by token."""

from __future__ import annotations

from typing import Any

import gradio as gr

from ..inference import InferenceError
from ..runs import NotFound, PortalError, RunService
from .common import current_user
from .runs import run_number


def target_choices(runs_list) -> list[tuple[str, str]]:
    return [(f"run-{r.id} · {r.name} ({r.model_name_or_path.rstrip('/').split('/')[-1]})", f"run-{r.id}")
            for r in runs_list]


def build_chat_tab(runs: RunService) -> dict[str, Any]:
    gr.Markdown("Chat with a finished run: the portal starts a model server for it on first use (this takes "
                "a little while), keeps it for the next messages and stops it when it is idle.")
    with gr.Row():
        target = gr.Dropdown(label="Chat with", choices=[], scale=4, elem_id="chat-target")
        reload_btn = gr.Button("Reload list", scale=0, elem_id="chat-reload")
    system = gr.Textbox(label="System prompt", placeholder="optional", elem_id="chat-system")
    with gr.Row():
        temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", elem_id="chat-temperature")
        top_p = gr.Slider(0, 1, value=0.9, step=0.05, label="top_p", elem_id="chat-top-p")
        max_tokens = gr.Slider(1, 4096, value=256, step=1, label="Max new tokens", elem_id="chat-max-tokens")
    chatbot = gr.Chatbot(type="messages", height=380, elem_id="chat-history", label="Conversation")
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message and press Enter", scale=5, show_label=False,
                             elem_id="chat-message")
        send_btn = gr.Button("Send", variant="primary", scale=0, elem_id="chat-send")
        stop_btn = gr.Button("Stop", scale=0, elem_id="chat-stop")
        clear_btn = gr.Button("Clear", scale=0, elem_id="chat-clear")

    def reload(request: gr.Request):
        user = current_user(runs, request)
        return gr.Dropdown(choices=target_choices(runs.chat_targets(user)))

    def add_message(text, history):
        text = (text or "").strip()
        if not text:
            return gr.update(), history
        return "", [*(history or []), {"role": "user", "content": text}]

    def respond(request: gr.Request, chosen, history, system_prompt, temp, top, max_new):
        user = current_user(runs, request)
        history = list(history or [])
        if not history or history[-1].get("role") != "user":
            yield history
            return
        if not chosen:
            yield [*history, {"role": "assistant", "content": "⚠ Choose a run to chat with first."}]
            return
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": m["role"], "content": str(m["content"])} for m in history
            if m.get("role") in ("user", "assistant") and not str(m.get("content", "")).startswith("⚠")]
        answer = {"role": "assistant", "content": ""}
        try:
            stream = runs.chat_stream(user, run_number(str(chosen).removeprefix("run-")), messages,
                                      temperature=float(temp), top_p=float(top), max_tokens=int(max_new))
            for delta in stream:
                answer["content"] += delta
                yield [*history, answer]
        except (NotFound, PortalError, InferenceError, ValueError) as err:
            note = f"⚠ {err}"
            answer["content"] = f"{answer['content']}\n\n{note}".strip()
            yield [*history, answer]
            return
        if not answer["content"]:
            answer["content"] = "⚠ The model returned an empty answer."
        yield [*history, answer]

    inputs = [target, chatbot, system, temperature, top_p, max_tokens]
    submitted = message.submit(add_message, [message, chatbot], [message, chatbot], queue=False).then(
        respond, inputs, chatbot)
    clicked = send_btn.click(add_message, [message, chatbot], [message, chatbot], queue=False).then(
        respond, inputs, chatbot)
    stop_btn.click(None, None, None, cancels=[submitted, clicked])
    clear_btn.click(lambda: [], None, chatbot, queue=False)
    reload_btn.click(reload, None, target)
    return {"target": target, "reload": reload}
