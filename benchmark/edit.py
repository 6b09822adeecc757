"""``subjectbench edit replace``: put a learned subject into a real photo (HiFi Tuner's subject
replacement: null-text inversion + Prompt-to-Prompt, ``methods/subject_replacement.py``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_commands(commands: argparse._SubParsersAction) -> None:
    edit = commands.add_parser("edit", help="edit real images with a learned subject")
    actions = edit.add_subparsers(dest="edit_command", metavar="ACTION")
    actions.required = True
    replace = actions.add_parser(
        "replace",
        help="replace a word's object in a photo by a trained subject",
        description="Null-text-invert IMG with its caption, swap WORD for the learned subject and "
        "regenerate with Prompt-to-Prompt. Writes OUT (the edit), OUT's stem + '-mask.png' (the "
        "subject's cross-attention mask), '-reconstruction.png' and a JSON record.",
    )
    replace.add_argument("--image", required=True, help="the photo to edit")
    replace.add_argument("--subject", required=True,
                         help="a state folder (runs/x/states/<trainer>/<subject>/<key>) or a subject id with --run")
    replace.add_argument("--run", default=None, help="run directory whose states hold the subject")
    replace.add_argument("--word", required=True, help="the word of the caption to replace, e.g. cat")
    replace.add_argument("--prompt", default=None, help="the photo's caption (default: 'a photo of a WORD')")
    replace.add_argument("--out", required=True, help="output PNG")
    replace.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    replace.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default 7.5)")
    replace.add_argument("--cross-replace", type=float, default=0.8, help="fraction of steps with source cross-attention")
    replace.add_argument("--self-replace", type=float, default=0.4, help="fraction of steps with source self-attention")
    replace.add_argument("--device", default="auto", help="cpu, cuda or auto")
    replace.set_defaults(handler=cmd_replace)


def cmd_replace(args: argparse.Namespace) -> int:
    from benchmark.environment import resolve_device
    from benchmark.store import atomic_write_image, atomic_write_json
    from methods.base import SamplerConfig
    from methods.prompt_to_prompt import EditError
    from methods.subject_replacement import find_state, load_trained, replace_subject

    try:
        if not Path(args.image).expanduser().is_file():
            raise EditError(f"image {args.image} does not exist; give --image a photo file")
        state_dir = find_state(args.subject, args.run)
        method, state = load_trained(state_dir, resolve_device(args.device))
        sampler = SamplerConfig(steps=args.steps, guidance=args.guidance)
        result = replace_subject(method, state, args.image, args.word, args.prompt, sampler,
                                 args.cross_replace, args.self_replace)
    except EditError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser()
    atomic_write_image(out, result.edited)
    atomic_write_image(out.with_name(f"{out.stem}-reconstruction.png"), result.reconstruction)
    if result.mask is not None:
        from PIL import Image

        atomic_write_image(out.with_name(f"{out.stem}-mask.png"), Image.fromarray(result.mask.astype("uint8") * 255))
    atomic_write_json(out.with_suffix(".json"), result.record)
    print(f"{result.edited_prompt!r} <- {result.source_prompt!r}: wrote {out}")
    return 0
