"""``crslight chat``: talk to a trained recommender in the terminal.

The conversation is kept as schema turns (``crslight.schema``) and every reply is generated from exactly the
prompt the policy was trained on: :func:`crslight.models.tokenize.encode_prompt` with the same system prompt, i.e. the
tokenizer's chat template with the assistant header appended. Generation stops at the end of the assistant's turn
(EOS plus the template's end-of-turn tokens, :func:`crslight.simulator.lm.stop_token_ids`). The titles in each reply are
linked to catalogue ids with the :class:`~crslight.simulator.linker.ItemLinker` over the chosen dataset's catalogue, as
the simulator and the evaluation read replies, and are printed under the reply::

    you> something funny for tonight?
    recommender> You might like Up (2009), it is warm and funny.
      → linked: Up (2009) [id 12345]

``/reset`` starts a new conversation, ``/quit`` (or end of input, Ctrl-D) leaves with exit code 0. A policy that is not
there gives one line on stderr and exit code 2, as do a dataset that cannot be read and a folder that does not load.
Sampling is seeded per reply when ``seed`` is given; ``temperature=0`` decodes greedily.

Deliberately left out: streaming tokens as they are generated (a reply of 64 tokens from a 135M model takes about a
second on a CPU) and saving transcripts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch

from crslight.models.loading import DEFAULT_POLICY
from crslight.models.tokenize import DEFAULT_SYSTEM_PROMPT, encode_prompt
from crslight.schema import RECOMMENDER, SEEKER, turn
from crslight.simulator.linker import ItemLinker
from crslight.simulator.lm import stop_token_ids

PROMPT = "you> "
"""What the user is prompted with."""

HELP = "commands: /reset starts a new conversation, /quit (or Ctrl-D) leaves, /help shows this"

ALIASES = (DEFAULT_POLICY,)
"""Policy names that are not folders."""


class ChatSession:
    """One conversation with a policy: the turns so far, generation and item linking.

    Args:
        model: a transformers causal LM (the policy), in eval mode.
        tokenizer: its tokenizer, with a chat template and a pad token.
        linker: links titles in the replies to catalogue ids.
        names: catalogue id → display name, for printing the linked items.
        system_prompt: the system message before the conversation (the one the policy was trained with).
        max_new_tokens: longest reply, in tokens.
        temperature: sampling temperature; 0 decodes greedily.
        top_p: nucleus sampling mass (1.0 turns it off).
        max_context_tokens: longest prompt; the oldest turns are dropped to fit (the system prompt stays).
        seed: seeds each reply's sampling (``seed + reply number``); None leaves torch's generator alone.
        item_scores: the policy's item scores as :func:`crslight.models.retrieval.load_item_scores` returns them
            (``(head, item ids, names)``, written by ``crslight export``); given, replies are decoded by the engine
            (:mod:`crslight.models.engine`): at a recommendation slot the best item not yet mentioned is drawn from
            them and its title written in (``top_p`` is not used), and a reply's items are the ones drawn.
    """

    def __init__(
        self,
        model,
        tokenizer,
        linker: ItemLinker,
        names: dict[str, str] | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_new_tokens: int = 64,
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_context_tokens: int = 1024,
        seed: int | None = None,
        item_scores: tuple | None = None,
    ):
        self.model, self.tokenizer, self.linker = model, tokenizer, linker
        self.policy = None
        if item_scores is not None:
            from crslight.models.engine import Engine, EnginePolicy

            head, item_ids, item_names = item_scores
            slot_names = dict(zip(item_ids, item_names, strict=True))
            engine = Engine(model, tokenizer, head.to(next(model.parameters()).device), list(item_names),
                            max_new_tokens=max_new_tokens, temperature=temperature, greedy_items=True)
            self.policy = EnginePolicy(engine, lambda turns: encode_prompt(tokenizer, turns, system_prompt,
                                                                           max_context_tokens, slot_names),
                                       item_ids, seed=seed)
        self.names = names or {}
        self.system_prompt = system_prompt
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.max_context_tokens = max_context_tokens
        self.seed = seed
        self.stop_ids = stop_token_ids(tokenizer)
        self._plain = None
        self.replies = 0
        self.turns: list[dict] = []

    def reset(self) -> None:
        """Forgets the conversation."""
        self.turns = []

    @torch.no_grad()
    def generate(self, turns: list[dict]) -> str:
        """The policy's next reply to ``turns`` (schema turns ending with the seeker's), special tokens removed; with
        item scores a :class:`~crslight.models.engine.Reply` carrying the items it recommends."""
        if self.policy is not None:
            self.replies += 1
            return self.policy([turns])[0]
        prompt = encode_prompt(self.tokenizer, turns, self.system_prompt, self.max_context_tokens)
        if self._plain is None:  # the same engine without item scores: a plain sampler
            from crslight.models.engine import Engine

            self._plain = Engine(self.model, self.tokenizer, max_new_tokens=self.max_new_tokens,
                                 temperature=self.temperature, top_p=self.top_p, stop_tokens=self.stop_ids)
        generator = None
        if self.seed is not None:
            device = next(self.model.parameters()).device
            generator = torch.Generator(device=device).manual_seed(self.seed + self.replies)
        self.replies += 1
        return self._plain.decode(self._plain.generate([prompt], generator=generator)[0])

    def send(self, text: str) -> dict:
        """Adds the seeker's ``text`` to the conversation and returns the recommender's reply as a schema turn (its
        ``items`` are the linked catalogue ids). The conversation is unchanged if generation is interrupted."""
        seeker = turn(SEEKER, text, self.linker.link(text))
        reply = self.generate([*self.turns, seeker])
        items = list(reply.items) if hasattr(reply, "items") else self.linker.link(reply)
        recommender = turn(RECOMMENDER, str(reply), items)
        self.turns += [seeker, recommender]
        return recommender

    def describe(self, item: str) -> str:
        """``"Up (2009) [id 12345]"``."""
        return f"{self.names.get(item, item)} [id {item}]"


def _policy_error(policy: str | os.PathLike) -> str | None:
    """Why ``policy`` cannot be a policy, when that is clear before loading anything; else None.

    An alias, an existing model folder or a ``.gguf`` file pass; a path that is not there fails; a bare name such as
    ``org/model`` is left to transformers (it may be a hub id in the local cache).
    """
    name = str(policy)
    if name in ALIASES:
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"{path} is not a transformers model folder (no config.json); write one with `crslight export`"
        return None
    if path.is_file():
        return None if path.suffix == ".gguf" else f"{path} is a file, not a model folder"
    looks_like_path = (
        path.is_absolute() or name.startswith((".", "~")) or name.endswith((".gguf", "/")) or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )
    return _missing(path) if looks_like_path else None


def _missing(path: Path) -> str:
    return (f"no policy folder at {path} (expected a transformers folder from `crslight export`, or an alias: "
            f"{', '.join(ALIASES)})")


def _one_line(error: BaseException) -> str:
    """The first line of an error's message (transformers' messages run over several lines)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def load_catalogue(dataset: str, root: str | None):
    """The catalogue of ``dataset`` (every split of a source shares one)."""
    from crslight.data import load_corpus

    return load_corpus(dataset, root, "test").catalogue


