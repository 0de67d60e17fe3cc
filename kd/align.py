"""Two tokenizations of the same text, lined up: what lets a student with its own tokenizer
learn from a cache written in the teacher's tokens.

Pure numpy and `tokenizers`, nothing written. Three pieces:
- `token_bytes`: each id of a byte-level BPE (kd's own, GPT-2, Llama-3, Qwen) as the bytes it
  stands for; a SentencePiece-style vocabulary (`▁` for a space, `<0xNN>` byte fallback) too.
  Special and added tokens are not text: they stand for their role (`roles`).
- `mapping_table`: teacher id -> student id whose bytes are exactly the same (special tokens by
  role: eos <-> eos, bos <-> bos; a pad is never predicted), or -1. Built once per pair.
- `student_block`: a teacher block's text (its tokens' bytes, a character cut at either end of
  the block trimmed, the teacher's eos between documents kept as a role) tokenized with the
  student's tokenizer, each document piece on its own (as `kd prepare` tokenizes documents),
  with both tokenizations' start and end offsets on one axis: the block's bytes, a special
  token taking one unit. `aligned_positions` then pairs the student position that predicts the
  token starting at offset b with the teacher position that predicts the teacher token
  starting at the same b: the same text seen, the same next-character boundary. Where the
  predicted tokens also end at the same offset the pair is one-to-one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer, pre_tokenizers

from kd.errors import InputError

ROLES = ("eos", "bos", "pad", "mask")
PAD = -1  # a block position beyond the student's tokens


def _byte_decoder() -> dict[str, int]:
    # GPT-2's byte-level alphabet: the printable stand-in of each byte -> the byte
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # tokenizers gives the set unordered; rebuild GPT-2's bytes_to_unicode to know which is which
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = {chr(c): b for b, c in zip(bs, cs)}
    assert set(table) == set(alphabet)
    return table


def _kind(backend: Tokenizer) -> str:
    """"byte_level" or "metaspace": how the vocabulary's strings stand for bytes."""
    spec = json.loads(backend.to_str())
    found = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if '"ByteLevel"' in found:
        return "byte_level"
    if '"Metaspace"' in found or '"ByteFallback"' in found:
        return "metaspace"
    raise InputError("tokenizer: neither byte-level (GPT-2 style) nor SentencePiece-style (Metaspace); kd can only "
                     f"line up texts of those (pre-tokenizer/decoder {found[:120]})")


def token_bytes(backend: Tokenizer) -> list[bytes | None]:
    """id -> the bytes it stands for; None for an added (special) token."""
    kind = _kind(backend)
    added = {i for i in backend.get_added_tokens_decoder()}
    table: list[bytes | None] = [None] * backend.get_vocab_size(with_added_tokens=True)
    decode = _byte_decoder()
    for piece, i in backend.get_vocab(with_added_tokens=True).items():
        if i in added or i >= len(table):
            continue
        if kind == "byte_level":
            try:
                table[i] = bytes(decode[c] for c in piece)
            except KeyError:  # a string outside the alphabet: not text this tokenizer can give
                table[i] = None
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            table[i] = bytes([int(piece[3:5], 16)])
        else:
            table[i] = piece.replace("\u2581", " ").encode()
    return table


def roles(special) -> dict[str, int]:
    """role -> id of a tokenizer's special tokens (`tokens.SpecialIds`), those it has."""
    return {role: getattr(special, role) for role in ROLES if getattr(special, role, None) is not None}


def mapping_table(teacher_bytes: list[bytes | None], teacher_roles: dict[str, int],
                  student_bytes: list[bytes | None], student_roles: dict[str, int]) -> np.ndarray:
    """(V_teacher,) int64: the student id with exactly the same bytes, or the student's token of
    the same role (eos, bos, mask; never pad: it is not predicted), or -1."""
    by_bytes: dict[bytes, int] = {}
    for i, b in enumerate(student_bytes):
        if b is not None:
            by_bytes.setdefault(b, i)
    table = np.array([-1 if b is None else by_bytes.get(b, -1) for b in teacher_bytes], np.int64)
    for role, i in teacher_roles.items():
        if role != "pad" and i < len(table):
            table[i] = student_roles.get(role, -1)
    if "pad" in teacher_roles and teacher_roles["pad"] < len(table):
        table[teacher_roles["pad"]] = -1
    return table


@dataclass
class StudentBlock:
    """One teacher block in the student's tokens, both on the block's byte axis."""

    tokens: np.ndarray  # (n,) int64 student ids
    start: np.ndarray  # (n,) int64 offset of each student token
    end: np.ndarray  # (n,)
    teacher_start: np.ndarray  # (L,) int64 offset of each teacher token
    teacher_end: np.ndarray  # (L,)
    characters: np.ndarray  # (n,) int64 characters that start in each student token (special: 1)
    teacher_characters: np.ndarray  # (L,)


