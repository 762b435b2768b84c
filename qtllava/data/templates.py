"""Chat templates as data: a frozen dataclass of formatter slots and a registry by exact name.

A template turns a LLaVA conversation (``[{"from": "human"|"gpt", "value": str}, ...]``) into token ids and labels.
Labels are -100 everywhere except on the assistant answers and the token(s) that close them (``<|im_end|>`` for
ChatML, eos for the pretrain and llama templates). Every segment is tokenised on its own and the ids concatenated,
so masks line up exactly with the text they come from.

Slots (``{content}`` is the turn's text; ``{eos}`` is replaced by the tokenizer's eos token):

- ``system``: text before the first turn (``{system}`` is filled from ``system_prompt``); used only when
  ``system_prompt`` is non-empty. Masked.
- ``user``: one human turn. Masked.
- ``assistant_prefix``: opens an assistant turn; a generation prompt ends with it. Masked.
- ``assistant``: the answer and its end token(s). Trained.
- ``separator``: after each assistant turn. Masked.
- ``image_only``: drop the human text and keep only its ``<image>`` placeholders (LLaVA "plain" pre-training).
- ``bos``: prepend the tokenizer's bos token when it has one.
- ``stop``: token strings that end generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from .tokenizer import IMAGE, image_token_id

from qtllava.constants import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "Template",
    "TEMPLATES",
    "FROM_TOKENIZER",
    "register_template",
    "get_template",
    "template_from_tokenizer",
    "template_name",
    "expand_image_tokens",
]



@dataclass(frozen=True)
class Template:
    name: str
    user: str = "{content}"
    assistant_prefix: str = ""
    assistant: str = "{content}"
    separator: str = ""
    system: str = ""
    system_prompt: str = ""
    image_only: bool = False
    bos: bool = False
    stop: tuple[str, ...] = ("{eos}",)

    def with_system(self, prompt: str) -> "Template":
        """A copy with the system prompt switched on (empty string switches it off)."""
        return replace(self, system_prompt=prompt)

    # --- encoding -------------------------------------------------------------------------------------------

    def _fill(self, slot: str, tok: PreTrainedTokenizerBase, content: str = "") -> str:
        eos = tok.eos_token or ""
        return slot.replace("{eos}", eos).replace("{system}", self.system_prompt).replace("{content}", content)

    def _user_text(self, value: str) -> str:
        if self.image_only:
            return IMAGE * value.count(IMAGE)
        return value

    def segments(self, conversations: Sequence[dict[str, Any]], tok: PreTrainedTokenizerBase,
                 generation: bool = False) -> list[tuple[str, bool]]:
        """(text, trained) pieces of a conversation. With `generation`, the conversation must end with a human
        turn and the pieces end with an open assistant turn."""
        segs: list[tuple[str, bool]] = []
        if self.system and self.system_prompt:
            segs.append((self._fill(self.system, tok), False))
        for i, turn in enumerate(conversations):
            role, value = turn["from"], turn["value"]
            if role == "human":
                segs.append((self._fill(self.user, tok, self._user_text(value)) + self._fill(self.assistant_prefix,
                                                                                          tok), False))
            elif role == "gpt":
                segs.append((self._fill(self.assistant, tok, value), True))
                if self.separator:
                    segs.append((self._fill(self.separator, tok), False))
            else:
                raise ValueError(f"unknown role {role!r} in turn {i}")
        if generation and (not conversations or conversations[-1]["from"] != "human"):
            raise ValueError("a generation prompt must end with a human turn")
        return segs

    def encode(self, conversations: Sequence[dict[str, Any]], tok: PreTrainedTokenizerBase,
               num_image_tokens: int = 1) -> tuple[list[int], list[int]]:
        """Token ids and labels of a whole conversation (each `<image>` expanded to `num_image_tokens` ids)."""
        ids, labels = self._encode(self.segments(conversations, tok), tok)
        return expand_image_tokens(ids, labels, image_token_id(tok), num_image_tokens)

    def encode_prompt(self, conversations: Sequence[dict[str, Any]] | str, tok: PreTrainedTokenizerBase,
                      num_image_tokens: int = 1) -> list[int]:
        """Ids of a generation prompt: the conversation so far (ending with a human turn) + an open assistant turn.
        A plain string is taken as a single human turn."""
        if isinstance(conversations, str):
            conversations = [{"from": "human", "value": conversations}]
        ids, labels = self._encode(self.segments(conversations, tok, generation=True), tok)
        return expand_image_tokens(ids, labels, image_token_id(tok), num_image_tokens)[0]

    def _encode(self, segs: list[tuple[str, bool]], tok: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        if self.bos and tok.bos_token_id is not None:
            ids.append(tok.bos_token_id)
            labels.append(IGNORE_INDEX)
        for text, trained in segs:
            if not text:
                continue
            piece = tok(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        return ids, labels

    def stop_token_ids(self, tok: PreTrainedTokenizerBase) -> list[int]:
        """Ids that end generation (each stop string must be a single token)."""
        out = []
        for s in self.stop:
            s = self._fill(s, tok)
            tid = tok.convert_tokens_to_ids(s)
            if isinstance(tid, int) and tid >= 0 and tid != tok.unk_token_id and tid not in out:
                out.append(tid)
        if tok.eos_token_id is not None and tok.eos_token_id not in out:
            out.append(tok.eos_token_id)
        return out


def expand_image_tokens(ids: list[int], labels: list[int], image_id: int, n: int) -> tuple[list[int], list[int]]:
    """Replace each `<image>` id by `n` copies (labels -100), as the HF LLaVA processor does."""
    if n == 1:
        return ids, [IGNORE_INDEX if t == image_id else lab for t, lab in zip(ids, labels)]
    out_i: list[int] = []
    out_l: list[int] = []
    for t, lab in zip(ids, labels):
        if t == image_id:
            out_i += [image_id] * n
            out_l += [IGNORE_INDEX] * n
        else:
            out_i.append(t)
            out_l.append(lab)
    return out_i, out_l


TEMPLATES: dict[str, Template] = {}


def register_template(t: Template) -> Template:
    """Add a template to the registry; a second template of the same name raises ValueError."""
    if t.name in TEMPLATES:
        raise ValueError(f"template {t.name!r} is already registered")
    TEMPLATES[t.name] = t
    return t


# template names resolved from the tokenizer's own chat template (a pretrained LLM's folder carries one): without
# and with the system prompt that template puts in front of a conversation that has none
FROM_TOKENIZER = ("auto", "auto-system")


def template_name(cfg: Any) -> str:
    """The chat template a qtllava Config selects: the tokenizer's own (from `llm.pretrained`'s folder) whenever a
    pretrained LLM is set or `data.template` is "auto", else `data.template`."""
    if cfg.llm.pretrained or cfg.data.template in FROM_TOKENIZER:
        return FROM_TOKENIZER[1] if cfg.data.system_prompt else FROM_TOKENIZER[0]
    return cfg.data.template


def get_template(name: str | Template, tok: PreTrainedTokenizerBase | None = None) -> Template:
    """The template registered under exactly `name` (a Template passes through); "auto" / "auto-system" derive it
    from `tok`'s chat template. Unknown names raise KeyError."""
    if isinstance(name, Template):
        return name
    if name in FROM_TOKENIZER:
        if tok is None:
            raise ValueError(f"chat template {name!r} is read from a tokenizer; none was given")
        return template_from_tokenizer(tok, system_prompt=name == FROM_TOKENIZER[1])
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None


