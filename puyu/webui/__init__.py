"""The Gradio web UI: chat with personas and agent data analysis (`puyu webui`)."""
