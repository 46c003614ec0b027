"""`rsavq generate` and `rsavq chat`: streamed text from an FP or quantized model."""

from __future__ import annotations

import argparse
import sys
import time

from rsavq.cli.common import add_backend_arg, add_model_args, apply_backend, positive_int
from rsavq.errors import UsageError
from rsavq.runtime import resolve_device, resolve_dtype


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_backend_arg(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming tokens")
    _add_sampling_args(p)
    p.add_argument("--prompt", required=True)
    p.set_defaults(func=_cmd_generate)
    c = sub.add_parser("chat", help="chat with the tokenizer's chat template (/exit to quit)")
    _add_sampling_args(c)
    c.add_argument("--system", default=None, help="optional system message")
    c.set_defaults(func=_cmd_chat)


def _load(args):
    from rsavq.models import load_model, resolve_model

    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError("need --temperature >= 0 and 0 < --top-p <= 1")
    resolve_model(args.model)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    apply_backend(model, args.backend)
    return model, tokenizer


def _generate(model, tokenizer, input_ids, args) -> str:
    """Stream the continuation to stdout; print tokens/s; return the new text."""
    import torch
    from transformers import TextStreamer

    torch.manual_seed(args.seed)
    input_ids = input_ids.to(next(model.parameters()).device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=args.max_new_tokens,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            **(sampling if args.temperature > 0 else {"do_sample": False}),
        )
    seconds = time.perf_counter() - start
    new = out[0, input_ids.shape[1] :]
    print(f"[{len(new)} tokens in {seconds:.2f} s: {len(new) / seconds:.1f} tokens/s]")
    return tokenizer.decode(new, skip_special_tokens=True)


def _cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args)
    print(args.prompt, end="", flush=True)
    _generate(model, tokenizer, tokenizer(args.prompt, return_tensors="pt").input_ids, args)
    return 0


def _read_lines():
    prompt = ">>> " if sys.stdin.isatty() else ""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return


def _cmd_chat(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args)
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            f"the tokenizer of {args.model} has no chat template; use `rsavq generate`"
        )
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message, /exit (or end of input) to quit")
    for line in _read_lines():
        text = line.strip()
        if text == "/exit":
            break
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        messages.append({"role": "assistant", "content": _generate(model, tokenizer, ids, args)})
    return 0
