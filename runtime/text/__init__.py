"""Text: the CLIP tokenizer, the webui's prompt language, extra-network tags, textual inversion
embeddings and the text encoder that turns a prompt into conditioning."""