_S, _U, _U2, _A = "\x02SYSTEM\x03", "\x02USER\x03", "\x02USER2\x03", "\x02ANSWER\x03"


def template_from_tokenizer(tok: PreTrainedTokenizerBase, system_prompt: bool = False) -> Template:
    """The slots of `tok`'s Jinja chat template, read off by rendering conversations of marker strings.

    The assistant slot ends after the first end-of-turn token that follows the answer (trained); what comes after
    it is the separator. `system_prompt`: keep the system text the template inserts when a conversation has none
    (SmolLM2's: 21 tokens); off by default to keep sequences short. Raises ValueError when the tokenizer has no chat
    template or the template does not render as a sequence of turns."""
    chat = getattr(tok, "chat_template", None)
    if not isinstance(chat, str) or not chat:
        raise ValueError(f"tokenizer {getattr(tok, 'name_or_path', '')!r} has no chat template")
    return _slots(chat, tok.eos_token or "", system_prompt, tok)


def _slots(chat: str, eos: str, system_prompt: bool, tok: PreTrainedTokenizerBase) -> Template:
    key = (chat, eos, system_prompt)
    if key in _SLOT_CACHE:
        return _SLOT_CACHE[key]

    def render(msgs: list[tuple[str, str]], gen: bool = False) -> str:
        return tok.apply_chat_template([{"role": r, "content": c} for r, c in msgs], tokenize=False,
                                       add_generation_prompt=gen)

    def fail(why: str) -> ValueError:
        return ValueError(f"chat template of {getattr(tok, 'name_or_path', '')!r} cannot be read as turns: {why}")

    with_sys = render([("system", _S), ("user", _U)])
    prompt = render([("system", _S), ("user", _U)], gen=True)
    answered = render([("system", _S), ("user", _U), ("assistant", _A)])
    two = render([("system", _S), ("user", _U), ("assistant", _A), ("user", _U2)])
    if not (prompt.startswith(with_sys) and answered.startswith(with_sys) and two.startswith(answered)):
        raise fail("a longer conversation does not extend a shorter one")
    assistant_prefix = prompt[len(with_sys):]
    turn = answered[len(with_sys):]
    if not turn.startswith(assistant_prefix) or _A not in turn:
        raise fail("the assistant turn does not start with the generation prompt")
    after = turn[turn.index(_A) + len(_A):]
    end = after.index(eos) + len(eos) if eos and eos in after else len(after)
    assistant, separator = turn[len(assistant_prefix):turn.index(_A)] + "{content}" + after[:end], after[end:]
    user_block = two[len(answered):]
    if _U2 not in user_block:
        raise fail("no user turn found")
    user = user_block.replace(_U2, "{content}")
    filled = user.replace("{content}", _U)
    if not with_sys.endswith(filled) or _S not in with_sys:
        raise fail("the system turn is not followed by the user turn")
    system = with_sys[:-len(filled)].replace(_S, "{system}")
    alone = render([("user", _U)])
    default = ""
    if alone != filled:  # the template inserts a system turn of its own
        head, tail = system.split("{system}")
        inserted = alone[:-len(filled)]
        if not (inserted.startswith(head) and inserted.endswith(tail)):
            raise fail("its default system turn does not fit its system slot")
        default = inserted[len(head):len(inserted) - len(tail)]
    stops = ("{eos}",)
    t = Template(name="auto-system" if system_prompt else "auto", user=user, assistant_prefix=assistant_prefix,
                 assistant=assistant, separator=separator, system=system,
                 system_prompt=default if system_prompt else "", stop=stops)
    _SLOT_CACHE[key] = t
    return t


