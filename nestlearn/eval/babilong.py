"""BABILong-style samples (Kuratov et al. 2024): bAbI stories (Weston et al. 2015, "Towards AI-Complete Question
Answering: A Set of Prerequisite Toy Tasks") whose facts are scattered, in order, through a book haystack of a
given length, with the question at the end.

What this is: `make_story(task, rng)` generates a bAbI story of one of the first five tasks from a small fixed
vocabulary (`PEOPLE`, `PLACES`, `OBJECTS`) by simulating a tiny world, so every answer is right by construction;
`babilong_sample(task, tokenizer, length, haystack, seed)` weaves its facts into `length` tokens of haystack
(`niah.assemble`: facts at sorted seeded depths, header first, "Question: ...\\nAnswer:" last; length 0 = the
facts alone). The story depends on (task, seed) only, so every length of a grid asks the same questions. My
reading of the tasks:
- qa1, single supporting fact: people move between places ("Mary travelled to the office."); "Where is Mary?"
  asks where the person moved last: one fact answers it.
- qa2, two supporting facts: people also pick up and drop objects ("John picked up the football."); "Where is
  the football?" needs the fact that puts the object with someone (or drops it) and the fact that says where that
  person is (was, when it was dropped). An object moves with its carrier.
- qa3, three supporting facts: "Where was the football before the kitchen?" asks for the place the object was in
  just before it reached the kitchen (the pick-up and the carrier's two moves). Only places the object's history
  holds once are asked about, so the question has one answer.
- qa4, two-argument relations: facts place rooms relative to each other ("The office is north of the kitchen.");
  "What is north of the kitchen?" or "What is the kitchen south of?" reads one fact, either as stated or as its
  inverse (north / south, east / west). The rooms sit on a grid, so the answer is unique.
- qa5, three-argument relations: people hand objects to each other ("Mary gave the cake to John.") among moves
  and pick-ups; questions ask for the giver ("Who gave the cake to John?", "Who gave the cake?"), the receiver
  ("Who did Mary give the cake to?", "Who received the cake?") or the object ("What did Mary give to John?").
  Only questions whose matching transfers all agree are asked; a transfer needs both people in one place.
Answers are single words; the candidates are every word of the answer's class (places, people or objects), so
chance is one over their number. What it is not: bAbI's own data, tasks 6-20, or the scoring (`longctx.py`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .niah import Encoder, Haystack, Sample, assemble, make_query

TASKS: tuple[str, ...] = ("qa1", "qa2", "qa3", "qa4", "qa5")
PEOPLE: tuple[str, ...] = ("Mary", "John", "Sandra", "Daniel")
PLACES: tuple[str, ...] = ("bathroom", "hallway", "garden", "office", "bedroom", "kitchen")
OBJECTS: tuple[str, ...] = ("apple", "football", "milk", "cake")
MOVE = ("went to", "journeyed to", "travelled to", "moved to", "went back to")
PICK = ("picked up", "got", "grabbed", "took")
DROP = ("dropped", "put down", "discarded", "left")
GIVE = ("gave", "handed", "passed")
STEPS = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
FACTS = {"qa1": 6, "qa2": 8, "qa3": 12, "qa4": 2, "qa5": 8}  # default facts per story
MIN_FACTS = {"qa1": 1, "qa2": 2, "qa3": 3, "qa4": 1, "qa5": 4}  # the fewest that can pose the question
HEADER = (
    "I will give you a context with facts about people, objects and places hidden in some random text, and a "
    "question. Answer the question with one word, based only on the facts."
)


@dataclass(frozen=True)
class Story:
    """A bAbI story: its facts in order, the question, the answer and every candidate answer (the answer one
    of them)."""

    task: str
    facts: tuple[str, ...]
    question: str
    answer: str
    candidates: tuple[str, ...]


@dataclass
class World:
    """The simulated state: where each person is, who carries which object, each object's last place and its
    history of places (consecutive repeats merged), and the transfers so far (giver, object, receiver)."""

    where: dict[str, str] = field(default_factory=dict)
    holder: dict[str, str] = field(default_factory=dict)
    at: dict[str, str] = field(default_factory=dict)
    history: dict[str, list[str]] = field(default_factory=dict)
    gives: list[tuple[str, str, str]] = field(default_factory=list)

    def move(self, person: str, place: str) -> None:
        self.where[person] = place
        for obj in sorted(o for o, p in self.holder.items() if p == person):
            self._place(obj, place)

    def pick(self, person: str, obj: str) -> None:
        self.holder[obj] = person
        self._place(obj, self.where[person])

    def drop(self, obj: str) -> None:
        del self.holder[obj]

    def give(self, obj: str, receiver: str) -> None:
        self.gives.append((self.holder[obj], obj, receiver))
        self.holder[obj] = receiver

    def _place(self, obj: str, place: str) -> None:
        self.at[obj] = place
        hist = self.history.setdefault(obj, [])
        if not hist or hist[-1] != place:
            hist.append(place)


def make_story(task: str, rng: random.Random, facts: int | None = None) -> Story:
    """A story of `task` with `facts` facts (default `FACTS[task]`, at least `MIN_FACTS[task]`; qa4 at most 5),
    regenerated until its question has one answer."""
    if task not in TASKS:
        raise ValueError(f"unknown bAbI task {task!r}; choose one of {', '.join(TASKS)}")
    n = FACTS[task] if facts is None else facts
    if n < MIN_FACTS[task]:
        raise ValueError(f"a {task} story needs at least {MIN_FACTS[task]} facts, got {n}")
    make: Callable[[random.Random, int], Story | None] = _MAKERS[task]
    for _ in range(1000):
        story = make(rng, n)
        if story is not None:
            return story
    raise ValueError(f"could not generate a {task} story with {n} facts in 1,000 tries; use more facts")


def babilong_sample(
    task: str, tokenizer: Encoder, length: int, haystack: Haystack, seed: int | str = 0, *, facts: int | None = None
) -> Sample:
    """The story of (task, seed) with its facts scattered through `length` tokens (0 = no haystack)."""
    story = make_story(task, random.Random(f"babilong/{task}/{seed}"), facts)
    rng = random.Random(f"babilong/{task}/{length}/{seed}")
    wrong = [c for c in story.candidates if c != story.answer]
    query = make_query(tokenizer, f"Question: {story.question}\nAnswer:", [story.answer], wrong)
    depths = sorted(rng.random() for _ in story.facts)
    meta = {"task": task, "length": length, "seed": seed, "haystack": haystack.name if length else None,
            "story": dataclasses.asdict(story)}  # fmt: skip
    return assemble(tokenizer, HEADER, story.facts, depths, [query], haystack if length else None, length, rng, meta)


# ---------------------------------------------------------------------------------------------------------
# the five tasks (each returns None when its story has no well-posed question)


def _qa1(rng: random.Random, n: int) -> Story | None:
    w, facts = World(), []
    for _ in range(n):
        facts.append(_move(rng, w, rng.choice(PEOPLE)))
    person = rng.choice(sorted(w.where))
    return Story("qa1", tuple(facts), f"Where is {person}?", w.where[person], PLACES)


def _qa2(rng: random.Random, n: int) -> Story | None:
    w = World()
    facts = [_event(rng, w, ("pick", "drop")) for _ in range(n)]
    if not w.at:
        return None
    obj = rng.choice(sorted(w.at))
    return Story("qa2", tuple(facts), f"Where is the {obj}?", w.at[obj], PLACES)


def _qa3(rng: random.Random, n: int) -> Story | None:
    w = World()
    facts = [_event(rng, w, ("pick", "drop")) for _ in range(n)]
    asks = [(o, i) for o, h in sorted(w.history.items()) for i in range(1, len(h)) if h.count(h[i]) == 1]
    if not asks:
        return None
    last = [(o, i) for o, i in asks if i == len(w.history[o]) - 1]
    obj, i = rng.choice(last or asks)
    hist = w.history[obj]
    return Story("qa3", tuple(facts), f"Where was the {obj} before the {hist[i]}?", hist[i - 1], PLACES)


def _qa4(rng: random.Random, n: int) -> Story | None:
    places = rng.sample(PLACES, min(n, len(PLACES) - 1) + 1)
    cell = {places[0]: (0, 0)}
    edges = []  # (a, d, b): a is d of b
    for new in places[1:]:
        taken = set(cell.values())
        free = [(b, d) for b in cell for d in STEPS if _step(cell[b], d) not in taken]
        b, d = rng.choice(free)
        cell[new] = _step(cell[b], d)
        edges.append((new, d, b) if rng.random() < 0.5 else (b, OPPOSITE[d], new))
    a, d, b = rng.choice(edges)
    if rng.random() < 0.5:  # ask about the inverse reading of the fact
        a, d, b = b, OPPOSITE[d], a
    facts = tuple(f"The {x} is {r} of the {y}." for x, r, y in edges)
    if rng.random() < 0.5:
        return Story("qa4", facts, f"What is {d} of the {b}?", a, PLACES)
    return Story("qa4", facts, f"What is the {a} {d} of?", b, PLACES)


def _qa5(rng: random.Random, n: int) -> Story | None:
    w = World()
    facts = [_event(rng, w, ("pick", "give"), social=True) for _ in range(n)]
    asks = sorted({qa for g in w.gives for qa in _give_questions(w.gives, *g)})
    if not asks:
        return None
    question, answer = rng.choice(asks)
    return Story("qa5", tuple(facts), question, answer, PEOPLE if question.startswith("Who") else OBJECTS)


_MAKERS = {"qa1": _qa1, "qa2": _qa2, "qa3": _qa3, "qa4": _qa4, "qa5": _qa5}


def _give_questions(gives: list[tuple[str, str, str]], g: str, o: str, r: str) -> list[tuple[str, str]]:
    """The questions about transfer (g, o, r) whose every matching transfer gives the same answer."""
    forms = [
        (f"Who gave the {o} to {r}?", lambda x: x[1:] == (o, r), 0),
        (f"Who gave the {o}?", lambda x: x[1] == o, 0),
        (f"Who did {g} give the {o} to?", lambda x: x[:2] == (g, o), 2),
        (f"Who received the {o}?", lambda x: x[1] == o, 2),
        (f"What did {g} give to {r}?", lambda x: (x[0], x[2]) == (g, r), 1),
    ]
    out = []
    for question, match, slot in forms:
        answers = {x[slot] for x in gives if match(x)}
        if len(answers) == 1:
            out.append((question, answers.pop()))
    return out


# ---------------------------------------------------------------------------------------------------------
# world events


def _event(rng: random.Random, w: World, allow: tuple[str, ...], social: bool = False) -> str:
    """One random feasible event (a move, or a pick-up / drop / transfer when allowed) as its fact sentence."""
    located = sorted(w.where)
    free = [o for o in OBJECTS if o not in w.holder]
    options: dict[str, list[tuple[str, ...]]] = {
        "pick": [(p, o) for p in located for o in free if w.at.get(o, w.where[p]) == w.where[p]],
        "drop": sorted((p, o) for o, p in w.holder.items()),
        "give": [(p, o, q) for o, p in sorted(w.holder.items()) for q in located if q != p and _together(w, p, q)],
    }
    kinds = ["move"] + [k for k in allow if options[k]]
    kind = rng.choice(kinds)
    if kind == "move":
        return _move(rng, w, rng.choice(PEOPLE), social)
    choice = rng.choice(options[kind])
    if kind == "pick":
        w.pick(*choice)
        return f"{choice[0]} {rng.choice(PICK)} the {choice[1]}."
    if kind == "drop":
        w.drop(choice[1])
        return f"{choice[0]} {rng.choice(DROP)} the {choice[1]}."
    w.give(choice[1], choice[2])
    return f"{choice[0]} {rng.choice(GIVE)} the {choice[1]} to {choice[2]}."


def _move(rng: random.Random, w: World, person: str, social: bool = False) -> str:
    """`person` moves to another place (with `social`, half the time to where someone else is)."""
    here = w.where.get(person)
    others = sorted({w.where[p] for p in w.where if p != person} - {here})
    if social and others and rng.random() < 0.5:
        place = rng.choice(others)
    else:
        place = rng.choice([p for p in PLACES if p != here])
    w.move(person, place)
    return f"{person} {rng.choice(MOVE)} the {place}."


def _together(w: World, a: str, b: str) -> bool:
    return w.where[a] == w.where[b]


def _step(xy: tuple[int, int], d: str) -> tuple[int, int]:
    return xy[0] + STEPS[d][0], xy[1] + STEPS[d][1]