def _utf8_lead(data: np.ndarray) -> np.ndarray:
    # bytes (n,) uint8 -> bool: a character starts here (not a continuation byte 10xxxxxx)
    return (data & 0xC0) != 0x80


def _trim(data: bytes, head: bool, tail: bool) -> tuple[int, int]:
    """[first, last) of `data` that is whole UTF-8 characters: at the head (the block cut the
    text there) the continuation bytes of a character begun before it dropped, at the tail a
    character left unfinished."""
    first, last = 0, len(data)
    if head:
        while first < last and data[first] & 0xC0 == 0x80:
            first += 1
    if tail and last > first:
        lead = last - 1
        while lead > first and data[lead] & 0xC0 == 0x80:
            lead -= 1
        byte = data[lead]
        need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
        if last - lead < need:
            last = lead
    return first, last


def student_block(teacher_tokens: np.ndarray, teacher_bytes: list[bytes | None], teacher_special: dict[int, str],
                  encode, student_bytes: list[bytes | None], student_roles: dict[str, int]) -> StudentBlock:
    """A teacher block (L,) in the student's tokens. `teacher_special`: teacher id -> role of its
    special tokens (a pad is dropped: it is not text); `encode(str) -> list[int]` the student's
    tokenization of a piece of text, no special token added; `student_roles` role -> id."""
    teacher_tokens = np.asarray(teacher_tokens, np.int64)
    width = np.array([1 if t in teacher_special else len(teacher_bytes[t] or b"") for t in teacher_tokens], np.int64)
    if (width == 0).any():
        raise InputError(f"teacher token {int(teacher_tokens[width == 0][0])} stands for no text and is no special "
                         "token; cannot line it up")
    t_end = np.cumsum(width)
    t_start = t_end - width
    t_chars = np.zeros(len(teacher_tokens), np.int64)
    ids: list[int] = []
    starts: list[int] = []
    ends: list[int] = []
    chars: list[int] = []
    i, n = 0, len(teacher_tokens)
    while i < n:
        token = int(teacher_tokens[i])
        if token in teacher_special:
            role = teacher_special[token]
            t_chars[i] = 1
            if role != "pad" and role in student_roles:
                ids.append(student_roles[role])
                starts.append(int(t_start[i]))
                ends.append(int(t_end[i]))
                chars.append(1)
            i += 1
            continue
        j = i
        while j < n and int(teacher_tokens[j]) not in teacher_special:
            j += 1
        data = b"".join(teacher_bytes[int(t)] for t in teacher_tokens[i:j])
        lead = _utf8_lead(np.frombuffer(data, np.uint8))
        first, last = _trim(data, head=i == 0, tail=j == n)
        # the characters that start in each teacher token, inside the kept text
        kept_lead = lead.copy()
        kept_lead[:first] = False
        kept_lead[last:] = False
        ends_here = np.cumsum(kept_lead)
        seg_t_end = t_end[i:j] - t_start[i]
        before = np.concatenate([[0], ends_here[seg_t_end[:-1] - 1]]) if j > i else np.zeros(0, np.int64)
        t_chars[i:j] = ends_here[seg_t_end - 1] - before
        if last > first:
            try:
                piece = data[first:last].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"teacher block: its text is not UTF-8 ({exc})") from None
            offset = int(t_start[i]) + first
            spelled = []
            for sid in encode(piece):
                b = student_bytes[sid]
                if b is None:
                    raise InputError(f"student token {sid}: a special token inside the text; cannot line it up")
                ids.append(int(sid))
                starts.append(offset)
                offset += len(b)
                ends.append(offset)
                chars.append(int(_utf8_lead(np.frombuffer(b, np.uint8)).sum()))
                spelled.append(b)
            if b"".join(spelled) != data[first:last]:
                raise InputError("student tokenizer: its tokens do not spell the text back byte for byte (a "
                                 "normalizer changes it); kd lines up byte-exact tokenizers only")
        i = j
    return StudentBlock(np.array(ids, np.int64), np.array(starts, np.int64), np.array(ends, np.int64),
                        t_start, t_end, np.array(chars, np.int64), t_chars)


def aligned_positions(block: StudentBlock) -> tuple[np.ndarray, np.ndarray]:
    """(n - 1,) int64 and bool: for student position s (predicting student token s + 1), the
    teacher position t (predicting teacher token t + 1) whose predicted token starts at the same
    offset, -1 where none does; and whether the two predicted tokens also end together."""
    s_start, s_end = block.start[1:], block.end[1:]
    t_start, t_end = block.teacher_start[1:], block.teacher_end[1:]  # teacher position t predicts token t + 1
    where = np.searchsorted(t_start, s_start)
    inside = where < len(t_start)
    found = np.zeros(len(s_start), bool)
    found[inside] = t_start[where[inside]] == s_start[inside]
    position = np.where(found, where, -1).astype(np.int64)
    one = np.zeros(len(s_start), bool)
    one[found] = t_end[where[found]] == s_end[found]
    return position, one
