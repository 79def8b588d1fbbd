"""Gradio tabs. Thin: every handler takes the user from gr.Request and calls a service."""
