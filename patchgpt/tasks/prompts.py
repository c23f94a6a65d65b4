"""`ask`: one image and a prompt in, the answer of the task the prompt picks out (Pix2Seq v2's task prompt,
typed by a person).

A prompt is a task's name or one of its `Task.prompt_words` ("caption", "detect", "segment", "denoise"), a
word with an argument after a colon ("draw: red heart"), or a free question, which goes to the task that
answers questions. A checkpoint of one task answers its own prompts; a multi-task checkpoint
(``train multi``) answers those of every task it holds (its `parts`). Nothing here names a task: the words
come from the task classes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError

CONFIDENT = 0.5   # detections the one-line answer names

if TYPE_CHECKING:
    from PIL import Image

    from .base import Task


def parts(task: Task) -> dict[str, Task]:
    """The tasks a checkpoint answers, by name: a multi-task model's parts, or the task itself."""
    held = getattr(task, "parts", None)
    return dict(held) if held else {task.name: task}


def words(task: Task | type[Task]) -> set[str]:
    """The prompts that pick `task` (its name and `prompt_words`, lower case)."""
    return {task.name, *(w.lower() for w in task.prompt_words)}


def menu(task: Task) -> list[str]:
    """One example prompt per task the checkpoint answers (the page's choices, the errors' hints)."""
    out = []
    for part in parts(task).values():
        question = part.demo_options.get("question") if part.answers_questions else None
        out.append(question or (part.prompt_words[0] if part.prompt_words else part.name))
    return out


def route(task: Task, prompt: str | None) -> tuple[Task, dict[str, Any]]:
    """The task `prompt` picks among `task`'s parts, and the options it carries (a question, a text after
    ``word:``); a one-line `ConfigError` for a prompt no part answers, naming the task when the checkpoint was
    not trained for it."""
    from . import TASKS

    held = parts(task)
    text = (prompt or "").strip()
    low = text.lower().rstrip(".!")
    hint = ", ".join(repr(m) for m in menu(task))
    if not text:
        if len(held) == 1:
            only = next(iter(held.values()))
            if not only.answers_questions:
                return only, {}
        raise ConfigError(f"give a prompt: this checkpoint answers {hint}")
    head, colon, arg = low.partition(":")
    for part in held.values():
        if low in words(part):
            return part, {}
        if colon and head.strip() in words(part) and arg.strip():
            return part, {"text": text.split(":", 1)[1].strip()}
    for name, cls in TASKS.items():   # a task's own words, before a free question: "segment" is not a question
        if low in words(cls) or (colon and head.strip() in words(cls)):
            raise ConfigError(f"this checkpoint was not trained for {name} ({text!r}); it answers {hint}")
    for part in held.values():
        if part.answers_questions:
            return part, {"question": text}
    raise ConfigError(f"{text!r} is not a prompt this checkpoint answers; try {hint}")


def summary(result: dict) -> str:
    """One line of text for a person, from a task's result dict (by its keys)."""
    if "caption" in result:
        return str(result["caption"])
    if "answer" in result:
        return str(result["answer"])
    if "class" in result and "score" in result:
        return f"{result['class']} ({result['score']:.0%})"
    if "objects" in result:   # the confident ones (the full list, scores and all, is in the result)
        objs = [o for o in result["objects"] if o["score"] >= CONFIDENT]
        found = ", ".join(f"{o['class']} {o['score']:.2f}" for o in objs[:8])
        return f"{len(objs)} object{'s' if len(objs) != 1 else ''}" + (f": {found}" if found else "")
    if "classes" in result and isinstance(result["classes"], dict):
        shares = ", ".join(f"{k} {v:.0%}" for k, v in result["classes"].items())
        return f"pixels: {shares}"
    if "restored" in result:
        return f"restored image, {result['size'][0]}x{result['size'][1]}"
    if "samples" in result:
        return f"{result['n']} samples of {result['prompt']!r}"
    if "bits_per_dim" in result:
        return f"{result['bits_per_dim']:.3f} bits per dimension"
    return ""


def ask(task: Task, image: str | Path | Image.Image | None, prompt: str | None = None,
        out: str | Path | None = None) -> dict[str, Any]:
    """Answer `prompt` about `image` (a file path or a PIL image) with the task it picks.

    Returns ``{"task", "prompt", "answer" (one line of text), "result" (the task's `predict_files` dict),
    "pictures" (PNG paths written under `out`)}``. Without `out`, pictures go to a fresh temporary directory
    (the caller removes it)."""
    part, options = route(task, prompt)
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="patchgpt-ask-"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="patchgpt-input-") as held_input:
        if image is not None and not isinstance(image, (str, Path)):   # a PIL image: the tasks read files
            path = Path(held_input) / "image.png"                        # outside `out`: a task may name its
            image.save(path, format="PNG")                               # pictures after the input
            image = path
        before = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
        result = part.ask_file(image, out, **options)
    pictures = sorted(str(p) for p in out.glob("*.png") if before.get(p) != p.stat().st_mtime_ns)
    return {"task": part.name, "prompt": prompt or part.name, "answer": summary(result), "result": result,
            "pictures": pictures}
