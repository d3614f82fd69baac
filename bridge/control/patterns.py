"""OSC 1.0 address-pattern matching without backtracking: pure functions.

A pattern is split at '/' and each part is matched against the same part of a known address.
Each part is simulated as a set of reachable positions held in one integer bitmask, so a part
costs (pattern tokens x alternatives) big-integer operations, whatever the input: no regex, no
exponential blow-up on '*?*?*?...'. Patterns with more wildcards than `MAX_WILDCARDS` or more
brace alternatives than `MAX_ALTERNATIVES` are refused outright.

Supported: '?' (one character), '*' (any run, not crossing '/'), '[abc]', '[a-z]', '[!a-z]',
'{foo,bar}'. OSC 1.1's '//' (any depth) is not supported: such a pattern matches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

WILDCARD_CHARS = frozenset("?*[]{}")
MAX_WILDCARDS = 32  # wildcard tokens in one address pattern
MAX_ALTERNATIVES = 32  # brace alternatives in one address pattern, all braces together


class PatternError(ValueError):
    """An address pattern that is malformed or too complex to match."""


@dataclass(frozen=True)
class Token:
    kind: str  # "literal", "any", "star", "class", "alt"
    chars: frozenset = frozenset()  # literal (one char) or class members
    ranges: tuple[tuple[int, int], ...] = ()  # class: its ranges, (low, high) code points, kept as such
    negated: bool = False  # class: [!...]
    alternatives: tuple[str, ...] = ()  # alt: {a,b}

    @property
    def min_length(self) -> int:
        if self.kind == "star":
            return 0
        if self.kind == "alt":
            return min(len(a) for a in self.alternatives)
        return 1

    @property
    def max_length(self) -> int | None:
        if self.kind == "star":
            return None
        if self.kind == "alt":
            return max(len(a) for a in self.alternatives)
        return 1


@dataclass(frozen=True)
class Part:
    tokens: tuple[Token, ...]
    min_length: int
    max_length: int | None  # None: unbounded (a '*')


def has_wildcards(address: str) -> bool:
    return any(char in WILDCARD_CHARS for char in address)


@lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> tuple[Part, ...]:
    """The parts of an OSC address pattern; PatternError when malformed or too complex. Cached:
    a controller sends the same few patterns again and again."""
    if not pattern.startswith("/"):
        raise PatternError(f"pattern {pattern[:40]!r} does not start with '/'")
    budget = {"wildcards": 0, "alternatives": 0}
    parts = []
    for text in pattern[1:].split("/"):
        tokens = tuple(_tokenize(text, budget))
        minimum = sum(t.min_length for t in tokens)
        maxima = [t.max_length for t in tokens]
        maximum = None if None in maxima else sum(maxima)
        parts.append(Part(tokens, minimum, maximum))
    return tuple(parts)


def _tokenize(text: str, budget: dict) -> list[Token]:
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in "?*[{":
            budget["wildcards"] += 1
            if budget["wildcards"] > MAX_WILDCARDS:
                raise PatternError(f"more than {MAX_WILDCARDS} wildcards")
        if char == "?":
            tokens.append(Token("any"))
        elif char == "*":
            if not tokens or tokens[-1].kind != "star":  # '**' is '*'
                tokens.append(Token("star"))
        elif char == "[":
            end = text.find("]", i + 1)
            if end < 0:
                raise PatternError("'[' without ']'")
            tokens.append(_char_class(text[i + 1:end]))
            i = end
        elif char == "{":
            end = text.find("}", i + 1)
            if end < 0:
                raise PatternError("'{' without '}'")
            alternatives = tuple(sorted(set(text[i + 1:end].split(","))))
            budget["alternatives"] += len(alternatives)
            if budget["alternatives"] > MAX_ALTERNATIVES or any(c in WILDCARD_CHARS for a in alternatives for c in a):
                raise PatternError(f"braces with more than {MAX_ALTERNATIVES} alternatives or nested wildcards")
            tokens.append(Token("alt", alternatives=alternatives))
            i = end
        elif char in "]}":
            raise PatternError(f"unmatched {char!r}")
        else:
            tokens.append(Token("literal", chars=frozenset(char)))
        i += 1
    return tokens


def _char_class(body: str) -> Token:
    negated = body.startswith("!")
    if negated:
        body = body[1:]
    members: set[str] = set()
    ranges: list[tuple[int, int]] = []  # not expanded: a packet of many wide ranges costs no more than its bytes
    i = 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            low, high = ord(body[i]), ord(body[i + 2])
            if high - low > 256:
                raise PatternError("character range wider than 256")
            ranges.append((low, high))
            i += 3
        else:
            members.add(body[i])
            i += 1
    return Token("class", chars=frozenset(members), ranges=tuple(sorted(set(ranges))), negated=negated)


def _in_class(token: Token, char: str) -> bool:
    code = ord(char)
    return char in token.chars or any(low <= code <= high for low, high in token.ranges)


@lru_cache(maxsize=512)
def _char_masks(target: str) -> dict[str, int]:
    """Bit p set in masks[c] when target[p] == c. Targets are the table's address parts only."""
    masks: dict[str, int] = {}
    for position, char in enumerate(target):
        masks[char] = masks.get(char, 0) | (1 << position)
    return masks


def match_part(part: Part, target: str) -> bool:
    """Whether one compiled pattern part matches one address part exactly."""
    n = len(target)
    if part.min_length > n or (part.max_length is not None and part.max_length < n):
        return False
    masks = _char_masks(target)
    below_end = (1 << n) - 1  # positions where one more character can be read
    full = (1 << (n + 1)) - 1
    reach = 1  # bit p: the tokens so far can end at position p
    for token in part.tokens:
        if token.kind == "literal":
            (char,) = token.chars
            reach = (reach & masks.get(char, 0)) << 1
        elif token.kind == "any":
            reach = (reach & below_end) << 1
        elif token.kind == "class":
            hits = 0
            for char, mask in masks.items():
                if _in_class(token, char) != token.negated:
                    hits |= mask
            reach = (reach & hits) << 1
        elif token.kind == "star":
            if reach:
                lowest = reach & -reach
                reach = full & ~(lowest - 1)
        else:
            reach = _alternatives(reach, token.alternatives, target)
        if not reach:
            return False
    return bool(reach >> n & 1)


def _alternatives(reach: int, alternatives: tuple[str, ...], target: str) -> int:
    result = 0
    for alternative in alternatives:
        if not alternative:
            result |= reach
            continue
        size = len(alternative)
        for position in range(len(target) - size + 1):
            if reach >> position & 1 and target.startswith(alternative, position):
                result |= 1 << (position + size)
    return result


def matches(parts: tuple[Part, ...], address_parts: tuple[str, ...]) -> bool:
    """Whether a compiled pattern matches a known address (given as its '/'-separated parts)."""
    if len(parts) != len(address_parts):
        return False
    return all(match_part(part, target) for part, target in zip(parts, address_parts))
