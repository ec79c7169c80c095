"""What a service needs from the message transport, independent of Redis.

A service reads the messages of one input stream as a ``Consumer`` and hands everything a
batch produced (outputs, acknowledgements, dead letters) back in one ``Consumer.commit``,
which applies all of it or none of it. A service that only produces (the trainer's prompt
groups, a benchmark's input) uses a ``Publisher``. Messages are bytes both ways: encoding
them is ``hapo.transport.messages``'s business, where bytes live in a stream is the
implementation's (``hapo.transport.streams``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from hapo.transport.messages import MalformedMessage

DATA_FIELD = b"data"
"""The one field of a stream entry, holding the message's bytes."""

Output = tuple[str, bytes]
"""A message to append: ``(stream, payload)``."""


@dataclass(frozen=True)
class Entry:
    """One stream entry as read: its id and its fields, byte for byte."""

    id: bytes
    fields: dict[bytes, bytes]

    @property
    def payload(self) -> bytes:
        """The message's bytes (field ``data``).

        Raises:
            MalformedMessage: the entry has no such field; the message lists the fields it
                has and is fit for the dead-letter stream.
        """
        payload = self.fields.get(DATA_FIELD)
        if payload is None:
            fields = sorted(self.fields)
            raise MalformedMessage(f"no '{DATA_FIELD.decode()}' field (fields: {fields})")
        return payload


class Publisher(ABC):
    """Appends messages to streams."""

    @abstractmethod
    async def publish(
        self, outputs: Sequence[Output], values: Mapping[str, bytes | str | int] | None = None
    ) -> None:
        """Append ``outputs`` and set ``values`` (plain keys: the trainer records how many
        prompt groups it issued), all in one transaction: every one of them or none."""


class Consumer(ABC):
    """Reads one stream as a member of a consumer group, at least once per entry.

    An entry read stays pending at this consumer until a ``commit`` acknowledges it;
    entries left pending by a consumer that died are delivered to another one. An entry
    delivered too many times without a commit (it kills, or fails, whoever processes it)
    goes to the dead letters instead of being delivered again.
    """

    @abstractmethod
    async def start(self) -> None:
        """Join the group (creating it and the stream if needed)."""

    @abstractmethod
    async def read(self) -> list[Entry]:
        """The next batch, possibly empty after a while with nothing new.

        Entries this consumer holds pending may come again (after ``recover``, or when the
        transport could not tell whether a read reached the caller): callers skip those they
        still work on.
        """

    @abstractmethod
    def recover(self) -> None:
        """After a failed batch: read this consumer's own pending entries before anything
        new."""

    @abstractmethod
    def release(self, entries: Sequence[Entry]) -> None:
        """Give up ``entries`` without committing them (their processing failed): they stay
        pending and are delivered again later, a delivery that counts towards the limit
        after which an entry goes to the dead letters."""

    @abstractmethod
    def working_on(self, entries: Sequence[Entry]) -> AbstractAsyncContextManager[None]:
        """A context in which ``entries`` (read, not yet committed) are marked as in
        progress at this consumer, so that no other consumer takes them over however long
        the work takes; one that dies stops marking them, and they are taken over as
        usual."""

    @abstractmethod
    async def commit(
        self,
        outputs: Sequence[Output] = (),
        acks: Sequence[Entry] = (),
        dead: Sequence[tuple[Entry, str]] = (),
    ) -> None:
        """In one transaction: append ``outputs``, acknowledge ``acks``, and move each
        ``(entry, reason)`` of ``dead`` to the dead-letter stream (acknowledging it).

        Either all of it happens or none of it: a failed commit leaves the entries pending,
        to be read again.
        """
