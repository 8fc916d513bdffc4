"""A web UI over the library (`animatediff ui`): Gradio is an optional extra, imported only by
`app.py`; the rest (model library, settings, model manager, queue, results) works without it."""
