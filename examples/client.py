"""Ask `mmedge serve` about an image with the OpenAI Python client, streaming the answer.

    mmedge serve mmedge/models/shapes-smolvlm.pkg            # in another terminal (after mmedge export ...)
    python examples/client.py --image examples/images/shapes.png --question "caption"

Then a follow-up question about the same image: the client sends the whole conversation again, as OpenAI clients
do, and the server finds the earlier turn in its KV cache (`cached_tokens` below).
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import sys

from openai import OpenAI


def image_part(path: str) -> dict:
    mime = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def ask(client: OpenAI, model: str, messages: list[dict], max_tokens: int) -> str:
    """Stream one answer to stdout; return it whole."""
    pieces = []
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            print(pieces[-1], end="", flush=True)
        if chunk.usage:
            cached = chunk.usage.prompt_tokens_details.cached_tokens if chunk.usage.prompt_tokens_details else 0
            print(f"\n[{chunk.usage.prompt_tokens} prompt tokens, {cached} of them cached; "
                  f"{chunk.usage.completion_tokens} generated]", file=sys.stderr, flush=True)
    return "".join(pieces)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    p.add_argument("--model", help="a served package's name (default: the first the server lists)")
    p.add_argument("--image", required=True)
    p.add_argument("--question", default="caption")
    p.add_argument("--follow-up", default="how many circles?", help="asked next about the same image")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    messages = [{"role": "user", "content": [image_part(args.image), {"type": "text", "text": args.question}]}]
    answer = ask(client, model, messages, args.max_tokens)
    if args.follow_up:
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": args.follow_up}]
        ask(client, model, messages, args.max_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