_SLOT_CACHE: dict[tuple, Template] = {}


# LLaVA "plain" / TinyLLaVA "pretrain": image tokens, then the caption and eos; only the caption is trained.
register_template(Template(name="pretrain", user="{content}", assistant="{content}{eos}", image_only=True,
                           stop=("{eos}",)))

# ChatML as Qwen2 uses it; the system prompt is off by default to keep sequences short.
register_template(Template(
    name="qwen2",
    system="<|im_start|>system\n{system}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    separator="\n",
    stop=("<|im_end|>", "{eos}"),
))

# TinyLLaVA Factory's "qwen2_base": Vicuna-v1 turns closed by the Qwen2 eos, no bos. The answer follows
# "ASSISTANT:" and a space, so a byte-level BPE gives its first word the same token as inside a sentence
# ("Ġcircle"), which is the token the options of a multiple-choice question carry.
register_template(Template(
    name="qwen2_base",
    system="{system} ",
    user="USER: {content} ",
    assistant_prefix="ASSISTANT:",
    assistant=" {content}{eos}",
    stop=("{eos}",),
))

# Vicuna-v1 style, as LLaVA/TinyLLaVA use with Llama-family LLMs.
register_template(Template(
    name="llama",
    system="{system} ",
    user="USER: {content} ",
    assistant_prefix="ASSISTANT:",
    assistant=" {content}{eos}",
    bos=True,
    stop=("{eos}",),
))
