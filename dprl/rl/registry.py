"""A name -> function registry filled by a decorator, so a config picks variants by name.

    ESTIMATORS = Registry("advantage estimator")

    @ESTIMATORS.register("grpo")
    def grpo(rewards): ...

    ESTIMATORS["grpo"]      # the function
    ESTIMATORS["gpro"]      # UnknownNameError: unknown advantage estimator 'gpro';
                            # registered: ['grpo', ...]

A registry is a plain dict (iteration, `in`, `sorted(...)` all work); the only additions
are `register` and an error on unknown names that lists the registered ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class UnknownNameError(KeyError, ValueError):
  """A name that is not registered.

  A ValueError because a config value is wrong; also a KeyError so that code treating the
  registry as the dict it is keeps working.
  """

  def __str__(self) -> str:
    # KeyError's str() is the repr of its argument, which would wrap the message in quotes.
    return str(self.args[0])


class Registry(dict):
  """A dict from names to functions, with a `register` decorator."""

  def __init__(self, kind: str):
    super().__init__()
    self.kind = kind

  def register(self, *names: str) -> Callable[[F], F]:
    """Registers the decorated function under each of `names` (aliases share one entry)."""
    if not names:
      raise ValueError(f"register() needs at least one name for the {self.kind}")

    def decorator(fn: F) -> F:
      for name in names:
        if not isinstance(name, str) or not name:
          raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if name in self:
          raise ValueError(f"{self.kind} {name!r} is already registered (to {self[name]!r})")
        self[name] = fn
      return fn

    return decorator

  def __missing__(self, name):
    raise UnknownNameError(
        f"unknown {self.kind} {name!r}; registered: {sorted(self)}")
