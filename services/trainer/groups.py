"""Assembling complete prompt groups from the scored stream."""

from __future__ import annotations

from dataclasses import dataclass, field

from hapo.messages import ScoredTrajectory
from hapo.streams import Entry


@dataclass
class _Group:
    samples: dict[int, ScoredTrajectory] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)


@dataclass
class GroupAssembler:
    """Collects scored samples per prompt group, dropping duplicates by key.

    A redelivered sample carries the same (run, group, sample index) as the copy already
    held and is dropped (its stream entry is still acknowledged with the group). A group is
    complete once all ``n`` samples are in.
    """

    run_id: str
    duplicates: int = 0
    foreign: int = 0
    _groups: dict[str, _Group] = field(default_factory=dict)

    def add(self, entry: Entry, sample: ScoredTrajectory) -> bool:
        """Hold ``sample``; False if it belongs to another run (the caller acknowledges it)."""
        if sample.run_id != self.run_id:
            self.foreign += 1
            return False
        group = self._groups.setdefault(sample.group_id, _Group())
        group.entries.append(entry)
        if sample.sample_idx in group.samples:
            self.duplicates += 1
        else:
            group.samples[sample.sample_idx] = sample
        return True

    def complete(self) -> list[str]:
        """Ids of the complete groups, oldest first."""
        return [
            group_id
            for group_id, group in self._groups.items()
            if group.samples and len(group.samples) == next(iter(group.samples.values())).n
        ]

    def pop(self, group_id: str) -> tuple[list[ScoredTrajectory], list[Entry]]:
        """A complete group's samples (by index) and every stream entry that carried them."""
        group = self._groups.pop(group_id)
        return [group.samples[i] for i in sorted(group.samples)], group.entries
