"""What every backend module shares: the protocol, the options base, the abstention.

The backend modules import from here and never from the package, so imports go one way:
``consumers.backends`` (the registry) → a backend module (imported lazily) → ``base``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, TypeAlias, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict

from common.schemas import Item, Prediction
from consumers.lessons import LessonFeed

# A fleet file's ``options`` table as read, before its backend's model has checked it.
RawOptions: TypeAlias = Mapping[str, object]

M = TypeVar("M", bound=BaseModel)


class Backend(Protocol):
    def classify(self, items: Sequence[Item]) -> list[Prediction]:
        """One prediction per item, in order. Never raise for one bad item: abstain instead."""
        ...


@runtime_checkable
class Learner(Protocol):
    """A backend that learns from the fleet's lessons (``consumers.lessons``): the worker
    calls ``learn`` between batches and ``save`` when it stops."""

    def learn(self, feed: LessonFeed) -> int:
        """Learn what ``feed`` has that is new (the first call starts from its snapshot).
        Returns how many lessons were read. Raises redis errors (the loop retries)."""
        ...

    def save(self) -> None:
        """Write a snapshot of what was learned now."""
        ...


class BackendOptions(BaseModel):
    """A backend's ``options`` in the fleet file. Each backend class names its subclass as
    ``Options``; unknown keys are an error, so a typo is refused at start."""

    model_config = ConfigDict(extra="forbid")


def parse_options(model: type[M], options: BaseModel | RawOptions) -> M:
    """``options`` as a ``model``: an instance of it as it is; a mapping (a fleet file's
    table) or another options model (only the keys set there) validated.
    Raises pydantic.ValidationError."""
    if isinstance(options, model):
        return options
    if isinstance(options, BaseModel):
        return model.model_validate(options.model_dump(exclude_unset=True))
    return model.model_validate(dict(options))


def unsupported(backend: str, item: Item) -> Prediction:
    return Prediction(label=None, error=f"backend {backend} does not handle task {item.task!r}")
