"""图文创作 (image-text composition, InternLM-XComposer2): an article with image slots the model places, each slot
filled from a local image folder, exported as Markdown and HTML."""
