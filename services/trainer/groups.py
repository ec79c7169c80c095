"""Assembling complete prompt groups from the scored stream, and the set of groups a run
has trained."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from hapo.transport.messages import ScoredTrajectory
from hapo.transport.streams import Entry


@dataclass
class TrainedGroups:
    """Ids of the groups a run has trained, compact for a checkpoint's JSON record.

    The trainer issues group ids ``f"{n:08d}"`` for n = 1, 2, ... and trains them roughly
    in order, so the set is kept as "every n <= ``below``" plus the few ids above it
    (and, for ids that are not numbers, the ids themselves).
    """

    below: int = 0
    above: set[int] = field(default_factory=set)
    other: set[str] = field(default_factory=set)

    def add(self, group_id: str) -> None:
        if not group_id.isdigit():
            self.other.add(group_id)
            return
        self.above.add(int(group_id))
        while self.below + 1 in self.above:
            self.below += 1
            self.above.remove(self.below)

    def __contains__(self, group_id: object) -> bool:
        if not isinstance(group_id, str):
            return False
        if not group_id.isdigit():
            return group_id in self.other
        number = int(group_id)
        return number <= self.below or number in self.above

    def to_json(self) -> dict[str, Any]:
        return {"below": self.below, "above": sorted(self.above), "other": sorted(self.other)}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> TrainedGroups:
        return cls(record["below"], set(record["above"]), set(record["other"]))


@dataclass
class _Group:
    samples: dict[int, ScoredTrajectory] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)


@dataclass
class GroupAssembler:
    """Collects scored samples per prompt group, dropping duplicates by key.

    A redelivered sample carries the same (run, group, sample index) as the copy already
    held and is dropped (its stream entry is still acknowledged with the group); a sample of
    a group already trained (``trained``) is refused. A group is complete once all ``n``
    samples are in; popping it marks it trained.

    Groups the run issued are watched (``watch``) from issue until they are trained: one
    still incomplete after the run's group timeout (``overdue``: its prompt or one of its
    samples was dead-lettered somewhere) is abandoned (``abandon``): it counts as trained
    from then on, so that its samples are refused if they arrive later, and is never
    trained.
    """

    run_id: str
    trained: TrainedGroups = field(default_factory=TrainedGroups)
    """Groups trained or abandoned: their samples are refused."""
    abandoned: int = 0
    """Groups the run abandoned (all of them, checkpointed ones included)."""
    duplicates: int = 0
    foreign: int = 0
    _groups: dict[str, _Group] = field(default_factory=dict)
    _watched: dict[str, float] = field(default_factory=dict)
    """Group ids issued and not yet trained, with the time their clock started."""

    def watch(self, group_ids: Iterable[str], now: float) -> None:
        """Start the clock of the issued groups ``group_ids`` (those not yet trained)."""
        for group_id in group_ids:
            if group_id not in self.trained:
                self._watched.setdefault(group_id, now)

    def restart_clocks(self, now: float) -> None:
        """Start every watched group's clock again (the run was paused meanwhile)."""
        self._watched = dict.fromkeys(self._watched, now)

    def overdue(self, now: float, timeout_s: float) -> list[str]:
        """Watched groups still incomplete ``timeout_s`` after their clock started."""
        complete = set(self.complete())
        return [
            group_id
            for group_id, since in self._watched.items()
            if now - since > timeout_s and group_id not in complete
        ]

    def abandon(self, group_id: str) -> tuple[int, list[Entry]]:
        """Give up on an incomplete group: how many samples of it were in, and the stream
        entries that carried them (acknowledged like a trained group's); it counts as
        trained from now on."""
        self._watched.pop(group_id, None)
        group = self._groups.pop(group_id, _Group())
        self.trained.add(group_id)
        self.abandoned += 1
        return len(group.samples), group.entries

    def add(self, entry: Entry, sample: ScoredTrajectory) -> Literal["held", "foreign", "trained"]:
        """Hold ``sample``, or say why not: it belongs to another run, or to a group already
        trained (the caller acknowledges its entry, once that training is checkpointed)."""
        if sample.run_id != self.run_id:
            self.foreign += 1
            return "foreign"
        if sample.group_id in self.trained:
            self.duplicates += 1
            return "trained"
        group = self._groups.setdefault(sample.group_id, _Group())
        group.entries.append(entry)
        if sample.sample_idx in group.samples:
            self.duplicates += 1
        else:
            group.samples[sample.sample_idx] = sample
        return "held"

    def complete(self) -> list[str]:
        """Ids of the complete groups, oldest first."""
        return [
            group_id
            for group_id, group in self._groups.items()
            if group.samples and len(group.samples) == next(iter(group.samples.values())).n
        ]

    def pop(self, group_id: str) -> tuple[list[ScoredTrajectory], list[Entry]]:
        """A complete group's samples (by index) and every stream entry that carried them;
        the group counts as trained from now on."""
        group = self._groups.pop(group_id)
        self._watched.pop(group_id, None)
        self.trained.add(group_id)
        return [group.samples[i] for i in sorted(group.samples)], group.entries
