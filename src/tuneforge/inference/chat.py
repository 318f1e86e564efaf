"""`tuneforge inference --chat`: a multi-turn conversation with commands."""

from __future__ import annotations

from collections.abc import Callable

HELP = "commands: /reset (new conversation), /system <text>, /undo (drop the last exchange), /exit"


def chat_loop(
    reply: Callable[[list[dict[str, str]]], str],
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
    system: str | None = None,
) -> list[dict[str, str]]:
    """Multi-turn chat; `reply(messages)` streams and returns the assistant's answer. Returns the history."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    write(HELP)
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return messages
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return messages
        if text == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            write("(new conversation)")
        elif text == "/system" or text.startswith("/system "):
            messages = [m for m in messages if m["role"] != "system"]
            prompt = text[len("/system"):].strip()
            if prompt:
                messages.insert(0, {"role": "system", "content": prompt})
            write(f"(system prompt {'set' if prompt else 'cleared'})")
        elif text == "/undo":
            while messages and messages[-1]["role"] != "user" and messages[-1]["role"] != "system":
                messages.pop()
            if messages and messages[-1]["role"] == "user":
                messages.pop()
            write("(last exchange removed)")
        elif text.startswith("/"):
            write(f"unknown command {text.split()[0]}; {HELP}")
        else:
            messages.append({"role": "user", "content": line})
            try:
                messages.append({"role": "assistant", "content": reply(messages)})
            except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
                messages.pop()
                write("\n(interrupted)")
