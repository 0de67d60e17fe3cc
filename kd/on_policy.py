"""The `on_policy` section of params.yaml: the rounds an on-policy pipeline runs (examples/on_policy).

Round 0's student learns from the teacher's answers; in round r (1..R) round r-1's student
answers the unlabeled prompts (`kd generate --model`), the teacher labels its answers (`kd
label`) and round r's student continues from round r-1's (`kd distill --init`) on them. DVC
reads this section (the pipeline's foreach/matrix over `rounds` and `seeds`); kd's commands do
not, but `kd` checks it with the other sections (`kd.project.check_params`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kd.errors import ConfigError


@dataclass
class Round:
    """One on-policy round (`on_policy.rounds`): its number and the student it continues from."""

    round: int = 1
    previous: str = ""  # the previous round's student, as the pipeline's dvc.yaml names it


@dataclass
class OnPolicyConfig:
    """`on_policy`: the rounds of an on-policy pipeline (examples/on_policy): round r's student
    answers the prompts (`kd generate --model`), the teacher labels the answers and the next
    student continues from it (`kd distill --init`). Read by DVC (its foreach/matrix), not by
    kd's commands; kd checks it."""

    seeds: list[int] = field(default_factory=lambda: [0])  # one chain of rounds per seed
    rounds: list[Round] = field(default_factory=list)  # R = len(rounds), numbered 1, 2, ...

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"on_policy.seeds: {self.seeds} must be distinct seeds, at least one")
        for index, step in enumerate(self.rounds):
            if step.round != index + 1:
                raise ConfigError(f"on_policy.rounds[{index}].round: {step.round} must be {index + 1} "
                                  "(rounds are numbered 1, 2, ... in order)")
            if not step.previous.strip():
                raise ConfigError(f"on_policy.rounds[{index}].previous: empty; name the student round "
                                  f"{step.round} continues from")