def chat(
    policy: str | os.PathLike,
    dataset: str = "synthetic",
    root: str | None = None,
    max_new_tokens: int = 64,
    input_fn: Callable[[str], str] = input,
    output: TextIO | None = None,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int | None = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    max_context_tokens: int = 1024,
    catalogue=None,
    device: str | None = None,
) -> int:
    """Talks to a policy in the terminal until ``/quit`` or end of input.

    Args:
        policy: a transformers model folder (``crslight export`` writes one), a ``.gguf`` file or an alias
            (``smollm2``).
        dataset: whose catalogue the replies' titles are linked to: ``synthetic``, ``redial``, ``opendialkg`` or
            ``logs``.
        root: the dataset's folder, or the logs folder (not for ``synthetic``).
        max_new_tokens: longest reply, in tokens.
        input_fn: reads one line given the prompt (``input``); raises ``EOFError`` at the end of input.
        output: where replies go (default ``sys.stdout``). Errors go to ``sys.stderr``.
        temperature: sampling temperature; 0 decodes greedily.
        top_p: nucleus sampling mass.
        seed: seeds each reply's sampling; None samples from torch's global generator.
        system_prompt: the system message; the default is the one the DataModules train with.
        max_context_tokens: longest prompt; the oldest turns are dropped to fit.
        catalogue: a catalogue (``datasets.Dataset`` or mapping with ``item_id``, ``name``, ``popularity``) to link
            against instead of loading ``dataset``'s.
        device: ``"cpu"``, ``"cuda"``, ...; default: CUDA when available.

    Returns:
        The exit code: 0 after ``/quit`` or end of input, 2 when the policy or the catalogue cannot be loaded.
    """
    out = output if output is not None else sys.stdout
    if (problem := _policy_error(policy)) is not None:
        print(f"crslight chat: {problem}", file=sys.stderr)
        return 2
    if catalogue is None:
        from crslight.data import DataError

        try:
            catalogue = load_catalogue(dataset, root)
        except (DataError, ValueError, OSError) as e:
            print(f"crslight chat: cannot read the {dataset} catalogue: {_one_line(e)}", file=sys.stderr)
            return 2
    from crslight.models.loading import load_causal_lm, load_tokenizer

    try:
        tokenizer = load_tokenizer(policy, padding_side="left")
        model = load_causal_lm(policy)
    except (OSError, ValueError) as e:
        if not Path(policy).expanduser().exists():  # a bare name that is neither a folder nor a loadable model
            print(f"crslight chat: {_missing(Path(policy))}", file=sys.stderr)
        else:
            print(f"crslight chat: cannot load policy {policy}: {_one_line(e)}", file=sys.stderr)
        return 2
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    names = dict(zip(catalogue["item_id"], catalogue["name"], strict=True))
    from crslight.models.retrieval import load_item_scores

    item_scores = load_item_scores(policy) if Path(policy).expanduser().is_dir() else None
    session = ChatSession(
        model, tokenizer, ItemLinker.from_catalogue(catalogue), names,
        system_prompt=system_prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        max_context_tokens=max_context_tokens, seed=seed, item_scores=item_scores,
    )
    print(f"crslight chat: {policy} on {device}, linking to the {dataset} catalogue ({len(session.linker)} items)",
          file=out)
    print(HELP, file=out, flush=True)
    if input_fn is input and sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # Windows
            pass
    return repl(session, input_fn, out)


def repl(session: ChatSession, input_fn: Callable[[str], str], out: TextIO) -> int:
    """Reads lines and prints replies until ``/quit`` or end of input; returns the exit code (0)."""
    while True:
        try:
            line = input_fn(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out, flush=True)  # end the prompt's line
            return 0
        if not line:
            continue
        if line.startswith("/"):
            command = line.split()[0].lower()
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                session.reset()
                print("(new conversation)", file=out, flush=True)
            elif command == "/help":
                print(HELP, file=out, flush=True)
            else:
                print(f"unknown command {command}; {HELP}", file=out, flush=True)
            continue
        try:
            reply = session.send(line)
        except KeyboardInterrupt:
            print("(interrupted)", file=out, flush=True)
            continue
        print(f"recommender> {reply['text'] or '(empty reply)'}", file=out)
        for item in reply["items"]:
            print(f"  → linked: {session.describe(item)}", file=out)
        out.flush()
