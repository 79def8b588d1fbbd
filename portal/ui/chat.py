"""Chat tab: talk to one of your finished runs or to a served model; answers stream in token by
token. Side by side: the same messages to the run and to its base model."""

from __future__ import annotations

from typing import Any

import gradio as gr

from ..chat import RUN_MODEL, ChatService
from ..inference import InferenceError
from ..runs import NotFound, PortalError
from .common import current_user

WARNING = "⚠"


def target_choices(targets) -> list[tuple[str, str]]:
    return [(t.label, t.model) for t in targets]


def to_messages(history, system_prompt: str | None) -> list[dict[str, str]]:
    """The conversation to send: the system prompt, then user and assistant turns without the
    portal's own warnings (they are not the model's words)."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": m["role"], "content": str(m["content"])} for m in history
        if m.get("role") in ("user", "assistant") and not str(m.get("content", "")).startswith(WARNING)]


def build_chat_tab(chat: ChatService) -> dict[str, Any]:
    runs = chat.runs
    gr.Markdown("Chat with a finished run or a served model. A run's model is loaded on first use (this can take "
                "a little while), kept for the next messages and let go when idle. **Side by side** sends the "
                "same messages to the run and to its base model: what fine-tuning changed.")
    with gr.Row():
        target = gr.Dropdown(label="Chat with", choices=[], scale=4, elem_id="chat-target")
        reload_btn = gr.Button("Reload list", scale=0, elem_id="chat-reload")
        compare = gr.Checkbox(label="Side by side with the base model", value=False, scale=1,
                              elem_id="chat-side-by-side")
    system = gr.Textbox(label="System prompt", placeholder="optional", elem_id="chat-system")
    with gr.Row():
        temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", elem_id="chat-temperature")
        top_p = gr.Slider(0, 1, value=0.9, step=0.05, label="top_p", elem_id="chat-top-p")
        max_tokens = gr.Slider(1, 4096, value=256, step=1, label="Max new tokens", elem_id="chat-max-tokens")
    with gr.Row():
        chatbot = gr.Chatbot(type="messages", height=380, elem_id="chat-history", label="Conversation")
        base_chatbot = gr.Chatbot(type="messages", height=380, elem_id="chat-base-history",
                                  label="Base model (no fine-tuning)", visible=False)
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message and press Enter", scale=5, show_label=False,
                             elem_id="chat-message")
        send_btn = gr.Button("Send", variant="primary", scale=0, elem_id="chat-send")
        stop_btn = gr.Button("Stop", scale=0, elem_id="chat-stop")
        clear_btn = gr.Button("Clear", scale=0, elem_id="chat-clear")
        unload_btn = gr.Button("Unload model", scale=0, elem_id="chat-unload")

    def reload(request: gr.Request):
        user = current_user(runs, request)
        return gr.Dropdown(choices=target_choices(chat.targets(user)))

    def unload(request: gr.Request, chosen):
        user = current_user(runs, request)
        if not chosen:
            raise gr.Error("Choose a run first.")
        try:
            gr.Info(chat.release(user, str(chosen)))
        except (NotFound, PortalError, InferenceError) as err:
            raise gr.Error(str(err)) from err

    def add_message(text, history, base_history, side_by_side):
        text = (text or "").strip()
        if not text:
            return gr.update(), history, base_history
        turn = {"role": "user", "content": text}
        return "", [*(history or []), turn], ([*(base_history or []), turn] if side_by_side else base_history)

    def respond(request: gr.Request, chosen, history, base_history, side_by_side, system_prompt, temp, top, max_new):
        user = current_user(runs, request)
        history, base_history = list(history or []), list(base_history or [])
        if not history or history[-1].get("role") != "user":
            yield history, base_history
            return
        if not chosen:
            yield [*history, {"role": "assistant", "content": f"{WARNING} Choose a run or a model to chat with first."}], \
                base_history
            return
        params = {"temperature": float(temp), "top_p": float(top), "max_tokens": int(max_new)}
        answer, base_answer = {"role": "assistant", "content": ""}, {"role": "assistant", "content": ""}
        run_match = RUN_MODEL.match(str(chosen))
        try:
            if side_by_side and run_match:
                pairs = chat.side_by_side(user, int(run_match.group(1)), to_messages(history, system_prompt),
                                          to_messages(base_history, system_prompt), **params)
                for answer["content"], base_answer["content"] in pairs:
                    yield [*history, answer], [*base_history, base_answer]
            else:
                if side_by_side:  # a served model has no "base" of its own
                    base_answer["content"] = f"{WARNING} Side by side compares a run with its base model: choose a run."
                for delta in chat.stream(user, str(chosen), to_messages(history, system_prompt), **params):
                    answer["content"] += delta
                    yield [*history, answer], base_history
        except (NotFound, PortalError, InferenceError, ValueError) as err:
            answer["content"] = f"{answer['content']}\n\n{WARNING} {err}".strip()
        for reply in (answer, base_answer):
            if not reply["content"]:
                reply["content"] = f"{WARNING} The model returned an empty answer."
        yield [*history, answer], ([*base_history, base_answer] if side_by_side else base_history)

    inputs = [target, chatbot, base_chatbot, compare, system, temperature, top_p, max_tokens]
    submitted = message.submit(add_message, [message, chatbot, base_chatbot, compare], [message, chatbot, base_chatbot],
                               queue=False).then(respond, inputs, [chatbot, base_chatbot])
    clicked = send_btn.click(add_message, [message, chatbot, base_chatbot, compare], [message, chatbot, base_chatbot],
                             queue=False).then(respond, inputs, [chatbot, base_chatbot])
    stop_btn.click(None, None, None, cancels=[submitted, clicked])
    clear_btn.click(lambda: ([], []), None, [chatbot, base_chatbot], queue=False)
    # the base model's column shows only side by side, and starts empty: it is sent its own turns
    compare.change(lambda on: gr.update(visible=on, value=[]), [compare], [base_chatbot], queue=False)
    reload_btn.click(reload, None, target)
    unload_btn.click(unload, [target], None)
    return {"target": target, "reload": reload}
