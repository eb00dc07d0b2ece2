"""Gradio's queue loop idles at the app's pace (editor/ui.py calm_queue), not every 1 ms."""

import gradio as gr

from editor.ui import QUEUE_IDLE_SLEEP_S, calm_queue


def test_the_queue_looks_for_work_at_the_apps_pace():
    with gr.Blocks() as demo:
        gr.Markdown("tabwrite")
    demo.queue()
    assert demo._queue.sleep_when_free < QUEUE_IDLE_SLEEP_S  # Gradio's own pace (1 ms on Linux)
    assert calm_queue(demo)  # fails where a Gradio no longer has the setting: then look again
    assert demo._queue.sleep_when_free == QUEUE_IDLE_SLEEP_S


def test_something_without_a_queue_is_left_alone():
    with gr.Blocks() as demo:
        gr.Markdown("tabwrite")
    assert not calm_queue(object())
    assert calm_queue(demo) is (getattr(demo, "_queue", None) is not None)
