"""A prepared text split in a student's own tokenizer, lined up with the teacher's cache rows.

A student with another tokenizer than the teacher's needs no prepared directory of its own:
each prepared block's text is recovered from the teacher's tokens and tokenized again with the
student's tokenizer (`align.student_block`), so the student sees exactly the text the cached
rows were computed on. Student blocks are padded to one length, `block_size` (the longest
block of any split in the student's tokens), with a mask of the positions it is taught to
predict: every position but the padding for plain text; for response-only data (instruction,
chat) only positions that line up with a cached teacher row. Each taught position carries the
cache row of its teacher position (`align.aligned_positions`), or -1 where none lines up.
Nothing is written: the blocks are recomputed (the tokenizer is fast) and kept for the process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd import align
from kd.prepared import tokens
from kd.prepared.tokens import TokenizerDir

SPLITS = ("labeled", "unlabeled", "test")


@dataclass
class Blocks:
    """Blocks [first, last) of a split in the student's tokens."""

    ids: np.ndarray  # (N,) int64, the prepared ids
    tokens: np.ndarray  # (N, Ls) int64, padded
    predicted: np.ndarray  # (N, Ls - 1) bool: position s is taught token s + 1
    teacher_row: np.ndarray  # (N, Ls - 1) int64: its cache row, counted from block `first`'s first; -1: none
    one_to_one: np.ndarray  # (N, Ls - 1) bool: lined up, and both predicted tokens end together
    characters: np.ndarray  # (N, Ls - 1) int64: characters that start in the token position s predicts
    teacher_characters: np.ndarray  # (N, L - 1) the same for the teacher's positions


@dataclass
class Pair:
    """The teacher's tokenizer (the prepared data's) and a student's, with what lines them up."""

    teacher: TokenizerDir
    student: TokenizerDir
    table: np.ndarray  # (V_teacher,) teacher id -> student id of the same text, -1 (`align.mapping_table`)
    teacher_bytes: list
    student_bytes: list

    def describe(self) -> str:
        return f"student tokenizer {self.student.describe()} vs the teacher's {self.teacher.describe()}"


@functools.lru_cache(maxsize=8)
def pair(prepared: Path, student_dir: Path) -> Pair:
    """The pair of tokenizers of prepared data (the teacher's) and `student_dir`: read and
    mapped once per process."""
    teacher = tokens.prepared_tokenizer(prepared)
    student = tokens.read_tokenizer(student_dir, "student's tokenizer")
    t_bytes, s_bytes = align.token_bytes(teacher.backend), align.token_bytes(student.backend)
    table = align.mapping_table(t_bytes, align.roles(teacher.special), s_bytes, align.roles(student.special))
    return Pair(teacher, student, table, t_bytes, s_bytes)


@functools.lru_cache(maxsize=16)
def _whole(prepared: Path, student_dir: Path, split: str) -> tuple[np.ndarray, list[align.StudentBlock],
                                                                    np.ndarray, np.ndarray | None]:
    """ids, each block in the student's tokens, the teacher blocks and their predicted mask."""
    found = pair(prepared, student_dir)
    source = prepared / f"{split}.parquet"
    ids, blocks = tokens.read_blocks(source)
    predicted = tokens.predicted(source)
    t_roles = align.roles(found.teacher.special)
    special = {i: role for role, i in t_roles.items()}
    s_roles = align.roles(found.student.special)

    def encode(piece: str) -> list[int]:  # the student's tokens of one piece of text
        return found.student.encode([piece])[0]

    return ids, [align.student_block(b, found.teacher_bytes, special, encode, found.student_bytes, s_roles)
                 for b in blocks], blocks, predicted


@functools.lru_cache(maxsize=8)
def block_size(prepared: Path, student_dir: Path) -> int:
    """The student's block length: its longest block over every split (at least 2)."""
    return max(2, *(len(b.tokens) for split in SPLITS if (prepared / f"{split}.parquet").is_file()
                    for b in _whole(prepared, student_dir, split)[1]))


def blocks(prepared: Path, student_dir: Path, split: str, first: int | None = None, last: int | None = None) -> Blocks:
    """Blocks [first, last) of `split` (all by default) in the student's tokens, padded to
    `block_size`, with their taught positions and the teacher rows they line up with."""
    prepared, student_dir = Path(prepared), Path(student_dir)
    ids, student, teacher_blocks, predicted = _whole(prepared, student_dir, split)
    first, last = (0, len(ids)) if first is None else (first, last)
    found = pair(prepared, student_dir)
    length = block_size(prepared, student_dir)
    pad = found.student.special.pad if found.student.special.pad is not None else found.student.special.eos
    n, L = last - first, teacher_blocks.shape[1]
    tokens = np.full((n, length), pad, np.int64)
    taught = np.zeros((n, length - 1), bool)
    row = np.full((n, length - 1), -1, np.int64)
    one = np.zeros((n, length - 1), bool)
    chars = np.zeros((n, length - 1), np.int64)
    t_chars = np.zeros((n, L - 1), np.int64)
    # the cache rows of each teacher position: all of them, or the predicted ones (response-only)
    t_taught = np.ones((n, L - 1), bool) if predicted is None else predicted[first:last]
    t_row = (np.cumsum(t_taught.reshape(-1)) - 1).reshape(n, L - 1)
    for i in range(n):
        block = student[first + i]
        m = len(block.tokens)
        tokens[i, :m] = block.tokens
        position, together = align.aligned_positions(block)
        lined = position >= 0
        row[i, :m - 1][lined] = np.where(t_taught[i][position[lined]], t_row[i][position[lined]], -1)
        taught[i, :m - 1] = True if predicted is None else row[i, :m - 1] >= 0
        one[i, :m - 1] = together & (row[i, :m - 1] >= 0)
        chars[i, :m - 1] = block.characters[1:]
        t_chars[i] = block.teacher_characters[1:]
    return Blocks(ids[first:last], tokens, taught, np.where(taught, row, -1), one & taught, chars, t_chars)


def teacher_characters(prepared: Path, split: str, student_dir: Path | None = None) -> np.ndarray:
    """(N, L - 1) characters that start in the token each teacher position predicts (those of
    the block's whole characters; a special token: 1), for bits per character."""
    prepared = Path(prepared)
    tokenizer = Path(student_dir) if student_dir is not None else prepared
    return blocks(prepared, tokenizer, split).teacher_characters
